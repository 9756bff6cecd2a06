"""The cores whose cycles can be estimated: LLVM's scheduling model for each, and how its code is decoded."""

from dataclasses import dataclass

from pipeline.errors import unknown


@dataclass(frozen=True)
class Core:
    name: str  # LLVM's -mcpu, also QEMU's -cpu
    triple: str  # how llvm-mc decodes the core's instructions and llvm-mca picks its model
    about: str  # one line for reports


CORES = {
    "cortex-a72": Core("cortex-a72", "aarch64", "Cortex-A72 (out of order, 3-wide; Raspberry Pi 4)"),
    "cortex-m4": Core("cortex-m4", "thumbv7em-none-eabi", "Cortex-M4F (in order, single issue)"),
    "cortex-m7": Core("cortex-m7", "thumbv7em-none-eabi", "Cortex-M7 (in order, dual issue)"),
}


def core_named(name: str) -> Core:
    if name not in CORES:
        raise unknown("core", name, CORES)
    return CORES[name]

"""Run a firmware ELF on the emulated board (qemu-system-arm, MPS2) and read back what it reports.

The firmware reads `inputs.bin` and writes `outputs.bin` over semihosting in a scratch folder, and reports
each inference's instructions, the first inference's per-operator instructions, the arena it used and its
stack high-water mark. Under `-icount shift=0` qemu runs one instruction per virtual nanosecond, so the counts
are deterministic: the same ELF and inputs give the same figures on any host, loaded or not (FIRMWARE.md).
These are instructions, not cycles: qemu models no pipeline, caches or flash wait states. With
`profile_blocks` the run also loads the block-profile plugin (pipeline/cycles), which the firmware's
`cycle_mark()` calls split into inferences and operators, for cycles estimated on the core's model.
"""

import contextlib
import re
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cycles import Profile, plugin_path, read_profile
from pipeline.cycles.plugin import plugin_arg
from pipeline.cycles.tools import require
from pipeline.errors import DeviceError
from pipeline.tflm.build import CPUS, check_toolchain

EXIT_CODES = {2: "tensors do not fit the arena", 3: "an operator is not registered", 4: "no inputs.bin",
              5: "inputs.bin ended early", 6: "Invoke failed", 97: "abort", 98: "a pure virtual call",
              99: "a hard fault"}


@dataclass(frozen=True)
class FirmwareRun:
    outputs: np.ndarray  # int8, one row per input
    instructions: tuple[int, ...]  # per inference; the first includes the per-operator profiling
    layers: tuple[tuple[str, int], ...]  # (operator, instructions) of the first inference, in order
    arena_used_bytes: int
    stack_used_bytes: int
    profile: Profile | None = None  # the block profile, when asked for


def symbol_address(elf: Path, name: str) -> int:
    """Where `name` lies in the ELF (arm-none-eabi-nm), for the plugin's mark."""
    done = subprocess.run(["arm-none-eabi-nm", str(elf)], capture_output=True, text=True, check=False)
    found = re.search(rf"^([0-9a-f]+) T {re.escape(name)}$", done.stdout, re.M)
    if found is None:
        raise DeviceError(f"{elf.name} has no {name}(): it was linked by an older harness; deploy again")
    return int(found[1], 16)


def size(elf: Path) -> dict[str, int]:
    """Section sizes: flash = vector table (a separate section on STM32 images), code, constants and the model
    (.text) + unwind index + .data's initial values;
    RAM = .data + .bss (the tensor arena included)."""
    done = subprocess.run(["arm-none-eabi-size", "-A", str(elf)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise DeviceError(f"arm-none-eabi-size failed on {elf}: {done.stderr.strip()}")
    sections = {m[1]: int(m[2]) for m in re.finditer(r"^(\.\S+)\s+(\d+)\s+\d+", done.stdout, re.M)}
    flash = sum(sections.get(name, 0) for name in (".isr_vector", ".text", ".ARM.exidx", ".data"))
    return {"flash_bytes": flash, "ram_bytes": sections.get(".data", 0) + sections.get(".bss", 0),
            "data_bytes": sections.get(".data", 0), "bss_bytes": sections.get(".bss", 0)}


def run_firmware(elf: Path, x_int8: np.ndarray, *, cpu: str, timeout: float = 3600,
                 profile_blocks: bool = False) -> FirmwareRun:
    """Run `elf` on `cpu`'s emulated board over the int8 inputs (NHWC, one per row)."""
    check_toolchain()
    plugin = []
    if profile_blocks:
        require("llvm-mc", "llvm-mca", "gcc")
        plugin = ["-plugin", plugin_arg(plugin_path(), Path("blocks.prof"), mark=symbol_address(elf, "cycle_mark"))]
    with tempfile.TemporaryDirectory(prefix="cnn-deploy-firmware-") as tmp:
        np.ascontiguousarray(x_int8, dtype=np.int8).tofile(Path(tmp) / "inputs.bin")
        argv = ["qemu-system-arm", "-M", CPUS[cpu].machine, "-cpu", cpu, "-display", "none", "-serial", "null",
                "-monitor", "none", "-semihosting-config", "enable=on,target=native",
                "-icount", "shift=0,align=off,sleep=off", *plugin, "-kernel", str(Path(elf).resolve())]
        try:
            done = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise DeviceError(f"The emulated {cpu} did not finish {elf.name} in {timeout:.0f} s") from exc
        if done.returncode:
            why = EXIT_CODES.get(done.returncode, f"exit {done.returncode}")
            raise DeviceError(f"The firmware {elf.name} failed on the emulated {cpu} ({why}): "
                              f"{done.stderr.strip()[-300:]}")
        outputs = np.fromfile(Path(tmp) / "outputs.bin", np.int8).reshape(len(x_int8), -1)
        profile = read_profile(Path(tmp) / "blocks.prof") if profile_blocks else None
    text = done.stderr
    return FirmwareRun(
        outputs=outputs,
        instructions=tuple(int(m) for m in re.findall(r"^inference \d+ (\d+)$", text, re.M)),
        layers=tuple((tag, int(n)) for tag, n in re.findall(r"^layer \d+ (\S+) (\d+)$", text, re.M)),
        arena_used_bytes=int(re.search(r"^arena_used (\d+)$", text, re.M)[1]),
        stack_used_bytes=int(re.search(r"^stack_used (\d+)$", text, re.M)[1]),
        profile=profile,
    )


def emulated_board_argv(elf: Path, *, cpu: str, port: int) -> list[str]:
    """qemu's command line for `elf` on `cpu`'s emulated board with UART0 on TCP 127.0.0.1:`port`: qemu waits for
    the host's connection before it starts the core (wait=on), so no output is lost (a pty drops what it writes
    before a reader opens it). Semihosting stays on: the harness leaves through it."""
    return ["qemu-system-arm", "-M", CPUS[cpu].machine, "-cpu", cpu, "-display", "none", "-monitor", "none",
            "-serial", f"tcp:127.0.0.1:{port},server=on,wait=on,nodelay=on", "-semihosting-config", "enable=on,target=native",
            "-kernel", str(Path(elf).resolve())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class EmulatedBoard:
    url: str  # its UART, socket://127.0.0.1:PORT, for the protocol client
    process: subprocess.Popen


@contextlib.contextmanager
def emulated_board(elf: Path, *, cpu: str) -> Iterator[EmulatedBoard]:
    """The benchmark firmware `elf` running on `cpu`'s emulated board until the block ends. The emulator is stopped
    on the way out."""
    check_toolchain()
    port = free_port()
    process = subprocess.Popen(emulated_board_argv(elf, cpu=cpu, port=port), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        yield EmulatedBoard(f"socket://127.0.0.1:{port}", process)
    finally:
        process.kill()
        process.wait()

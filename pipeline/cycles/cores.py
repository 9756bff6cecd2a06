"""The cores whose cycles can be estimated: LLVM's scheduling model for each, and how its code is decoded."""

from dataclasses import dataclass

from pipeline.errors import unknown


@dataclass(frozen=True)
class Core:
    name: str  # LLVM's -mcpu, also QEMU's -cpu
    triple: str  # how llvm-mc decodes the core's instructions and llvm-mca picks its model
    about: str  # one line for reports
    calls: dict  # llvm-mca times a call at 100 cycles (LLVM 14 cannot be told otherwise): each becomes its branch

    def timed_as(self, instruction: str) -> str:
        """The instruction as llvm-mca should time it: a call becomes the branch it costs as much as."""
        mnemonic, sep, operands = instruction.partition("\t")
        return f"{self.calls[mnemonic]}{sep}{operands}" if mnemonic in self.calls else instruction

    def split(self, code: bytes, count: int) -> list[bytes]:
        """The first `count` instructions of a block's bytes. QEMU 7.2 hands plugins the bytes its Thumb
        translator read, which at a block's end include a peek at the next instruction, so the lengths come from
        the encoding: A64 is 4 bytes; a Thumb halfword whose top five bits are 11101, 11110 or 11111 starts a
        32-bit instruction, any other is a 16-bit one (Arm ARM, "Thumb instruction set encoding")."""
        if not self.triple.startswith("thumb"):
            return [code[i:i + 4] for i in range(0, 4 * count, 4)]
        found, at = [], 0
        while len(found) < count and at + 2 <= len(code):
            size = 4 if (code[at + 1] >> 3) in (0b11101, 0b11110, 0b11111) else 2
            found.append(code[at:at + size])
            at += size
        return found


_A64_CALLS = {"bl": "b", "blr": "br"}
_THUMB_CALLS = {"bl": "b.w", "blx": "bx"}  # a call costs what a taken branch does: both refill the pipeline
CORES = {
    "cortex-a72": Core("cortex-a72", "aarch64", "Cortex-A72 (out of order, 3-wide; Raspberry Pi 4)", _A64_CALLS),
    "cortex-m4": Core("cortex-m4", "thumbv7em-none-eabi", "Cortex-M4F (in order, single issue)", _THUMB_CALLS),
    "cortex-m7": Core("cortex-m7", "thumbv7em-none-eabi", "Cortex-M7 (in order, dual issue)", _THUMB_CALLS),
}


def core_named(name: str) -> Core:
    if name not in CORES:
        raise unknown("core", name, CORES)
    return CORES[name]

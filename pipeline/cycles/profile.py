"""What the block-profile plugin wrote: each translated block, and each segment's executions between marks."""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import DeviceError


@dataclass(frozen=True)
class Block:
    code: bytes  # the block's instruction bytes as the guest holds them (QEMU 7.2 may add a peek beyond its end)
    sizes: tuple[int, ...]  # each instruction's length in bytes, as QEMU reported it
    # where the guest ran it; not part of what a block is (the same bytes time the same wherever they lie)
    address: int = field(default=0, compare=False)

    @property
    def instructions(self) -> int:
        return len(self.sizes)


@dataclass(frozen=True)
class Profile:
    blocks: dict[int, Block]  # by translation id
    segments: tuple[Counter, ...]  # executions per block id; segment k ends at mark k (the last at exit)

    @property
    def marks(self) -> int:
        return len(self.segments) - 1


def read_profile(path: Path) -> Profile:
    blocks: dict[int, Block] = {}
    segments: list[Counter] = [Counter()]
    ended = False
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DeviceError(f"The block profile {path} was not written ({exc.strerror}): did the guest start?") from exc
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind == "C":
            block, count = rest.split()
            segments[-1][int(block)] += int(count)
        elif kind == "B":
            block, address, _, sizes, code = rest.split()
            blocks[int(block)] = Block(bytes.fromhex(code), tuple(int(s) for s in sizes.split(",")), int(address, 16))
        elif kind == "M":
            segments.append(Counter())
        elif kind == "E":
            ended = True
    if not ended:
        raise DeviceError(f"The block profile {path} is incomplete: the emulator did not exit cleanly")
    return Profile(blocks, tuple(segments))

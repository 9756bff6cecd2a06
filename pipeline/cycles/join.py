"""Straight-line code QEMU cut into several translation blocks, joined back before it is timed.

QEMU ends a translation block at a branch, but also where the code does not branch: at a guest page's end (1 KiB
pages on M-profile Arm, so a hot loop in flash is cut wherever the linker happens to put it across a boundary), after
an instruction that may do I/O under `-icount`, at its length limit. Each piece timed on its own by llvm-mca is not
what the core runs: on a Cortex-M7 the inner loop of CMSIS-NN's `arm_nn_mat_mult_kernel_s8_s16` measured 21.55 cycles
an iteration cut in three, 22.04 cut in two and 22.02 whole, and a model's firmware moved by 8 bytes (a different
arena size in `main`) estimated 1.3% apart. A block that ends without transferring control always runs on into the
block at its end address, so the pair is timed as one block. Executions of the second piece beyond those that ran on
from the first were entered by a branch and are timed from there.
"""

import re
from collections import Counter, defaultdict

from pipeline.cycles.cores import Core
from pipeline.cycles.mca import disassemble
from pipeline.cycles.profile import Block, Profile

# what ends a block by moving elsewhere: branches and calls of both ISAs (any condition, any width) and what traps
_BRANCH = re.compile(r"(b|bl|blx|bx|br|blr|ret|cbz|cbnz|tbz|tbnz|tbb|tbh|eret|svc|hvc|smc|bkpt|brk|hlt|udf|wfi|wfe)"
                     r"(eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le|al)?")
_REGISTERS = re.compile(r"[\s,{}\[\]!^]+")


def transfers_control(instruction: str) -> bool:
    """Whether an instruction as llvm-mc prints it (`mnemonic<TAB>operands`) may continue anywhere but at the next
    address: a branch, a call, a return, a trap, or a write to the Thumb `pc` (`pop {r4, pc}`, `ldr pc, [sp], #4`)."""
    mnemonic, _, operands = instruction.partition("\t")
    if _BRANCH.fullmatch(mnemonic.split(".")[0]):
        return True
    registers = _REGISTERS.split(operands.strip())
    # pop and ldm write their whole list; every other instruction writes its first operand
    written = registers if mnemonic.startswith(("pop", "ldm")) else registers[:1]
    return "pc" in written


def _length(core: Core, block: Block) -> int:
    return sum(len(instruction) for instruction in core.split(block.code, block.instructions))


def _same_code(profile: Profile, core: Core) -> Profile:
    """`profile` with each translation of the same code at the same address (QEMU translates again after a flush)
    counted as one block."""
    canonical, blocks = {}, {}
    for b, block in profile.blocks.items():
        key = (block.address, block.code[:_length(core, block)], block.sizes)
        canonical[b] = canonical.setdefault(key, b)
        blocks.setdefault(canonical[b], block)
    segments = []
    for segment in profile.segments:
        counts = Counter()
        for b, n in segment.items():
            counts[canonical[b]] += n
        segments.append(counts)
    return Profile(blocks, tuple(segments))


def _runs_on(profile: Profile, core: Core) -> dict[int, int]:
    """For each block that always runs on into the code at its end address, the block that runs that code: the
    most executed one starting there (under `-icount` QEMU also translates a shorter copy to stop at a deadline,
    run once)."""
    executions = Counter()
    for segment in profile.segments:
        executions.update(segment)
    executed = sorted(executions)
    starting = defaultdict(list)
    for b in executed:
        starting[profile.blocks[b].address].append(b)
    lasts = []
    for b in executed:
        block = profile.blocks[b]
        last = core.split(block.code, block.instructions)[-1]
        lasts.append(Block(last, (len(last),)))
    texts = disassemble(core, lasts)
    following = {}
    for b, text in zip(executed, texts, strict=True):
        block = profile.blocks[b]
        at_end = starting.get(block.address + _length(core, block))
        if text and at_end and not transfers_control(text[-1]):  # an undecodable last instruction: left as it is
            following[b] = max(at_end, key=lambda c: (executions[c], -c))
    return following


def _entered(segment: Counter, following: dict[int, int]) -> Counter:
    """Each block's executions in `segment` that did not run on from the block before it (none where a copy QEMU
    made to stop at a deadline ran instead)."""
    entered = Counter(segment)
    for before, after in following.items():
        entered[after] -= segment.get(before, 0)
    return Counter({b: max(n, 0) for b, n in entered.items()})


def joined(profile: Profile, core: Core) -> Profile:
    """`profile` with each block that was entered by a branch followed by every block its code runs on into, as one
    block. Its instruction counts are exact where every execution of a block ran on into the same translation of
    the next (a copy run once, as above, adds its instructions once more): count instructions on `profile`."""
    profile = _same_code(profile, core)
    following = _runs_on(profile, core)
    blocks, ids, next_id = dict(profile.blocks), {}, max(profile.blocks, default=-1) + 1
    for first in profile.blocks:
        if first not in following:
            continue
        chain = [first]
        while chain[-1] in following:
            chain.append(following[chain[-1]])
        pieces = [profile.blocks[b] for b in chain]
        ids[first], next_id = next_id, next_id + 1
        blocks[ids[first]] = Block(b"".join(p.code[:_length(core, p)] for p in pieces),
                                   sum((p.sizes for p in pieces), ()), pieces[0].address)
    segments = []
    for segment in profile.segments:
        counts = Counter()
        for b, n in _entered(segment, following).items():
            if n:
                counts[ids.get(b, b)] += n
        segments.append(counts)
    return Profile(blocks, tuple(segments))

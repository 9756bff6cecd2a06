"""Steady-state cycles of each executed block on a core, from LLVM's scheduling model (`llvm-mca`).

Each block's bytes are decoded with `llvm-mc --disassemble` (one instruction per line, so an undecodable one is
known by its line) and all blocks go through one `llvm-mca` process as code regions: a process per block would
cost more than the model. A block's figure is llvm-mca's total cycles over its iterations: the block run
back to back, as a block in a hot loop runs. An instruction the model has no timing for (LLVM 14's Cortex-M7 lacks
IT, for one) is left out of the run and counted at one cycle; a block llvm-mca still rejects counts one cycle per
instruction and is reported as unmodelled. Results are cached per core and LLVM version by
the block's bytes, so a block is timed once on a machine.
"""

import json
import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pipeline.cycles.cores import Core
from pipeline.cycles.profile import Block
from pipeline.cycles.tools import llvm_version, require
from pipeline.errors import DeviceError
from pipeline.util import cache_dir, cache_lock, sha256_json, write_text

ITERATIONS = 100  # enough for a steady state on every block seen; more only costs time
# of how blocks are prepared for llvm-mca and counted: a change invalidates the cached timings and every count made
# with them (5: code QEMU translated again is joined too; 4: straight-line code QEMU cut into blocks is timed whole,
# pipeline/cycles/join.py)
VERSION = 5
INVALID = re.compile(r":(\d+):\d+: warning: invalid instruction encoding")
MCA_ERROR = re.compile(r":(\d+):\d+: error:")
UNSUPPORTED = re.compile(r"unsupported instruction.*\n.*instruction:\s*(\S+)")
REGION = re.compile(r"^\[\d+\] Code Region - b(\d+)$")


def _key(block: Block) -> str:
    return f"{block.code.hex()}/{','.join(map(str, block.sizes))}"


def model_key(core: Core) -> str:
    """What a block's timing depends on besides its bytes: a change here times every block again."""
    return sha256_json([llvm_version(), ITERATIONS, VERSION, core.triple, core.calls])[:12]


def _cache_file(core: Core) -> Path:
    return cache_dir("cycles", f"mca-{core.name}-{model_key(core)}.json")


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _instruction_lines(core: Core, block: Block) -> list[str]:
    return ["[" + " ".join(f"0x{b:02x}" for b in insn) + "]" for insn in core.split(block.code, block.instructions)]


def disassemble(core: Core, blocks: list[Block]) -> list[list[str] | None]:
    """Each block's instructions as assembly text; None for a block with an instruction LLVM cannot decode."""
    lines, owner = [], []
    for i, block in enumerate(blocks):
        for line in _instruction_lines(core, block):
            lines.append(line)
            owner.append(i)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        done = subprocess.run(["llvm-mc", "--disassemble", f"-triple={core.triple}", f"-mcpu={core.name}", f.name],
                              capture_output=True, text=True, check=False)
    finally:
        Path(f.name).unlink()
    invalid = {int(m[1]) - 1 for m in INVALID.finditer(done.stderr)}
    decoded = [line.strip() for line in done.stdout.splitlines() if line.startswith("\t") and not line.startswith("\t.")]
    if len(decoded) != len(lines) - len(invalid):
        raise DeviceError(f"llvm-mc decoded {len(decoded)} of {len(lines)} instructions for {core.name} with "
                          f"{len(invalid)} invalid: its output could not be matched to the blocks "
                          f"({done.stderr.strip()[-300:]})")
    texts: list[list[str] | None] = [[] for _ in blocks]
    it = iter(decoded)
    for index, block in enumerate(owner):
        if index in invalid:
            texts[block] = None
        else:
            text = next(it)
            if texts[block] is not None:
                texts[block].append(text)
    return texts


def _mnemonic(instruction: str) -> str:
    return instruction.split("\t", 1)[0]


def _mca(core: Core, texts: dict[int, list[str]]) -> dict[int, float]:
    """Cycles per iteration of each block, by index; a block llvm-mca rejects is left out."""
    pending, untimed = dict(texts), set()
    while pending:
        source, starts = [".syntax unified", ".thumb"] if core.triple.startswith("thumb") else [], []
        for index, text in pending.items():
            starts.append((len(source) + 1, index))
            timed = [core.timed_as(i) for i in text if _mnemonic(i) not in untimed]
            source += [f"# LLVM-MCA-BEGIN b{index}", *(timed or ["nop"]), "# LLVM-MCA-END"]
        with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
            f.write("\n".join(source) + "\n")
        try:
            done = subprocess.run(["llvm-mca", f"-mtriple={core.triple}", f"-mcpu={core.name}",
                                   f"-iterations={ITERATIONS}", "-instruction-info=false", "-resource-pressure=false",
                                   f.name], capture_output=True, text=True, check=False)
        finally:
            Path(f.name).unlink()
        if done.returncode == 0:
            cycles = _parse(done.stdout)
            missing = [i for i in pending if i not in cycles]
            if missing and len(pending) == 1:
                text = pending[missing[0]]
                raise DeviceError(f"llvm-mca gave no summary for a block of {len(text)} instructions on {core.name}: "
                                  f"{'; '.join(text[:12])}{' ...' if len(text) > 12 else ''}")
            # a region a batch's report left out (seen once on the M7, not reproduced) is timed alone
            alone = {i: v for i in missing for i, v in _mca(core, {i: pending[i]}).items()}
            # what was left out counts one cycle an instruction (a block of nothing else ran as one nop)
            return {**{i: cycles[i] - (not any(_mnemonic(x) not in untimed for x in text))
                       + sum(_mnemonic(x) in untimed for x in text) for i, text in pending.items() if i in cycles},
                    **alone}
        unsupported = UNSUPPORTED.search(done.stderr)
        if unsupported and unsupported[1] not in untimed:
            untimed.add(unsupported[1])
            continue
        bad = {max((index for start, index in starts if start <= int(m[1])), default=None)
               for m in MCA_ERROR.finditer(done.stderr)} - {None}
        if not bad:
            raise DeviceError(f"llvm-mca failed for {core.name}: {done.stderr.strip()[-400:]}")
        pending = {i: t for i, t in pending.items() if i not in bad}
    return {}


def _parse(report: str) -> dict[int, float]:
    """llvm-mca's summary of each code region: total cycles over iterations."""
    found, region, iterations = {}, None, None
    for line in report.splitlines():
        if m := REGION.match(line.strip()):
            region, iterations = int(m[1]), None
        elif line.startswith("Iterations:"):
            iterations = int(line.split()[1])
        elif line.startswith("Total Cycles:") and region is not None and iterations:
            found[region] = int(line.split()[2]) / iterations
    return found


def block_cycles(core: Core, blocks: Iterable[Block]) -> dict[Block, tuple[float, bool]]:
    """Cycles per execution of each block and whether the core's model timed it (else one per instruction)."""
    require("llvm-mc", "llvm-mca")
    path = _cache_file(core)
    cached = _read_cache(path)
    blocks = list(dict.fromkeys(blocks))
    todo = [b for b in blocks if _key(b) not in cached]
    if todo:
        texts = disassemble(core, todo)
        timed = _mca(core, {i: t for i, t in enumerate(texts) if t})
        new = {_key(b): [timed[i], True] if i in timed else [float(b.instructions), False] for i, b in enumerate(todo)}
        with cache_lock(path):  # what another process added meanwhile is kept
            cached = {**_read_cache(path), **new}
            write_text(path, json.dumps(cached, sort_keys=True))
    return {b: tuple(cached[_key(b)]) for b in blocks}

"""The cycle engine (pipeline/cycles): the block-profile plugin's counts on guest loops of known length, in system
mode (Cortex-M, marks by a function) and user mode (aarch64 Linux, marks by a syscall); llvm-mca's figures and
how its report is read; blocks it cannot time; a missing tool; and the same figures twice, with the host busy."""

import shutil
import struct
import subprocess
from collections import Counter

import numpy as np
import onnx
import pytest
from helpers import busy_host
from onnx import TensorProto, helper, numpy_helper

from pipeline.cycles import core_named, estimate_segments, plugin_path, read_profile
from pipeline.cycles.join import joined, transfers_control
from pipeline.cycles.mca import _parse, block_cycles
from pipeline.cycles.plugin import plugin_arg
from pipeline.cycles.profile import Block, Profile
from pipeline.cycles.tools import MissingTool, missing, require
from pipeline.tflm.build import CPUS

pytestmark = pytest.mark.cycles


def needs(*tools):
    why = missing(*tools)
    if why:
        pytest.skip(why)


# ---- the plugin on guests of known length ---------------------------------------------------------------

THUMB_GUEST = """
    .syntax unified
    .thumb
    .section .vectors, "a"
    .word 0x20010000
    .word reset + 1
    .text
    .thumb_func
    .global cycle_mark
cycle_mark:
    bx lr
    .thumb_func
reset:
    bl cycle_mark
{code}
    bl cycle_mark
    ldr r1, =exit_block
    movs r0, #0x20
    bkpt 0xab
2:  b 2b
    .align 2
exit_block:
    .word 0x20026, 0
    .ltorg
"""
THUMB_LOOP = """
    ldr r0, ={n}
1:  subs r0, #1
    bne 1b
"""
PLACED_LOOP = """
    ldr r0, =1000
    b 1f
    .org {at}
1:  adds r1, r1, r0
    eors r2, r2, r1
    mul r3, r2, r1
    adds r1, r1, r3
    eors r2, r2, r1
    mul r3, r2, r1
    subs r0, #1
    bne 1b
"""
LINK = "MEMORY { FLASH (rx) : ORIGIN = 0, LENGTH = 4M }\nSECTIONS { .text : { KEEP(*(.vectors)) *(.text*) } > FLASH }\n"


def _run_thumb(folder, code, cpu):
    """`code` between two marks in a bare-metal guest on `cpu`'s emulated board; the plugin's profile."""
    needs("arm-none-eabi-gcc", "qemu-system-arm", "gcc")
    folder.mkdir(exist_ok=True)
    (folder / "loop.S").write_text(THUMB_GUEST.format(code=code))
    (folder / "link.ld").write_text(LINK)
    subprocess.run(["arm-none-eabi-gcc", f"-mcpu={cpu}", "-mthumb", "-nostdlib", "-nostartfiles", "-T", "link.ld",
                    "-o", "loop.elf", "loop.S"], cwd=folder, check=True)
    mark = int(subprocess.run(["arm-none-eabi-nm", "loop.elf"], cwd=folder, capture_output=True, text=True,
                              check=True).stdout.split(" T cycle_mark")[0].split()[-1], 16)
    subprocess.run(["qemu-system-arm", "-M", CPUS[cpu].machine, "-cpu", cpu, "-display", "none", "-monitor", "none",
                    "-semihosting-config", "enable=on,target=native", "-icount", "shift=0",
                    "-plugin", plugin_arg(plugin_path(), folder / "p.txt", mark=mark), "-kernel", "loop.elf"],
                   cwd=folder, check=True, timeout=60)
    return read_profile(folder / "p.txt")


@pytest.mark.parametrize("n", [1, 1000])
def test_plugin_counts_a_known_thumb_loop_exactly_between_function_marks(tmp_path, n):
    profile = _run_thumb(tmp_path, THUMB_LOOP.format(n=n), "cortex-m4")
    assert profile.marks == 2
    # the mark's return, ldr + subs + bne, the loop's subs + bne n - 1 more times, the bl to the second mark
    (between,) = estimate_segments(profile, core_named("cortex-m4"), [[1]])
    assert between.instructions == 1 + 3 + 2 * (n - 1) + 1
    assert between.unmodelled_instructions == 0 and between.cycles > between.instructions * 0.5


@pytest.mark.parametrize("cpu", ["cortex-m4", "cortex-m7"])
def test_a_loop_costs_the_same_wherever_the_linker_puts_it(tmp_path, cpu):
    """QEMU cuts a block at each 1 KiB guest page: a loop across a page boundary ran as two blocks, each timed on its
    own (one model's firmware estimated 1.3% apart on the M7 with its code moved by 8 bytes)."""
    needs("llvm-mc", "llvm-mca")
    # .org counts from the section's start, 8 bytes (the vectors) into flash: the loop's third instruction, a 32-bit
    # mul, ends at 0x400
    inside = _run_thumb(tmp_path / "inside", PLACED_LOOP.format(at="0x500"), cpu)
    across = _run_thumb(tmp_path / "across", PLACED_LOOP.format(at="0x3f0"), cpu)
    assert any(b.address + sum(b.sizes) == 0x400 for b in across.blocks.values())  # QEMU did cut the loop
    core = core_named(cpu)
    (here,), (there,) = estimate_segments(inside, core, [[1]]), estimate_segments(across, core, [[1]])
    # the mark's return, ldr + b, the loop's eight instructions 1000 times, the bl to the second mark
    assert here.instructions == there.instructions == 1 + 2 + 8 * 1000 + 1
    assert here.cycles == there.cycles


@pytest.mark.parametrize(("instruction", "moves"), [
    ("bne.w\t#-20", True), ("bls\t#8", True), ("b.ne\t#-8", True), ("cbz\tr0, #4", True), ("bl\t#100", True),
    ("blx\tr3", True), ("ret", True), ("tbnz\tw0, #3, #8", True), ("bkpt\t#0xab", True), ("svc\t#0", True),
    ("pop\t{r4, r5, pc}", True), ("ldmia.w\tsp!, {r4, pc}", True), ("ldr.w\tpc, [sp], #4", True),
    ("mov\tpc, lr", True),
    ("pop.w\t{r4, lr}", False), ("ldr\tr0, [pc, #8]", False), ("bics\tr0, r1", False), ("bfi\tr0, r1, #2, #3", False),
    ("bsl\tv0.16b, v1.16b, v2.16b", False), ("adds\tr0, #1", False), ("ror.w\tr4, r1, #8", False),
])
def test_what_ends_a_block_by_moving_elsewhere(instruction, moves):
    assert transfers_control(instruction) is moves


def _synthetic(counts: list[dict[int, int]], blocks: dict[int, Block]) -> Profile:
    return Profile(blocks, tuple(Counter(c) for c in counts))


def test_a_block_cut_at_a_page_is_joined_to_the_block_it_runs_on_into():
    needs("llvm-mc")
    core = core_named("cortex-m7")
    head = Block(bytes.fromhex("01300130"), (2, 2), 0x3FC)  # adds r0, #1 twice, up to the page's end
    tail = Block(bytes.fromhex("0139" "fcd1"), (2, 2), 0x400)  # subs r1, #1; bne back to the head
    after = Block(bytes.fromhex("0130"), (2,), 0x404)
    # the head ran 10 times into the tail; the tail was entered 5 more times by a branch to 0x400
    done = joined(_synthetic([{0: 10, 1: 15, 2: 1}], {0: head, 1: tail, 2: after}), core)
    (counts,) = done.segments
    whole = {done.blocks[b]: n for b, n in counts.items()}
    assert whole == {Block(head.code + tail.code, (2, 2, 2, 2)): 10, tail: 5, after: 1}
    assert sum(n * done.blocks[b].instructions for b, n in counts.items()) == 10 * 2 + 15 * 2 + 1
    # under -icount QEMU also translates a shorter copy of the tail to stop at a deadline, run once: the head stays
    # joined to the tail that ran on from it the other times, the copy stays alone
    short = Block(bytes.fromhex("0139"), (2,), 0x400)
    done = joined(_synthetic([{0: 10, 1: 14, 3: 1}], {0: head, 1: tail, 3: short}), core)
    (counts,) = done.segments
    assert {done.blocks[b]: n for b, n in counts.items()} == {Block(head.code + tail.code, (2, 2, 2, 2)): 10, tail: 4,
                                                               short: 1}
    # the same code translated twice (after a flush) is one block
    again = joined(_synthetic([{0: 4, 1: 3, 2: 6}], {0: head, 1: tail, 2: Block(tail.code, tail.sizes, 0x400)}), core)
    assert {again.blocks[b]: n for b, n in again.segments[0].items()} == {Block(head.code + tail.code, (2, 2, 2, 2)): 4,
                                                                          tail: 5}


MAGIC = 0xC7C1E5
AARCH64_MARK = """
    mov x0, #-1
    movz x1, #0xc1e5
    movk x1, #0xc7, lsl #16
    mov x2, #0
    mov x8, #62
    svc #0
"""  # lseek(-1, MAGIC, SEEK_SET): six instructions
AARCH64_LOOP = """
    .globl _start
_start:
{mark}
    movz x3, #{n}
1:  subs x3, x3, #1
    b.ne 1b
{mark}
    mov x0, #0
    mov x8, #93
    svc #0
"""


def _aarch64_executable(code: bytes) -> bytes:
    """A static ELF64 executable of one loadable segment: header, program header, then the code (entry)."""
    base, start = 0x400000, 64 + 56
    size = start + len(code)
    header = struct.pack("<4s5B7x2H I3Q I6H", b"\x7fELF", 2, 1, 1, 0, 0, 2, 183, 1, base + start, 64, 0, 0,
                         64, 56, 1, 0, 0, 0)
    segment = struct.pack("<2I6Q", 1, 5, 0, base, base, size, size, 0x1000)
    return header + segment + code


@pytest.mark.parametrize("n", [1, 1000])
def test_plugin_counts_a_known_aarch64_loop_exactly_between_syscall_marks(tmp_path, n):
    needs("qemu-aarch64", "llvm-mc", "llvm-objcopy", "gcc")
    (tmp_path / "loop.s").write_text(AARCH64_LOOP.format(n=n, mark=AARCH64_MARK))
    subprocess.run(["llvm-mc", "-triple=aarch64", "-filetype=obj", "-o", "loop.o", "loop.s"], cwd=tmp_path, check=True)
    subprocess.run(["llvm-objcopy", "-O", "binary", "--only-section=.text", "loop.o", "loop.bin"], cwd=tmp_path, check=True)
    (tmp_path / "loop").write_bytes(_aarch64_executable((tmp_path / "loop.bin").read_bytes()))
    (tmp_path / "loop").chmod(0o755)
    subprocess.run(["qemu-aarch64", "-plugin", plugin_arg(plugin_path(), tmp_path / "p.txt", syscall=62, magic=MAGIC),
                    "./loop"], cwd=tmp_path, check=True, timeout=60)
    profile = read_profile(tmp_path / "p.txt")
    assert profile.marks == 2
    # movz + subs + b.ne, the loop n - 1 more times, then the second mark's six instructions up to its svc
    (between,) = estimate_segments(profile, core_named("cortex-a72"), [[1]])
    assert between.instructions == 3 + 2 * (n - 1) + 6


# ---- llvm-mca -------------------------------------------------------------------------------------------

MCA_REPORT = """
[0] Code Region - b3

Iterations:        100
Instructions:      200
Total Cycles:      103
Total uOps:        200

[1] Code Region - b7

Iterations:        100
Instructions:      400
Total Cycles:      145
"""


def test_llvm_mca_regions_are_read_as_cycles_per_iteration():
    assert _parse(MCA_REPORT) == {3: 1.03, 7: 1.45}


def test_a_region_a_batch_report_leaves_out_is_timed_alone(tmp_path, monkeypatch):
    """Once, on the M7, llvm-mca's report of a batch held one region fewer than it was given (not reproduced):
    such a block is timed in a run of its own, to the cycles it gets in a batch."""
    needs("llvm-mc", "llvm-mca")
    blocks = [Block(bytes.fromhex("01300130"), (2, 2)), Block(bytes.fromhex("0130"), (2,)),
              Block(bytes.fromhex("4ff00000"), (4,))]
    monkeypatch.setenv("CNN_DEPLOY_CACHE", str(tmp_path / "whole"))
    whole = block_cycles(core_named("cortex-m7"), blocks)
    real = subprocess.run

    def losing_the_first_region(command, *args, **kwargs):
        done = real(command, *args, **kwargs)
        if command[0] == "llvm-mca" and done.stdout.count("Code Region - b") > 1:
            first = done.stdout.index("Code Region - b")
            done.stdout = done.stdout[:first] + done.stdout[done.stdout.index("Code Region - b", first + 1):]
        return done

    monkeypatch.setattr("pipeline.cycles.mca.subprocess.run", losing_the_first_region)
    monkeypatch.setenv("CNN_DEPLOY_CACHE", str(tmp_path / "lossy"))
    assert block_cycles(core_named("cortex-m7"), blocks) == whole


def test_known_blocks_take_the_cycles_of_the_cores_model():
    needs("llvm-mc", "llvm-mca")
    adds = Block(bytes.fromhex("01300130"), (2, 2))  # adds r0, #1 twice: dependent, one a cycle
    call = Block(bytes.fromhex("00f032f8"), (4,))  # bl: timed as the branch it costs (llvm-mca says 100 cycles)
    a64 = Block(bytes.fromhex("2000028b" "00040091"), (4, 4))  # add x0, x1, x2; add x0, x0, #1
    undecodable = Block(bytes.fromhex("ffffffff" "00040091"), (4, 4))
    m4 = block_cycles(core_named("cortex-m4"), [adds, call])
    assert m4[adds] == (2.01, True) and m4[call][1] and m4[call][0] < 5
    a72 = block_cycles(core_named("cortex-a72"), [a64, undecodable])
    assert a72[a64] == (1.03, True)
    assert a72[undecodable] == (2.0, False)  # counted one cycle per instruction, and said so


def test_thumb_instructions_are_split_by_their_encoding_not_by_qemus_lengths():
    # QEMU 7.2 reports a Thumb block's last instruction with a peek at the next one: cmp r0, #0 + half of a bl
    core = core_named("cortex-m4")
    assert core.split(bytes.fromhex("002800f0"), 1) == [bytes.fromhex("0028")]
    assert core.split(bytes.fromhex("00f032f8" "0130"), 2) == [bytes.fromhex("00f032f8"), bytes.fromhex("0130")]
    assert core.timed_as("bl\t#100") == "b.w\t#100" and core.timed_as("blx\tr3") == "bx\tr3"


def test_a_missing_tool_is_one_error_naming_the_apt_command(monkeypatch):
    monkeypatch.setattr("pipeline.cycles.tools.shutil.which", lambda tool: None)
    with pytest.raises(MissingTool, match=r"needs qemu-aarch64, llvm-mca, not installed here; run: "
                                          r"apt-get install -y qemu-user llvm$"):
        require("qemu-aarch64", "llvm-mca")
    assert "apt-get install -y llvm" in missing("llvm-mc")


# ---- determinism ----------------------------------------------------------------------------------------

def _int8_conv_model(folder):
    """A conv + ReLU quantized by the project's chain: what `make regress` gates is an int8 artefact."""
    from pipeline.onnx.quantize import quantize_onnx
    from targets import Quantization

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(16, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "conv.onnx")
    calibration = rng.normal(size=(8, 3, 16, 16)).astype(np.float32)
    return quantize_onnx(folder / "conv.onnx", folder / "conv.int8.onnx", calibration=calibration,
                         settings=Quantization())


@pytest.mark.device
def test_the_same_model_gives_the_same_cycles_twice_and_with_the_host_busy(tmp_path):
    needs("qemu-aarch64", "llvm-mca", "gcc")
    if shutil.which("mmdebstrap") is None:
        pytest.skip("the emulated Pi needs mmdebstrap (.ci/run installs it)")
    from pipeline.device.board_cycles import onnx_cycles

    model = _int8_conv_model(tmp_path)
    sample = np.random.default_rng(1).normal(size=(3, 16, 16)).astype(np.float32)

    def fresh():
        shutil.rmtree(plugin_path().parent / "onnx", ignore_errors=True)  # the guest runs again, not the cache
        (figures,) = onnx_cycles([model], sample=sample, core="cortex-a72", clock_mhz=1500)
        assert not figures["cached"]
        return figures["instructions"], figures["cycles"]

    idle = fresh()
    with busy_host():
        busy = fresh()
    # ONNX Runtime under qemu-user moves a small model's count by up to ~6e-4 with the host loaded (seen here:
    # 117,692 idle against 117,764 with two burners and a training run), inside the regression gate's 0.5%
    assert idle[0] > 10_000 and all(abs(b - i) <= 2e-3 * i for i, b in zip(idle, busy, strict=True))
    (again,) = onnx_cycles([model], sample=sample, core="cortex-a72", clock_mhz=1500)
    assert again["cached"] and again["instructions"] == busy[0] and again["ms"] == round(busy[1] / 1.5e6, 4)

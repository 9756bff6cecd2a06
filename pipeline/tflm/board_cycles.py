"""Estimated cycles of a firmware run: one inference, and each operator of the first inference.

The harness calls `cycle_mark()` before and after every inference, and around every operator while its
profiler records (the first inference), so with L operators and n inferences the plugin sees 2L + 2n marks:
the first inference's operator j lies in segment 2 + 2j, and inference i >= 1 in segment 2L + 2i + 1. The
figure per inference is the median over inferences after the first (which also runs the profiler).
"""

from pipeline.cycles import board_figures, core_named, estimate_segments
from pipeline.errors import DeviceError
from pipeline.tflm.emulator import FirmwareRun

CYCLE_TOOLS = ("llvm-mc", "llvm-mca", "gcc")  # besides the firmware toolchain: the model, and the plugin's compiler


def firmware_cycles(run: FirmwareRun, *, cpu: str, clock_mhz: float, shapes: list[dict] | None = None) -> dict:
    """report.json's board figures for a run made with `profile_blocks`: the core is the firmware's CPU. `shapes`
    (`firmware.operator_shapes`, in the same order) adds each operator's kernel and MACs."""
    profile, layers, n = run.profile, len(run.layers), len(run.instructions)
    if profile is None or profile.marks != 2 * layers + 2 * n:
        got = "no profile" if profile is None else f"{profile.marks} marks"
        raise DeviceError(f"The block profile of the firmware run has {got}; expected {2 * layers + 2 * n} for {n} "
                          f"inferences of {layers} operators: the harness and the plugin disagree")
    inferences = [[2 * layers + 2 * i + 1] for i in range(1, n)] or [list(range(1, 2 * layers + 2))]
    operators = [[2 + 2 * j] for j in range(layers)]
    core = core_named(cpu)
    costs = estimate_segments(profile, core, inferences + operators)
    steady = costs[:len(inferences)]
    middle = sorted(steady, key=lambda c: c.cycles)[len(steady) // 2]
    ops = [{"op": tag, "instructions": c.instructions, "cycles": c.cycles}
           for (tag, _), c in zip(run.layers, costs[len(inferences):], strict=True)]
    if shapes is not None and [s["op"] for s in shapes] == [op["op"] for op in ops]:
        ops = [{**op, "kernel": s["kernel"], "macs": s["macs"]} for op, s in zip(ops, shapes, strict=True)]
    return board_figures(middle, core=core, clock_mhz=clock_mhz, operators=ops,
                         cycles_range=[min(c.cycles for c in steady), max(c.cycles for c in steady)])

"""Never worse without saying so: where the factored int8 model costs more than the dense int8 one on the
target (file or flash, arena, peak activation, latency or instructions), with the layers responsible.

`passed` stays the accuracy verdict; these are `warnings` in report.json and on the console.
"""

from collections.abc import Mapping

from pipeline.compress.plan import DecompositionPlan
from pipeline.metrics import VariantReport


def _few(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "") if names else "none"


def worse_than_dense(variants: Mapping[str, VariantReport], plan: DecompositionPlan, *,
                     intermediate_bytes: Mapping[str, int], latency_tolerance: float) -> list[str]:
    """One sentence per resource where factored_int8 exceeds dense_int8. `intermediate_bytes`: for each
    factored layer, its chain's largest inner int8 tensor (what a factorisation adds to activation memory).
    `latency_tolerance`: the share by which a wall-clock latency may exceed the dense one as timing noise
    (instruction counts are exact and get none)."""
    dense, factored = variants["dense_int8"], variants["factored_int8"]
    warnings = []
    grown = [p.name for p in plan.layers if p.method and p.params_after > p.params_before]
    if factored.bytes > dense.bytes:
        what = "flash" if "flash_bytes" in factored.details else "file"
        warnings.append(f"{what} size: the factored int8 model is {factored.bytes:,} B against {dense.bytes:,} B dense "
                        f"(+{factored.bytes / dense.bytes - 1:.1%}); layers whose parameters grew: {_few(grown)}; "
                        "the rest is the added layers' scales, biases and operator records")
    inner = [name for name, _ in sorted(intermediate_bytes.items(), key=lambda item: -item[1])]
    if factored.peak_activation_bytes > dense.peak_activation_bytes:
        warnings.append(f"peak activation: {factored.peak_activation_bytes:,} B against {dense.peak_activation_bytes:,} B "
                        f"dense; largest tensors inside factored layers: "
                        f"{_few([f'{n} ({intermediate_bytes[n]:,} B)' for n in inner], 3)}")
    if factored.details.get("arena_bytes", 0) > dense.details.get("arena_bytes", float("inf")):
        largest = ", ".join(f"{name} {size:,} B" for name, size in factored.details.get("largest_tensors", []))
        warnings.append(f"arena: TFLM needs {factored.details['arena_bytes']:,} B against "
                        f"{dense.details['arena_bytes']:,} B dense; largest tensors: {largest}")
    board_f, board_d = factored.details.get("firmware"), dense.details.get("firmware")
    slower = [f"{p.name} ({p.latency:,.4g} vs {p.dense_latency:,.4g})" for p in plan.layers
              if p.method and p.latency is not None and p.dense_latency is not None and p.latency > p.dense_latency]
    measured = dense.latency_source == "measured"  # a board's own timing outranks any estimate
    if factored.board and dense.board and not measured:  # estimated on the board's core: exact, no tolerance
        if factored.board["cycles"] > dense.board["cycles"]:
            warnings.append(f"estimated cycles on the {factored.board['core']}: {factored.board['cycles']:,} per "
                            f"inference against {dense.board['cycles']:,} dense "
                            f"(+{factored.board['cycles'] / dense.board['cycles'] - 1:.1%}); factored layers slower "
                            f"than their dense layer: {_few(slower)}")
    elif board_f and board_d and board_f["instructions"] > board_d["instructions"]:
        warnings.append(f"instructions on {board_f['cpu']}: {board_f['instructions']:,} per inference against "
                        f"{board_d['instructions']:,} dense; factored layers slower than their dense layer: {_few(slower)}")
    elif not board_f and factored.latency_ms > dense.latency_ms * (1 + latency_tolerance):
        where = dense.latency_on or f"{dense.machine}, {dense.runtime}"
        timed = any(p.latency is not None for p in plan.layers)
        warnings.append(f"latency: {factored.latency_ms:.4g} ms per inference against {dense.latency_ms:.4g} ms dense "
                        f"(+{factored.latency_ms / dense.latency_ms - 1:.1%}, timed on {where}); "
                        + ((f"factored layers measured slower than their dense layer: {_few(slower)}" if slower else
                            "no factored layer measured slower alone: the added operators' per-call overhead is the "
                            "difference") if timed else
                           "layers not timed one by one (a budget with a latency weight, or BUDGET=latency:..., "
                           "times them and avoids the slow ones)"))
    return warnings

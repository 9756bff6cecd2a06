"""A budget checked on what was deployed: the allocation predicted each constraint from per-layer costs and the
arena estimate; the whole int8 models measured after export say whether it held. The measured figures are
recorded in the allocation (report.json `decomposition.allocation`), and a miss is a warning with both figures."""

import math

from pipeline.metrics import VariantReport
from targets.budget import parse_budget


def check_cycles(allocation: dict | None, variants: dict[str, VariantReport]) -> list[str]:
    """A cycle budget is the whole int8 model's: the board's estimate of the two deployed int8 models."""
    dense, factored = (variants[n].board for n in ("dense_int8", "factored_int8"))
    if not allocation or "cycles" not in parse_budget(allocation["budget"]).resources or not dense or not factored:
        return []
    kept = factored["cycles"] / dense["cycles"]
    allocation["whole_model_kept"] = round(kept, 4)
    fraction = parse_budget(allocation["budget"]).get("cycles").fraction
    if kept <= fraction:
        return []
    # four decimals: a miss by less than a thousandth would read as the budget itself at three
    suggested = math.floor((fraction - (kept - min(allocation["kept"], fraction))) * 1e4) / 1e4
    return [f"budget {allocation['budget']} missed on the whole model: factored int8 {factored['cycles']:,} estimated "
            f"cycles = {kept:.4f} of dense int8 {dense['cycles']:,} (the per-layer costs predicted "
            f"{allocation['kept']:.4f}); cycles:{suggested:g} leaves room for that error"]


def measured_arena(variant: VariantReport) -> tuple[int, str]:
    """The variant's activation memory as measured, and by what: on a microcontroller the arena TFLM with CMSIS-NN
    used on the emulated board, else the host TFLM's recording allocator; on a Linux board the int8 graph's peak
    activation bytes."""
    firmware = variant.details.get("firmware") or {}
    if firmware.get("arena_used_bytes"):
        return int(firmware["arena_used_bytes"]), "arena used by the firmware (TFLM + CMSIS-NN, emulated board)"
    if "arena_bytes" in variant.details:
        return int(variant.details["arena_bytes"]), "TFLM arena (host interpreter's recording allocator)"
    return int(variant.peak_activation_bytes), "peak activation memory of the int8 graph"


def check_arena(allocation: dict | None, variants: dict[str, VariantReport]) -> list[str]:
    """The arena constraint against the deployed models' measured arenas (a fraction is of the dense model's)."""
    if not allocation or "arena" not in allocation.get("estimated", {}):
        return []
    constraint = parse_budget(allocation["budget"]).get("arena")
    factored, how = measured_arena(variants["factored_int8"])
    dense, _ = measured_arena(variants["dense_int8"])
    limit = constraint.limit(dense)
    allocation["arena"] = {"estimated": allocation["estimated"]["arena"], "dense_estimated": allocation["totals"]["arena"],
                           "measured": factored, "dense_measured": dense, "limit": round(limit), "measured_as": how}
    if factored <= limit:
        return []
    return [f"budget {allocation['budget']} missed on the arena: factored int8 needs {factored:,} B ({how}) against "
            f"{limit:,.0f} B allowed (dense {dense:,} B; the estimate was {allocation['estimated']['arena']:,.0f} B)"]

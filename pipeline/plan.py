"""The decomposition plan: what was done to each layer and why, as a table and as JSON."""

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LayerPlan:
    name: str
    kind: str  # Conv2d, Linear, or the type of a layer left alone
    method: str | None  # what was applied; None when the layer stays dense
    ranks: tuple[int, ...]
    rank_rule: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    rel_error: float | None  # ||W - W_hat|| / ||W||
    note: str = ""  # why it was skipped or chosen, or what happened on the way (a CP retry or fallback)
    output_error: float | None = None  # ||y - y_hat|| / ||y|| of the layer's output on calibration images


@dataclass(frozen=True)
class Choice:
    """What the budget allocation picked for one layer, and why."""

    method: str | None  # None: keep the layer dense
    ranks: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class DecompositionPlan:
    requested_method: str
    rank_rule: str
    round_to: int
    layers: tuple[LayerPlan, ...]
    seconds: float

    @property
    def macs_before(self) -> int:
        return sum(layer.macs_before for layer in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(layer.macs_after for layer in self.layers)

    def to_dict(self) -> dict:
        return {"requested_method": self.requested_method, "rank_rule": self.rank_rule, "round_to": self.round_to,
                "seconds": round(self.seconds, 3), "macs_before": self.macs_before, "macs_after": self.macs_after,
                "layers": [asdict(layer) for layer in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        if not self.layers:
            return "no Conv2d or Linear layers: nothing to factor, the model stays dense"
        rows = [("layer", "method", "ranks", "MACs before", "MACs after", "params after", "weight err.", "output err.",
                 "note")]
        for p in self.layers:
            rows.append((p.name, p.method or "dense", "x".join(map(str, p.ranks)) or "-", f"{p.macs_before:,}",
                         f"{p.macs_after:,}", f"{p.params_after:,}",
                         "-" if p.rel_error is None else f"{p.rel_error:.4f}",
                         "-" if p.output_error is None else f"{p.output_error:.4f}", p.note))
        kept = self.macs_after / self.macs_before if self.macs_before else 1.0
        rows.append(("total", "", "", f"{self.macs_before:,}", f"{self.macs_after:,}", "", "", "",
                     f"{kept:.1%} of MACs kept; {self.seconds:.1f} s"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

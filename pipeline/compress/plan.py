"""The decomposition plan: what was done to each layer and why, as data (to_dict / from_dict) and as a table."""

import json
from dataclasses import asdict, dataclass, fields

from pipeline.util import markdown_table


@dataclass(frozen=True)
class Choice:
    """What the budget allocation picked for one layer, why, and the measurements it picked by."""

    method: str | None  # None: keep the layer dense
    ranks: tuple[int, ...]
    reason: str
    kl: float | None = None  # mean KL(dense || this layer factored alone) on held-out images, nats
    agreement: float | None = None  # top-1 agreement with the dense model on them
    latency: float | None = None  # the chosen layer or chain alone on the target's runtime (unit in the allocation)
    dense_latency: float | None = None  # the same for the dense layer it replaces


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
    # the budget allocation's measurements of the choice (None without a budget): see `Choice`
    kl: float | None = None
    agreement: float | None = None
    latency: float | None = None
    dense_latency: float | None = None
    channels: tuple[int, int] | None = None  # (input, output) channels kept where a channel cut touched the layer
    channels_before: tuple[int, int] | None = None  # the dense layer's
    live_bytes: int | None = None  # activation bytes alive while it runs (estimated, int8), when the arena was planned
    arena_share: float | None = None  # live_bytes as a share of the planned activations


@dataclass(frozen=True)
class DecompositionPlan:
    requested_method: str
    rank_rule: str
    round_to: int
    layers: tuple[LayerPlan, ...]
    seconds: float
    cuts: dict | None = None  # channel group -> the channels it kept (indices into the dense layer's), when pruned

    @property
    def macs_before(self) -> int:
        return sum(layer.macs_before for layer in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(layer.macs_after for layer in self.layers)

    def to_dict(self) -> dict:
        return {"requested_method": self.requested_method, "rank_rule": self.rank_rule, "round_to": self.round_to,
                "seconds": round(self.seconds, 3), "macs_before": self.macs_before, "macs_after": self.macs_after,
                "layers": [asdict(layer) for layer in self.layers], "cuts": self.cuts}

    @classmethod
    def from_dict(cls, data: dict) -> "DecompositionPlan":
        known = {f.name for f in fields(LayerPlan)}
        def row(layer: dict) -> LayerPlan:
            fields_ = {k: v for k, v in layer.items() if k in known}
            for key in ("channels", "channels_before"):
                if fields_.get(key) is not None:
                    fields_[key] = tuple(fields_[key])
            return LayerPlan(**{**fields_, "ranks": tuple(layer["ranks"])})

        return cls(data["requested_method"], data["rank_rule"], data["round_to"], tuple(map(row, data["layers"])),
                   data["seconds"], data.get("cuts"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self, cost_unit: str | None = None) -> str:
        """The plan as a markdown table; with `cost_unit` (the allocation's, e.g. "estimated cortex-a72 cycles")
        each layer's cost alone on the target before and after, where it was measured."""
        if not self.layers:
            return "no Conv2d or Linear layers: nothing to factor, the model stays dense"
        costs = cost_unit is not None and any(p.dense_latency is not None for p in self.layers)
        what = "cycles" if costs and "cycles" in cost_unit else "host ms"
        cut = any(p.channels for p in self.layers)
        live = any(p.live_bytes for p in self.layers)
        head = ("layer", "method", *(("channels kept",) if cut else ()), "ranks", "MACs before", "MACs after",
                "params after", *((f"{what} before", f"{what} after") if costs else ()),
                *(("arena (live B, share)",) if live else ()), "weight err.", "output err.", "note")
        rows = [(p.name, _method(p), *((_channels(p),) if cut else ()), "x".join(map(str, p.ranks)) or "-",
                 f"{p.macs_before:,}", f"{p.macs_after:,}", f"{p.params_after:,}",
                 *((_cost(p.dense_latency, what),
                    _cost(p.latency if p.method or p.channels != p.channels_before else p.dense_latency, what))
                   if costs else ()),
                 *((f"{p.live_bytes:,} ({p.arena_share:.0%})" if p.live_bytes else "-",) if live else ()),
                 _figure(p.rel_error), _figure(p.output_error), p.note)
                for p in self.layers]
        kept = self.macs_after / self.macs_before if self.macs_before else 1.0
        rows.append(("total", "", *(("",) if cut else ()), "", f"{self.macs_before:,}", f"{self.macs_after:,}", "",
                     *(("", "") if costs else ()), *(("",) if live else ()), "", "",
                     f"{kept:.1%} of MACs kept; {self.seconds:.1f} s"))
        table = markdown_table(head, rows)
        return f"{table}\n\n{what} before / after: each layer alone, {cost_unit}" if costs else table


def _cost(value: float | None, what: str = "cycles") -> str:
    """Cycles as whole numbers (5,964,610, not 5.96461e+06); host milliseconds to four significant digits."""
    if value is None:
        return "-"
    return f"{round(value):,}" if what == "cycles" else f"{value:,.4g}"


def _method(p: "LayerPlan") -> str:
    if p.method:
        return f"prune + {p.method}" if p.channels and p.channels != p.channels_before else p.method
    if p.channels and 0 in p.channels:
        return "removed"
    return "prune" if p.channels and p.channels != p.channels_before else "dense"


def _channels(p: "LayerPlan") -> str:
    if not p.channels:
        return "-"
    return f"{p.channels[0]}/{p.channels_before[0]} -> {p.channels[1]}/{p.channels_before[1]}"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"

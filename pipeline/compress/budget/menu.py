"""What a channel cut costs: whole-model MACs, parameters, the board's cycles and the arena of a selection whose
channel groups change the shapes of the layers they touch.

Every layer a group touches is priced at each shape the groups can give it (input and output channels kept): MACs
and parameters counted on the shape, cycles measured on it by the target's layer cost (the same emulated-board
tables as the factorisations'). Two things the tables miss are fitted once per model on cut models measured whole
(`fit_rates`): the operators between the layers (adds, pools, means, pads), which shrink with the cuts and which no
table prices (`between_rate`, cycles per element they move), and what a layer timed alone pays at its edges and the
whole model does not (`io_rate`, per element a layer reads or writes: on ONNX Runtime each layer alone quantizes its
float input and dequantizes its output, so the tables promise a cut more than it saves and the rate is negative).
Measured on ResNet-8 at its smallest and largest cuts, the prediction is within 0.0002 of the dense cycles on the M4
(the tables alone: 0.071 high) and 0.013 on the A72 (the tables alone: 0.19 low).

A layer may be cut and factored at once (channel cut, then factorise): each factorisation a layer offers is also
priced at every cut shape its ranks fit (no rank above what the cut layer has, fewer MACs than the cut layer and, where
timed, fewer cycles), its chain counted and timed at that shape. Its loss is the cut's KL plus the factorisation's, both
measured alone at the dense shape: the same additivity the allocation assumes between any two units. A factorisation
whose ranks do not fit the cut its layer is given cannot be held with it (`conflicts`).
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from pipeline.compress.budget.arena import Timeline, chain_intermediates, persistent_bytes
from pipeline.compress.budget.macs import count
from pipeline.compress.budget.sensitivity import Candidate, LayerCost, layer_costs
from pipeline.compress.methods import METHODS, PRUNE
from pipeline.compress.prune import ChannelGroup, unit_name


@dataclass(frozen=True)
class Shaped:
    """A layer a group touches: which groups set its input and output channels, and its dense geometry."""

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    in_groups: tuple[str, ...]  # every group among its input channels (a concat reads several, or some and others)
    out_group: str | None
    depthwise: bool  # in and out set by one group

    @property
    def in_group(self) -> str | None:
        return self.in_groups[0] if self.in_groups else None

    @property
    def flattened(self) -> bool:
        """A linear layer reading one group's channels flattened: each channel is H*W of its input features."""
        return isinstance(self.module, nn.Linear) and len(self.in_groups) == 1

    @property
    def full(self) -> tuple[int, int]:
        m = self.module
        return (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)


def resized(layer: Shaped, cin: int, cout: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The layer at another channel count, with the input shape it then reads."""
    m = layer.module
    if isinstance(m, nn.Linear):
        return nn.Linear(cin, cout, bias=m.bias is not None), (cin,)
    groups = cin if layer.depthwise else m.groups
    conv = nn.Conv2d(cin, cout, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=groups,
                     bias=m.bias is not None, padding_mode=m.padding_mode)
    return conv, (cin, *layer.input_shape[1:])


class Pricing:
    """Whole-model costs of a selection (unit -> option) where channel groups couple the layers they touch."""

    def __init__(self, *, totals: dict[str, float], groups: list[ChannelGroup], layers: dict[str, Shaped],
                 variants: dict[tuple[str, int, int], dict[str, float]], timeline: Timeline | None = None,
                 chains: dict[tuple[str, str, tuple[int, ...]], list[int]] | None = None, persistent: dict | None = None,
                 factored: dict[tuple, dict] | None = None):
        self.totals, self.layers, self.variants = totals, layers, variants
        self.groups = {g.name: g for g in groups}
        self.touching = {unit_name(g.name): tuple(n for n, s in layers.items() if g.name in (*s.in_groups, s.out_group))
                         for g in groups}
        self.timeline, self.chains, self.persistent = timeline, chains or {}, persistent or {}
        self.between_rate = 0.0  # cycles per element the operators between the layers move (see fit_rates)
        self.io_rate = 0.0  # cycles per element a layer reads or writes that its table alone gets wrong (see fit_rates)
        self.removal_extra: dict[str, float] = {}  # per removable group, cycles its removal costs beyond the above
        # (layer, method, ranks, channels in, channels out) -> the chain's macs, params, cycles and intermediate bytes
        # at that cut shape: the factorisations a cut layer may still take
        self.factored: dict[tuple, dict] = factored or {}

    def _kept(self, selection, group: str | None, full: int) -> int:
        if group is None:
            return full
        return full * self._channels(selection, group) // self.groups[group].channels

    def _channels(self, selection, group: str) -> int:
        option = selection.get(unit_name(group))
        return option.ranks[0] if option is not None and option.method == PRUNE else self.groups[group].channels

    def _kept_in(self, selection, layer: Shaped, full: int) -> int:
        """A layer's input channels under the selection's cuts: each group among them loses what it cuts (a concat's
        other parts stay); a flattened input loses each cut channel H*W times."""
        if layer.flattened:
            return self._kept(selection, layer.in_group, full)
        return full - sum(self.groups[g].channels - self._channels(selection, g) for g in layer.in_groups)

    def shape(self, selection, name: str) -> tuple[int, int]:
        """Layer `name`'s input and output channels under the selection's cuts."""
        layer = self.layers[name]
        cin, cout = layer.full
        return self._kept_in(selection, layer, cin), self._kept(selection, layer.out_group, cout)

    def cost(self, selection, name: str) -> dict[str, float]:
        """Layer `name` as the selection has it (kept, cut, factored, or cut then factored): MACs, parameters, cycles."""
        layer, option = self.layers[name], selection.get(name)
        if option is None or option.method in (None, PRUNE):
            return self.variant(selection, name)
        shape = self.shape(selection, name)
        if shape == layer.full:
            return {"macs": option.macs, "params": option.params, "cycles": option.latency}
        return self.factored[(name, option.method, tuple(option.ranks), *shape)]

    def variant(self, selection, name: str) -> dict[str, float]:
        """Layer `name` kept dense at the shape the selection's cuts give it: its MACs, parameters and cycles."""
        return self.variants[(name, *self.shape(selection, name))]

    def _fits(self, selection, name: str, option) -> bool:
        """Whether layer `name` can be factored as `option` at the shape the selection's cuts give it."""
        shape = self.shape(selection, name)
        return shape == self.layers[name].full or (name, option.method, tuple(option.ranks), *shape) in self.factored

    def _sum(self, selection, names) -> dict[str, float]:
        found = {r: 0.0 for r in self.totals if r != "arena"}
        for name in names:
            cost = self.cost(selection, name)
            for r in found:
                found[r] += cost[r] or 0.0
        return found

    def _affected(self, name: str) -> tuple[str, ...]:
        return self.touching.get(name, (name,) if name in self.layers else ())

    def __call__(self, selection) -> dict[str, float]:
        now, base = self._sum(selection, self.layers), self._sum({}, self.layers)  # {}: every unit at its keep
        found = {r: self.totals[r] + now[r] - base[r] for r in now}
        if "cycles" in found:
            found["cycles"] += self._between(selection) - self._between({})
        return found

    def change(self, selection, moves: dict) -> dict[str, float]:
        """What the whole-model costs change by when the units in `moves` take those options."""
        names = {n for u in moves for n in self._affected(u)}
        before, after = self._sum(selection, names), self._sum({**selection, **moves}, names)
        found = {r: after[r] - before[r] for r in before}
        if "cycles" in found:
            found["cycles"] += self._between({**selection, **moves}) - self._between(selection)
        return found

    def _between(self, selection) -> float:
        """Cycles the layers' tables miss under the selection's cuts (0 where no rate was fitted): the operators
        between the layers, and the layers' edges."""
        if not (self.between_rate or self.io_rate or self.removal_extra) or self.timeline is None:
            return 0.0
        keep = self._shapes(selection)[0]
        return (self.between_rate * self.timeline.moved(keep) + self.io_rate * self.timeline.layer_io(keep)
                + sum(self.removal_extra.get(g, 0.0) for g, k in keep.items() if k == 0))

    def conflicts(self, selection, name: str, option) -> list[str]:
        """The units that cannot keep their option when `name` takes `option`: a layer's factorisation and a cut of
        its channels are held together only where the factorisation was priced at the cut shape (see `factored`)."""
        if option.method is None:
            return []
        if option.method == PRUNE:
            after = {**selection, name: option}
            return [n for n in self.touching.get(name, ()) if selection.get(n) is not None
                    and selection[n].method not in (None, PRUNE) and not self._fits(after, n, selection[n])]
        layer = self.layers.get(name)
        if layer is None or self._fits(selection, name, option):
            return []
        return [unit_name(g) for g in dict.fromkeys((*layer.in_groups, layer.out_group)) if g
                and selection.get(unit_name(g)) is not None and selection[unit_name(g)].method == PRUNE]

    def _shapes(self, selection) -> tuple[dict, dict]:
        keep = {g: selection[unit_name(g)].ranks[0] for g in self.groups
                if unit_name(g) in selection and selection[unit_name(g)].method == PRUNE}
        chains = {}
        for n, o in selection.items():
            if o.method in (None, PRUNE) or (n, o.method, tuple(o.ranks)) not in self.chains:
                continue
            shape = self.shape(selection, n)
            chains[n] = self.chains[(n, o.method, tuple(o.ranks))] if shape == self.layers[n].full else \
                self.factored[(n, o.method, tuple(o.ranks), *shape)]["intermediates"]
        return keep, chains

    def live(self, selection) -> tuple[dict[str, int], int]:
        """Per layer the activation bytes alive while it runs, and the planned activations' total (`selection`:
        Candidates or the allocation's Choices)."""
        keep, chains = self._shapes(selection)
        return self.timeline.live(keep, chains), self.timeline.arena(keep, chains)

    def arena(self, selection) -> int:
        """Planned activation bytes plus the arena's persistent part, estimated (see `arena`)."""
        keep, chains = self._shapes(selection)
        planned = self.timeline.arena(keep, chains)
        p = self.persistent
        if not p:
            return planned
        channels = p["conv_channels"] - sum(self.groups[g].channels - k for g, k in keep.items()
                                            for _ in self.groups[g].producers + self.groups[g].depthwise)
        gone = sum(len(self.groups[g].producers + self.groups[g].consumers) for g, k in keep.items() if k == 0)
        ops = p["operators"] - gone + sum(len(c) for c in chains.values())
        return planned + persistent_bytes(operators=ops, conv_channels=channels)


def pricing_for(module: nn.Module, input_shape: tuple[int, ...], *, groups: list[ChannelGroup],
                candidates: list[Candidate], totals: dict[str, float], latency: LayerCost | None = None, timeline: Timeline | None = None,
                arena_records: bool = False, cut_then_factor: bool = True) -> Pricing:
    """The pricing of `candidates` (factorisations and cuts) on `module`: every layer a group touches measured at
    every shape the cuts among the candidates can give it. `arena_records`: the arena also holds TFLM's per-operator
    and per-channel records (`persistent_bytes`), as on microcontrollers. `cut_then_factor`: a touched layer's
    factorisations are also priced at its cut shapes (else a cut and a factorisation of one layer exclude each other)."""
    costs = count(module, input_shape)
    keeps: dict[str, list[int]] = {}
    for c in candidates:
        if c.method == PRUNE:
            keeps.setdefault(c.layer.removeprefix(unit_name("")), []).append(c.ranks[0])
    out_group, in_groups = {}, {}
    for g in groups:
        for n in g.producers + g.depthwise:
            out_group[n] = g.name
        for n in g.consumers + g.depthwise:
            in_groups.setdefault(n, []).append(g.name)
    names = [n for n in costs if n in out_group or n in in_groups or any(c.layer == n for c in candidates)]
    layers = {n: Shaped(n, module.get_submodule(n), costs[n].input_shape, tuple(in_groups.get(n, ())), out_group.get(n),
                        n in out_group and (out_group[n],) == tuple(in_groups.get(n, ()))) for n in names}
    channels = {g.name: g.channels for g in groups}
    factorisations = [c for c in candidates if c.method not in (None, PRUNE) and c.layer in layers] \
        if cut_then_factor else []
    shapes, items = [], []
    for layer in layers.values():
        cin, cout = layer.full
        ins = _input_counts(layer, cin, channels, keeps)
        outs = [cout] + [cout * k // channels[layer.out_group] for k in keeps.get(layer.out_group, [])] \
            if layer.out_group else [cout]
        pairs = [(i, i) for i in ins] if layer.depthwise else list(itertools.product(ins, outs))
        for i, o in pairs:
            if not (i and o):  # a removed group's writer or reader: gone, and with it its cost but a reader's constant
                constant = o * math.prod(costs[layer.name].output_shape[1:])
                shapes.append(((layer.name, i, o), {"macs": 0, "params": constant, "cycles": 0.0}))
                continue
            shaped, shape = resized(layer, i, o)
            cost = next(iter(count(shaped, shape).values()))
            shapes.append(((layer.name, i, o), {"macs": cost.macs, "params": cost.params, "cycles": None}))
            items.append((shaped, shape))
            if (i, o) != (cin, cout):
                shapes += _factored_at(shaped, shape, cost.macs, [c for c in factorisations if c.layer == layer.name],
                                       key=(layer.name, i, o), items=items)
    if latency is not None:
        timed = [cost for _, cost in shapes if cost["cycles"] is None]
        for cost, cycles in zip(timed, layer_costs(latency, items), strict=True):
            cost["cycles"] = cycles
    variants = {key: cost for key, cost in shapes if len(key) == 3}
    # where cycles are weighed, a chain no faster than its cut layer is no option (as at the dense shape)
    factored = {key: cost for key, cost in shapes if len(key) == 5 and (latency is None or (
        cost["cycles"] is not None and cost["cycles"] < (variants[(key[0], *key[3:])]["cycles"] or float("inf"))))}
    chains = {}
    if timeline is not None:
        for c in candidates:
            if c.method not in (None, PRUNE) and c.layer in layers:
                chain = METHODS[c.method].skeleton(layers[c.layer].module, c.ranks)
                chains[(c.layer, c.method, c.ranks)] = chain_intermediates(chain, layers[c.layer].input_shape)
    persistent = None
    if arena_records and timeline is not None:
        persistent = {"operators": len(timeline.steps) + sum(1 for s in timeline.steps if s.pad),
                      "conv_channels": sum(c.output_shape[0] for c in costs.values() if c.kind == "Conv2d")}
    return Pricing(totals=totals, groups=groups, layers=layers, variants=variants, timeline=timeline, chains=chains,
                   persistent=persistent, factored=factored)


def _input_counts(layer: Shaped, cin: int, channels: dict[str, int], keeps: dict[str, list[int]]) -> list[int]:
    """Every input channel count the cuts can give `layer`, its dense count first (each of its groups at its dense
    count or any cut offered; see `Pricing._kept_in`)."""
    if layer.flattened:
        g = layer.in_group
        return [cin] + [cin * k // channels[g] for k in keeps.get(g, [])]
    found = {cin}
    for combination in itertools.product(*([channels[g], *keeps.get(g, [])] for g in layer.in_groups)):
        found.add(cin - sum(channels[g] - k for g, k in zip(layer.in_groups, combination, strict=True)))
    return [cin] + sorted(found - {cin}, reverse=True)


def _factored_at(shaped: nn.Module, shape: tuple[int, ...], macs: int, factorisations: list[Candidate], *, key: tuple,
                 items: list) -> list[tuple[tuple, dict]]:
    """Each of a layer's factorisations at one cut shape (`shaped`, `shape`; `key` = (layer, channels in, out)) where
    its ranks fit and it saves MACs: (layer, method, ranks, in, out) and its costs, its chain queued in `items` for
    timing."""
    found = []
    for c in factorisations:
        method = METHODS[c.method]
        if not method.applies(shaped) or any(r > m for r, m in zip(c.ranks, method.max_ranks(shaped), strict=True)):
            continue
        chain = method.skeleton(shaped, c.ranks)
        chain_macs = sum(cost.macs for cost in count(chain, shape).values())
        if chain_macs >= macs:
            continue
        found.append(((key[0], c.method, tuple(c.ranks), *key[1:]),
                      {"macs": chain_macs, "params": sum(p.numel() for p in chain.parameters()), "cycles": None,
                       "intermediates": chain_intermediates(chain, shape)}))
        items.append((chain, shape))
    return found


def middle_cuts(candidates: list[Candidate]) -> dict[str, Candidate]:
    """Per channel group among `candidates`, its middle cut (the median of the channel counts offered)."""
    offered: dict[str, list[Candidate]] = {}
    for c in candidates:
        if c.method == PRUNE:
            offered.setdefault(c.layer, []).append(c)
    return {unit: sorted(cuts, key=lambda c: c.ranks[0])[len(cuts) // 2] for unit, cuts in offered.items()}


def fit_rates(pricing: Pricing, measured: list[tuple[dict[str, Candidate], float]]) -> tuple[float, float]:
    """The pricing's `between_rate` and `io_rate` from cut models measured whole (`selection` of cuts, the board's
    estimate of the whole int8 model): least squares of what each measurement shows beyond the layers' tables on the
    elements the cuts took from the operators between the layers and from the layers' edges. A rate no measurement
    can tell apart stays 0 (a model whose cuts reach no add has no between rate). Sets both and returns them."""
    pricing.between_rate = pricing.io_rate = 0.0
    if pricing.timeline is None or not measured:
        return 0.0, 0.0
    line, rows, residuals = pricing.timeline, [], []
    for selection, cycles in measured:
        keep = pricing._shapes(selection)[0]
        rows.append([line.moved(keep) - line.moved({}), line.layer_io(keep) - line.layer_io({})])
        residuals.append(cycles - pricing(selection)["cycles"])
    a = np.array(rows, dtype=float)
    used = [j for j in range(2) if a[:, j].any()]
    if len(used) == 2 and np.linalg.matrix_rank(a) < 2:
        used = [0]  # one mix of both: the operators between the layers take it, as the larger effect on every core
    if used:
        rates = np.linalg.lstsq(a[:, used], np.array(residuals), rcond=None)[0]
        for j, rate in zip(used, rates, strict=True):
            setattr(pricing, ("between_rate", "io_rate")[j], float(rate))
    return pricing.between_rate, pricing.io_rate


def fit_removals(pricing: Pricing, measured: list[tuple[Candidate, float]]) -> dict[str, float]:
    """Per removable group, what its removal alone costs beyond the tables and the rates (`measured`: the removal
    and the board's estimate of the whole int8 model without that group): the constant a removed block leaves is a
    broadcast add, which ONNX Runtime runs slower than the same-shape add it replaces, by a per-channel amount no
    per-element rate fits (ResNet-20 on the A72: one rate fitted on all nine blocks missed two of them by 0.011 of
    the dense cycles). Removals are taken to add up. Sets and returns them; call after `fit_rates`."""
    pricing.removal_extra = {}
    found = {c.layer.removeprefix(unit_name("")): cycles - pricing({c.layer: c})["cycles"] for c, cycles in measured}
    pricing.removal_extra = found
    return found

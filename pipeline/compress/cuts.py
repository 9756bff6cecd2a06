"""Channel cuts in the compress stage: which cuts a rule asks for (METHOD=prune RANK=0.5), applying an allocation's
cuts before its factorisations, and the plan rows that say what each cut did to each layer."""

import dataclasses

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from pipeline.compress.budget.macs import count
from pipeline.compress.plan import Choice, DecompositionPlan, LayerPlan
from pipeline.compress.prune import PREFIX, channel_groups, consumers_of, prune, refit_consumers
from pipeline.compress.ranks import parse_rank, round_up
from pipeline.errors import ConfigError
from targets import Decomposition


def uniform_cuts(module: nn.Module, input_shape: tuple[int, ...], settings: Decomposition) -> dict[str, int]:
    """METHOD=prune without a budget: every prunable group keeps the fraction RANK of its channels, rounded up to
    `round_to`."""
    rule = parse_rank(settings.rank)
    if rule.kind != "ratio":
        raise ConfigError(f"METHOD=prune takes RANK as the fraction of each group's channels to keep, in (0, 1) "
                          f"(e.g. RANK=0.5); got RANK={rule}")
    costs = count(module, input_shape)
    groups, _ = channel_groups(module, input_shape, layers=settings.layers, exclude=settings.exclude,
                               last_layer=list(costs)[-1] if costs else None)
    return {g.name: round_up(max(1, round(rule.value * g.channels)), settings.round_to, g.channels) for g in groups}


def split_choices(choices: dict[str, Choice] | None) -> tuple[dict[str, int], dict[str, Choice] | None, dict[str, str]]:
    """An allocation's channel cuts (group -> channels kept), its per-layer choices, and why each cut was made."""
    if choices is None:
        return {}, None, {}
    cut = {name.removeprefix(PREFIX): c for name, c in choices.items() if name.startswith(PREFIX) and c.method == "prune"}
    return ({g: c.ranks[0] for g, c in cut.items()}, {n: c for n, c in choices.items() if not n.startswith(PREFIX)},
            {g: c.reason for g, c in cut.items()})


def apply_cuts(module: nn.Module, input_shape: tuple[int, ...], cuts: dict[str, int], *, settings: Decomposition,
               calibration: np.ndarray | None = None, seed: int = 0):
    """`module` with `cuts` applied (a copy), and the channels each group kept; `module` itself when there are none.
    With `calibration` images the layers reading cut channels are refitted to their dense outputs (see
    `prune.refit_consumers`), as every factor chain is fitted to its layer's output. The third value names, per
    layer, the cut groups that touch it."""
    if not cuts:
        return module, None, {}
    pruned, kept = prune(module, input_shape, cuts)
    costs = count(module, input_shape)
    groups, _ = channel_groups(module, input_shape, layers=settings.layers, exclude=settings.exclude,
                               last_layer=list(costs)[-1])
    if calibration is not None:
        x = torch.from_numpy(np.ascontiguousarray(calibration, dtype=np.float32))
        with threadpool_limits(limits=1):
            outputs_kept = {n: kept[g.name] for g in groups if g.name in cuts for n in g.producers}
            refit_consumers(pruned, module, consumers_of(groups, cuts, list(costs)), x, seed=seed,
                            outputs_kept=outputs_kept)
    touching = {}
    for g in groups:
        if g.name in cuts:
            for n in g.producers + g.consumers + g.depthwise:
                touching.setdefault(n, []).append(g.name)
    return pruned, kept, touching


def with_cuts(plan: DecompositionPlan, *, dense: nn.Module, pruned: nn.Module, input_shape: tuple[int, ...],
              kept: dict[str, list[int]] | None, touching: dict[str, list[str]] | None = None,
              reasons: dict[str, str] | None = None) -> DecompositionPlan:
    """`plan` (made on the pruned model) measured against the dense model: each layer's MACs and parameters before
    are the dense layer's, and a layer whose channels changed says how many it kept of how many."""
    if not kept:
        return plan
    before, after = count(dense, input_shape), count(pruned, input_shape)
    rows = []
    for row in plan.layers:
        b, a = before.get(row.name), after.get(row.name)
        if b is None or a is None:
            rows.append(row)
            continue
        channels = (a.input_shape[0], a.output_shape[0])
        channels_before = (b.input_shape[0], b.output_shape[0])
        change = {"macs_before": b.macs, "params_before": b.params}
        if channels != channels_before:
            change.update(channels=channels, channels_before=channels_before)
            if row.method is None:
                change.update(macs_after=a.macs, params_after=a.params)
            groups = (touching or {}).get(row.name, [])
            why = "; ".join(f"group {g} keeps {len(kept[g])} channels ({(reasons or {}).get(g, 'uniform cut')})"
                            for g in groups if g in kept)
            change["note"] = "; ".join(filter(None, (why, row.note if row.method else "")))
        rows.append(dataclasses.replace(row, **change))
    order = {name: i for i, name in enumerate(before)}
    for name, groups in (touching or {}).items():  # gone with a removed group: a row where the dense layer was
        if name in after or name not in before:
            continue
        group, b = next(g for g in groups if not kept.get(g)), before[name]
        at = next((i for i, r in enumerate(rows) if order.get(r.name, -1) > order[name]), len(rows))
        rows.insert(at, LayerPlan(
            name, b.kind, None, (), plan.rank_rule, b.macs, 0, b.params, 0, None,
            f"removed: group {group} keeps no channels ({(reasons or {}).get(group, 'uniform cut')})",
            channels=(b.input_shape[0], 0) if name == group else (0, b.output_shape[0]),
            channels_before=(b.input_shape[0], b.output_shape[0])))
    return dataclasses.replace(plan, layers=tuple(rows), cuts=kept)

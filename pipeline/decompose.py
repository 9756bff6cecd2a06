"""The decompose stage: replace chosen Conv2d/Linear layers by low-rank chains of standard layers.

Returns a plain `nn.Module` (every exporter takes it) and a plan saying, per layer, what was done and why.
"""

import copy
import time
from collections.abc import Mapping
from fnmatch import fnmatch

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn
from tqdm import tqdm

from pipeline import datafit, factorize
from pipeline.datafit import layer_io
from pipeline.errors import ConfigError, StageError, unknown
from pipeline.macs import count
from pipeline.plan import Choice, DecompositionPlan, LayerPlan
from pipeline.ranks import RankRule, energy_cut, evbmf_rank, parse_rank, round_up, spectral_rank

METHODS = ("cp", "slice-svd", "svd", "tucker2")


def choose_ranks(layer: nn.Module, method: str, rule: RankRule, *, round_to: int, name: str) -> tuple[int, ...]:
    """Ranks per mode: a fixed rank or a fraction of each maximum, or read off the layer's spectrum."""
    maxima = factorize.max_ranks(layer, method)
    if rule.kind == "fixed":
        if any(rule.value > m for m in maxima):
            raise ConfigError(f"Rank {int(rule.value)} for layer {name!r} ({method}); expected at most "
                              f"{'x'.join(map(str, maxima))} there. Use a fraction (e.g. 0.5) for nets of mixed widths")
        raw = [int(rule.value)] * len(maxima)
    elif rule.kind == "ratio":
        raw = [max(1, round(rule.value * m)) for m in maxima]
    elif method == "slice-svd" and isinstance(layer, nn.Conv2d):
        raw = [_slice_rank(factorize.unfoldings(layer, method)[0], rule)]
    else:
        raw = [spectral_rank(m, rule) for m in factorize.unfoldings(layer, method)]
        if method == "cp" and isinstance(layer, nn.Conv2d):
            raw = [max(raw)]  # Lebedev et al.'s single CP rank, from the larger of the two unfolding ranks
    return tuple(round_up(r, round_to, m) for r, m in zip(raw, maxima, strict=True))


def _slice_rank(stack: np.ndarray, rule: RankRule) -> int:
    """One rank for every kxk slice (the grouped convs need one): EVBMF on the slices' stacked rows (a
    shared noise model), or the energy kept across all slices together."""
    if rule.kind == "evbmf":
        return evbmf_rank(stack.reshape(-1, stack.shape[-1]))
    return energy_cut((np.linalg.svd(stack, compute_uv=False) ** 2).sum(axis=0), rule.value)


def _dense(name: str, layer: nn.Module, cost, label: str, note: str) -> LayerPlan:
    macs = cost.macs if cost else 0
    params = sum(p.numel() for p in layer.parameters(recurse=False))
    return LayerPlan(name, type(layer).__name__, None, (), label, macs, macs, params, params, None, note)


def unsupported_reason(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return ""
    if type(layer) is not nn.Conv2d:
        return f"{type(layer).__name__} is not handled (only Conv2d and Linear): left dense"
    if layer.groups != 1:
        return f"grouped or depthwise conv (groups={layer.groups}): left dense"
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} (only zero padding splits across factors): left dense"
    return ""


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    norm = weight.norm().item()
    return float((weight - approx.reshape(weight.shape)).norm().item() / norm) if norm else 0.0


def decompose(module: nn.Module, *, input_shape: tuple[int, ...], method: str = "tucker2",
              rank: str | int | float | RankRule | None = "evbmf", layers: tuple[str, ...] = ("*",),
              exclude: tuple[str, ...] = (), round_to: int = 1, seed: int = 0, progress: bool = True,
              calibration: np.ndarray | None = None,
              choices: Mapping[str, Choice] | None = None) -> tuple[nn.Module, DecompositionPlan]:
    """Factor every Conv2d (with `method`) and Linear (truncated SVD) whose name matches `layers` and
    not `exclude` (fnmatch patterns). A layer whose factorisation would not reduce MACs stays dense.

    `calibration` (NCHW float images): fit each chain to reproduce its layer's output on them, layer by
    layer in execution order (see datafit); without it the factors approximate the weights.
    `choices` (from `allocate`): each layer's method and ranks, in place of `method` and `rank`."""
    if method not in METHODS:
        raise unknown("method", method, METHODS)
    if round_to < 1:
        raise ConfigError(f"round_to={round_to}; expected a positive integer")
    rule = rank if isinstance(rank, RankRule) else parse_rank(rank)
    started = time.perf_counter()
    costs = count(module, input_shape)
    model = copy.deepcopy(module).eval()
    order = {name: i for i, name in enumerate(costs)}  # execution order: each fit sees the layers before it
    candidates = sorted(((n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)),
                        key=lambda item: order.get(item[0], len(order)))
    selected = {n for n, m in candidates
                if any(fnmatch(n, p) for p in layers) and not any(fnmatch(n, p) for p in exclude)}
    data = None
    if calibration is not None:
        x = torch.from_numpy(np.ascontiguousarray(calibration, dtype=np.float32))
        data = (x, {n: io[1] for n, io in layer_io(module, [n for n in selected if n in costs], x).items()})
    label = "allocated" if choices is not None else str(rule)
    plans = []
    with threadpool_limits(limits=1):  # BLAS threads oversubscribe on these small tensors (CP-ALS 30x slower)
        for name, layer in tqdm(candidates, desc=f"decompose ({'budget' if choices else method})", unit="layer",
                                disable=not progress, leave=False):
            cost = costs.get(name)
            if name not in selected:
                plans.append(_dense(name, layer, cost, label, "not selected by the layer patterns"))
                continue
            reason = unsupported_reason(layer) or ("" if cost else "not reached by the forward pass: left dense")
            if reason:
                plans.append(_dense(name, layer, cost, label, reason))
                continue
            if choices is not None:
                choice = choices.get(name) or Choice(None, (), "not in the allocation: left dense")
                if choice.method is None:
                    plans.append(_dense(name, layer, cost, label, choice.reason))
                    continue
                layer_method, ranks, note = choice.method, choice.ranks, choice.reason
            else:
                layer_method = "svd" if isinstance(layer, nn.Linear) else method
                ranks, note = choose_ranks(layer, layer_method, rule, round_to=round_to, name=name), ""
            plans.append(_factor_one(model, name, layer, cost, layer_method, ranks, label, note, data=data, seed=seed,
                                     fallback=(rule, round_to)))
    requested = "budget" if choices is not None else method
    return model, DecompositionPlan(requested, label, round_to, tuple(plans), time.perf_counter() - started)


def fit_chain(layer: nn.Module, method: str, ranks: tuple[int, ...], *, x: torch.Tensor | None = None,
              y: torch.Tensor | None = None, seed: int = 0) -> tuple[nn.Sequential, torch.Tensor, str]:
    """A fitted chain for one layer: to its output on (x, y) where given and supported, else to its weights.
    Returns it with the weight it computes and a note."""
    chain = factorize.skeleton(layer, method, ranks)
    if x is not None and datafit.supports(layer, method):
        note = datafit.fit(layer, method, chain, x, y, seed=seed)
        approx = factorize.effective_weight(chain, method, layer)
    else:
        approx, note = factorize.fit(layer, method, chain, seed=seed)
    return chain.eval(), approx, note


def _factor_one(model, name, layer, cost, method, ranks, label, note, *, data, seed, fallback) -> LayerPlan:
    chain = factorize.skeleton(layer, method, ranks)
    macs_after = sum(c.macs for c in count(chain, cost.input_shape).values())
    if macs_after >= cost.macs:
        return _dense(name, layer, cost, label,
                      f"{method} at rank {'x'.join(map(str, ranks))} would not reduce MACs "
                      f"({macs_after:,} >= {cost.macs:,}): left dense")
    x = datafit.layer_inputs(model, name, data[0]) if data else None
    y = data[1][name] if data else None
    try:
        chain, approx, fit_note = fit_chain(layer, method, ranks, x=x, y=y, seed=seed)
    except StageError as exc:  # CP-ALS diverged from every start: Tucker-2 always converges
        rule, round_to = fallback
        method, ranks = "tucker2", choose_ranks(layer, "tucker2", rule, round_to=round_to, name=name)
        chain, approx, _ = fit_chain(layer, method, ranks, x=x, y=y, seed=seed)
        fit_note = f"{exc}; fell back to tucker2"
        macs_after = sum(c.macs for c in count(chain, cost.input_shape).values())
    set_submodule(model, name, chain)
    params_after = sum(p.numel() for p in chain.parameters())
    return LayerPlan(name, type(layer).__name__, method, ranks, label, cost.macs, macs_after, cost.params,
                     params_after, _relative_error(layer.weight.detach(), approx), "; ".join(filter(None, (note, fit_note))),
                     None if x is None else round(datafit.output_error(chain, x, y), 6))

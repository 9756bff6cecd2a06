"""The decompose step: replace chosen Conv2d/Linear layers by low-rank chains of standard layers.

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

from pipeline.compress import datafit
from pipeline.compress.budget.macs import LayerCost, count
from pipeline.compress.methods import Method, method_for, unsupported_reason
from pipeline.compress.plan import Choice, DecompositionPlan, LayerPlan
from pipeline.compress.ranks import parse_rank
from pipeline.compute import CPU, TorchDevice
from pipeline.errors import StageError
from targets import Decomposition


def layer_selection(module: nn.Module, costs: Mapping[str, LayerCost], settings: Decomposition) -> dict[str, str]:
    """Every Conv2d and Linear layer, in execution order, with why it stays dense ('' when it is factored):
    not matched by `layers`, matched by `exclude`, the model's first or last compute layer, or no method
    takes it."""
    order = {name: i for i, name in enumerate(costs)}  # execution order: each fit sees the layers before it
    layers = sorted(((n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)),
                    key=lambda item: order.get(item[0], len(order)))
    ends = {}
    if settings.keep_first_and_last and costs:
        names = list(costs)
        ends = {names[0]: "the model's first compute layer (its stem): kept dense",
                names[-1]: "the model's last compute layer (its classifier): kept dense"}
    reasons = {}
    for name, layer in layers:
        if not any(fnmatch(name, p) for p in settings.layers) or any(fnmatch(name, p) for p in settings.exclude):
            reasons[name] = "not selected by the layer patterns"
        else:
            reasons[name] = (ends.get(name) or unsupported_reason(layer)
                             or ("" if name in costs else "not reached by the forward pass: left dense"))
    return reasons


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _dense(name: str, layer: nn.Module, cost, label: str, note: str, choice: Choice | None = None) -> LayerPlan:
    macs = cost.macs if cost else 0
    params = sum(p.numel() for p in layer.parameters(recurse=False))
    return LayerPlan(name, type(layer).__name__, None, (), label, macs, macs, params, params, None, note,
                     **_measured(choice))


def _measured(choice: Choice | None) -> dict:
    if choice is None:
        return {}
    return {"kl": choice.kl, "agreement": choice.agreement, "latency": choice.latency,
            "dense_latency": choice.dense_latency}


def _relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    norm = weight.norm().item()
    return float((weight - approx.reshape(weight.shape)).norm().item() / norm) if norm else 0.0


def decompose(module: nn.Module, *, input_shape: tuple[int, ...], settings: Decomposition, seed: int = 0,
              progress: bool = True, calibration: np.ndarray | None = None,
              choices: Mapping[str, Choice] | None = None, device: TorchDevice = CPU) -> tuple[nn.Module, DecompositionPlan]:
    """Factor every Conv2d (with `settings.method`) and Linear (truncated SVD) that `layer_selection` picks, at
    ranks from `settings.rank` rounded up to `settings.round_to`. A layer whose factorisation would not reduce
    MACs stays dense.

    `calibration` (NCHW float images): fit each chain to reproduce its layer's output on them, layer by
    layer in execution order (see datafit); without it the factors approximate the weights.
    `choices` (from `allocate`): each layer's method and ranks, in place of `settings.method` and `rank`.
    On a CUDA `device` the fit's forward passes run there; the fits themselves, small, stay on the CPU."""
    rule = parse_rank(settings.rank)
    started = time.perf_counter()
    costs = count(module, input_shape)
    model = copy.deepcopy(module).eval()
    reasons = layer_selection(module, costs, settings)
    data = None
    if calibration is not None:
        x = torch.from_numpy(np.ascontiguousarray(calibration, dtype=np.float32))
        if not device.is_cpu:  # the model copy (still dense here) computes the layers' outputs on the device
            model, x = model.to(device.device), x.to(device.device)
        data = (x, {n: io[1] for n, io in datafit.layer_io(module if device.is_cpu else model,
                                                           [n for n, r in reasons.items() if not r], x).items()})
    label = "allocated" if choices is not None else str(rule)
    plans = []
    with threadpool_limits(limits=1):  # BLAS threads oversubscribe on these small tensors (CP-ALS 30x slower)
        for name, reason in tqdm(reasons.items(), desc=f"decompose ({'budget' if choices else settings.method})",
                                 unit="layer", disable=not progress, leave=False):
            layer, cost = module.get_submodule(name), costs.get(name)
            if reason:
                plans.append(_dense(name, layer, cost, label, reason))
                continue
            choice = None
            if choices is not None:
                choice = choices.get(name) or Choice(None, (), "not in the allocation: left dense")
                if choice.method is None:
                    plans.append(_dense(name, layer, cost, label, choice.reason, choice))
                    continue
                method, ranks, note = method_for(layer, choice.method), choice.ranks, choice.reason
            else:
                method = method_for(layer, settings.method)
                ranks, note = method.choose_ranks(layer, rule, round_to=settings.round_to, name=name), ""
            plans.append(_factor_one(model, name, layer, cost, method, ranks, label, note, data=data, seed=seed,
                                     fallback=(rule, settings.round_to), choice=choice))
    model.to("cpu")
    requested = "budget" if choices is not None else settings.method
    return model, DecompositionPlan(requested, label, settings.round_to, tuple(plans), time.perf_counter() - started)


def fit_chain(layer: nn.Module, method: Method, ranks: tuple[int, ...], *, x: torch.Tensor | None = None,
              y: torch.Tensor | None = None, seed: int = 0) -> tuple[nn.Sequential, torch.Tensor, str]:
    """A fitted chain for one layer: to its output on (x, y) where given and supported, else to its weights.
    Returns it with the weight it computes and a note."""
    chain = method.skeleton(layer, ranks)
    if x is not None and method.fits_data(layer):
        note = datafit.fit(layer, method, chain, x, y, seed=seed)
        approx = method.effective_weight(chain, layer)
    else:
        approx, note = method.fit_weights(layer, chain, seed=seed)
    return chain.eval(), approx, note


def _factor_one(model, name, layer, cost, method, ranks, label, note, *, data, seed, fallback, choice) -> LayerPlan:
    offered = method.max_ranks(layer)
    if any(r > m for r, m in zip(ranks, offered, strict=True)):
        return _dense(name, layer, cost, label, f"{method.name} would need rank {'x'.join(map(str, ranks))} for "
                      f"{label}; it offers at most {'x'.join(map(str, offered))}: left dense", choice)
    chain = method.skeleton(layer, ranks)
    macs_after = sum(c.macs for c in count(chain, cost.input_shape).values())
    if macs_after >= cost.macs:
        return _dense(name, layer, cost, label,
                      f"{method.name} at rank {'x'.join(map(str, ranks))} would not reduce MACs "
                      f"({macs_after:,} >= {cost.macs:,}): left dense", choice)
    x = datafit.layer_inputs(model, name, data[0]).cpu() if data else None  # the fit runs on the CPU
    y = data[1][name].cpu() if data else None
    try:
        chain, approx, fit_note = fit_chain(layer, method, ranks, x=x, y=y, seed=seed)
    except StageError as exc:  # CP-ALS diverged from every start: Tucker-2 always converges
        rule, round_to = fallback
        method = method_for(layer, "tucker2")
        ranks = method.choose_ranks(layer, rule, round_to=round_to, name=name)
        chain, approx, _ = fit_chain(layer, method, ranks, x=x, y=y, seed=seed)
        fit_note = f"{exc}; fell back to tucker2"
        macs_after = sum(c.macs for c in count(chain, cost.input_shape).values())
    error = None if x is None else round(datafit.output_error(chain, x, y), 6)  # on the CPU, where x and y are
    set_submodule(model, name, chain.to(next(model.parameters()).device))
    params_after = sum(p.numel() for p in chain.parameters())
    return LayerPlan(name, type(layer).__name__, method.name, ranks, label, cost.macs, macs_after, cost.params,
                     params_after, _relative_error(layer.weight.detach(), approx), "; ".join(filter(None, (note, fit_note))),
                     error, **_measured(choice))


def collapse(model: nn.Module, plan: DecompositionPlan, dense: nn.Module) -> nn.Module:
    """The inverse of `decompose`: a copy of `model` (`dense` factored as `plan` says, then perhaps trained) with
    every factored chain replaced by a layer shaped like `dense`'s that computes the chain's product. Exact: a
    chain has no nonlinearity, and only its last factor has a bias. A tuned student is collapsed so that it can
    be factored again at a smaller budget, its allocation measured on what it has become."""
    collapsed = copy.deepcopy(model)
    for step in plan.layers:
        if step.method is None:
            continue
        original, chain = dense.get_submodule(step.name), model.get_submodule(step.name)
        layer = copy.deepcopy(original)
        weight = method_for(original, step.method).effective_weight(chain, original)
        layer.weight.data = weight.reshape(original.weight.shape).to(original.weight.dtype)
        if layer.bias is not None:
            layer.bias.data = chain[-1].bias.detach().clone()
        set_submodule(collapsed, step.name, layer)
    return collapsed.eval()

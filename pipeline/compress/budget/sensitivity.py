"""Per-layer sensitivity: what each candidate factorisation of each layer costs in accuracy, measured.

For every selected layer and candidate (method x ranks), the layer alone is replaced by its data-aware
chain and the network's logits on held-out training images are compared with the dense ones (mean
KL divergence, plus top-1 agreement for the reader). The table is the input of `allocate`; it is
cached under the hashes of the weights, the images and the settings, so another budget costs nothing.
"""

import copy
import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from pipeline.cluster import Job, Local, connect
from pipeline.compress import datafit
from pipeline.compress.budget.macs import count, totals
from pipeline.compress.decompose import fit_chain, layer_selection, set_submodule
from pipeline.compress.methods import PRUNE, Method, methods_for
from pipeline.compress.prune import PREFIX as CUT_PREFIX
from pipeline.compress.prune import channel_groups, kept_counts, prune, refit_consumers, unit_name
from pipeline.compress.ranks import round_up
from pipeline.compute import CPU, TorchDevice
from pipeline.errors import StageError
from pipeline.util import cache_dir, cache_lock, sha256_bytes, sha256_json, write_text
from targets import Decomposition

VERSION = 7  # 7: a removed block's constant is per position; 6: channel cuts ("prune") are candidates; 5: 1x1 and depthwise convs have their own methods; 4: `latency` in the timer's unit; 3: linear layers' method is 'linear-svd'; bump when what a table means changes, so stale caches are not reused


@dataclass(frozen=True)
class Candidate:
    layer: str
    method: str | None  # None: the layer kept dense
    ranks: tuple[int, ...]
    macs: int
    params: int
    kl: float  # mean KL(dense || this) over the held-out images, in nats
    agreement: float  # top-1 agreement with the dense model on them
    latency: float | None = None  # the layer or chain alone on the target's runtime, in the LayerLatency's unit


class LayerCost(Protocol):
    """The allocation's time cost: what a layer or chain alone costs on the target, in `unit` (estimated cycles on
    the board's core; on a target without one, milliseconds on this host), or None where it cannot be built.
    `fingerprint` keys the sensitivity cache. The orchestrator hands one in (the runtimes and boards live in later
    stages), so this stage never imports a runtime.

    `board` says the figures are the board's own estimate, the same on every host: then no budget keeps a
    factorisation that costs more than its dense layer, and `cycles:` budgets can be met. `model` (needed only by
    a cycles budget) is the whole int8 model's cost, operators between the layers included."""

    fingerprint: dict
    unit: str  # what a cost counts, e.g. "estimated cortex-a72 cycles" or "ms on this host (ONNX Runtime, one thread)"
    board: bool

    def layers(self, items: list[tuple[nn.Module, tuple[int, ...]]]) -> list[float | None]: ...

    def model(self, module: nn.Module, input_shape: tuple[int, ...]) -> float: ...


def _structure(module: nn.Module, shape: tuple[int, ...]) -> tuple:
    """What a layer's cost depends on: its input shape and each layer's kind and geometry, not its weights."""
    return (shape, tuple((type(m).__name__, tuple(m.weight.shape), str(getattr(m, "stride", "")),
                          str(getattr(m, "padding", "")), str(getattr(m, "dilation", "")), getattr(m, "groups", 1))
                         for m in (module if isinstance(module, nn.Sequential) else [module])))


def _seeded_copy(module: nn.Module) -> nn.Module:
    """`module` with weights from a fixed generator: a cost does not depend on the values, and the same bytes for
    the same structure let the runtimes' caches answer (a skeleton's initial weights depend on the global RNG)."""
    copy_ = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in copy_.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return copy_


def layer_costs(cost: "LayerCost", items: list[tuple[nn.Module, tuple[int, ...]]]) -> list[float | None]:
    """`cost` of each (layer or chain, input shape), each structure measured once (ResNets repeat their blocks'
    shapes), in one call so the runtime can batch them."""
    unique: dict[tuple, tuple[nn.Module, tuple[int, ...]]] = {}
    for module, shape in items:
        unique.setdefault(_structure(module, shape), (module, shape))
    measured = dict(zip(unique, cost.layers([(_seeded_copy(m), s) for m, s in unique.values()]), strict=True))
    return [measured[_structure(m, s)] for m, s in items]


def candidate_ranks(layer: nn.Module, method: Method, *, fractions: tuple[float, ...], round_to: int) -> list[tuple[int, ...]]:
    """Ranks at each fraction of every mode's maximum, rounded to the target's multiple, deduplicated."""
    maxima = method.max_ranks(layer)
    step = round_to if method.channel_ranks else 1
    found = []
    for fraction in fractions:
        ranks = tuple(round_up(max(1, round(fraction * m)), step, m) for m in maxima)
        if ranks not in found:
            found.append(ranks)
    return found


def skeleton_candidates(module: nn.Module, *, input_shape: tuple[int, ...], settings: Decomposition,
                        latency: LayerCost | None = None) -> list[Candidate]:
    """Every candidate's MACs and parameters from its skeleton alone (no fitting, no data, KL unknown), and with
    `latency` its cost on the target (which does not depend on the weights): what the budget could reach at best is
    known before any sensitivity work."""
    costs = count(module, input_shape)
    found, items = [], []
    for name, reason in layer_selection(module, costs, settings).items():
        if reason:
            continue
        layer, cost = module.get_submodule(name), costs[name]
        found.append(Candidate(name, None, (), cost.macs, cost.params, 0.0, 1.0))
        items.append((layer, cost.input_shape))
        for method in methods_for(layer, settings.candidates):
            for ranks in candidate_ranks(layer, method, fractions=settings.rank_fractions, round_to=settings.round_to):
                chain = method.skeleton(layer, ranks)
                macs = sum(c.macs for c in count(chain, cost.input_shape).values())
                if macs < cost.macs:
                    found.append(Candidate(name, method.name, ranks, macs, sum(p.numel() for p in chain.parameters()),
                                           float("nan"), float("nan")))
                    items.append((chain, cost.input_shape))
    cuts, _ = cut_candidates(module, input_shape=input_shape, settings=settings,
                             last_layer=list(costs)[-1] if costs else None)
    if latency is not None:
        found = [dataclasses.replace(c, latency=t) for c, t in zip(found, layer_costs(latency, items), strict=True)]
    return found + cuts


def cut_candidates(module: nn.Module, *, input_shape: tuple[int, ...], settings: Decomposition,
                   last_layer: str | None) -> tuple[list[Candidate], list]:
    """Every channel cut a budget may take when `settings.candidates` names "prune": each prunable group (see
    `prune.channel_groups`) at each of `channel_fractions` of its channels, rounded to `round_to`; KL unknown. MACs and
    parameters are the whole model's with that cut alone. Returns them and the groups."""
    if PRUNE not in settings.candidates:
        return [], []
    try:
        groups, _ = channel_groups(module, input_shape, layers=settings.layers, exclude=settings.exclude,
                                   last_layer=last_layer)
    except StageError:  # a graph the pruner cannot trace offers no cuts; the factorisations remain
        return [], []
    found, usable = [], []
    for group in groups:
        cuts = []
        for kept in kept_counts(group, fractions=settings.channel_fractions, round_to=settings.round_to):
            try:
                cuts.append((kept, *_cut_totals(module, input_shape, group.name, kept)))
            except StageError:  # the cut model does not run (an operator the pruner maps wrongly, a removed
                continue        # layer's constant meeting a pool): that cut is not offered
        if not cuts:
            continue
        usable.append(group)
        found += [Candidate(unit_name(group.name), PRUNE, (kept,), macs, params, float("nan"), float("nan"))
                  for kept, macs, params in cuts]
    return found, usable


def _cut_totals(module, input_shape, group: str, kept: int) -> tuple[int, int]:
    return totals(prune(module, input_shape, {group: kept})[0], input_shape)


def measure_cut(module: nn.Module, fit_x: torch.Tensor | None, held: torch.Tensor, reference: torch.Tensor, *,
                input_shape: tuple[int, ...], group: str, kept: int, consumers: tuple[str, ...] = (),
                seed: int = 0) -> tuple[float, float]:
    """One channel cut alone: group `group` of `module` cut to `kept` channels (largest group magnitude kept), the
    layers reading them refitted to their dense outputs on `fit_x` (when given); the mean KL of the net's logits
    on `held` from `reference` and their top-1 agreement."""
    dense = module if held.device.type == "cpu" else copy.deepcopy(module).cpu()
    with threadpool_limits(limits=1):
        pruned, _ = prune(dense, input_shape, {group: kept})
        if fit_x is not None:
            refit_consumers(pruned, dense, consumers, fit_x, seed=seed)
    with torch.inference_mode():
        logits = pruned.to(held.device)(held)
    return round(_kl(reference, logits), 8), round(float((logits.argmax(1) == reference.argmax(1)).float().mean()), 6)


def _fingerprint(module: nn.Module, *arrays: np.ndarray, settings: dict) -> str:
    chunks = [sha256_json({**settings, "version": VERSION}).encode()]
    for name, tensor in sorted(module.state_dict().items()):
        chunks += [name.encode(), tensor.detach().cpu().contiguous().numpy().tobytes()]
    return sha256_bytes(*chunks, *(np.ascontiguousarray(array).tobytes() for array in arrays))


def _kl(dense: torch.Tensor, logits: torch.Tensor) -> float:
    return float(F.kl_div(F.log_softmax(logits, 1), F.log_softmax(dense, 1), log_target=True, reduction="batchmean"))


def measure_candidate(module: nn.Module, layer_io: tuple, held: torch.Tensor, reference: torch.Tensor, *, name: str,
                      method: Method, ranks: tuple[int, ...], seed: int) -> tuple[nn.Module, float, float] | None:
    """One candidate alone: layer `name` of `module` replaced by its chain fitted to `layer_io` (the layer's
    inputs and outputs on the fit images, or (None, None) to fit the weights); returns the chain, the mean KL of
    the net's logits on `held` from `reference` (the dense ones) and their top-1 agreement, or None when the
    fit failed. Single-threaded, so the figures are the same on any machine; `module` is restored."""
    layer = module.get_submodule(name)
    source = layer if held.device.type == "cpu" else copy.deepcopy(layer).cpu()  # the fit runs on the CPU
    try:
        with threadpool_limits(limits=1):
            chain, _, _ = fit_chain(source, method, ranks, x=layer_io[0], y=layer_io[1], seed=seed)
    except StageError:
        return None
    set_submodule(module, name, chain.to(held.device))  # the device the sweep runs on (the CPU: a no-op)
    try:
        with torch.inference_mode():
            logits = module(held)
    finally:
        set_submodule(module, name, layer)
    return chain.cpu(), round(_kl(reference, logits), 8), round(float((logits.argmax(1) == reference.argmax(1)).float().mean()), 6)


def sensitivities(module: nn.Module, *, input_shape: tuple[int, ...], fit_x: np.ndarray | None, heldout_x: np.ndarray,
                  settings: Decomposition, seed: int = 0, latency: LayerCost | None = None,
                  skeleton: list[Candidate] | None = None, use_cache: bool = True, progress: bool = True,
                  device: TorchDevice = CPU) -> tuple[list[Candidate], dict]:
    """Every candidate (`settings.candidates` x `settings.rank_fractions`) of every layer `layer_selection`
    picks, a dense entry per layer included, and facts about the run: whether the cache answered, its path,
    the seconds spent. Without `fit_x` the factors fit the weights. With `latency` each candidate carries its
    cost on the target, taken from `skeleton` (`skeleton_candidates` with that cost) when given. On a CUDA
    `device` the forward passes run there, in this process (the fits stay on the CPU)."""
    methods, fractions, round_to = settings.candidates, settings.rank_fractions, settings.round_to
    key_settings = {"methods": list(methods), "fractions": list(fractions), "round_to": round_to,
                    **({"channel_fractions": list(settings.channel_fractions)} if PRUNE in methods else {}),
                    # cuts alone: no layer's shape method either (a table from before that rule had them)
                    **({"cuts_alone": True} if set(methods) == {PRUNE} else {}),
                    "layers": list(settings.layers), "exclude": list(settings.exclude),
                    "keep_first_and_last": settings.keep_first_and_last, "seed": seed, "input_shape": list(input_shape),
                    "latency": None if latency is None else latency.fingerprint,
                    **({} if device.is_cpu else {"device": device.device.type})}
    key = _fingerprint(module, *([] if fit_x is None else [fit_x]), heldout_x,
                       settings={**key_settings, "data_aware": fit_x is not None})
    # the same settings whatever the methods: a table measured for more methods answers for fewer
    family = {k: v for k, v in key_settings.items() if k not in ("methods", "channel_fractions", "cuts_alone")}
    base = _fingerprint(module, *([] if fit_x is None else [fit_x]), heldout_x,
                        settings={**family, "channel_fractions": list(settings.channel_fractions),
                                  "data_aware": fit_x is not None})[:24]
    path = cache_dir("sensitivity", f"{key[:24]}.json")
    if use_cache and path.is_file():
        return _cached(path, base=base)
    wider = _wider_table(base, module, methods) if use_cache else None
    if wider is not None:
        return wider
    with cache_lock(path):  # a run beside this one sweeping the same model waits for it, then reuses the table
        if use_cache and path.is_file():
            return _cached(path)
        started = time.perf_counter()
        if skeleton is None:
            skeleton = skeleton_candidates(module, input_shape=input_shape, settings=settings, latency=latency)
        dense_model = module.eval()
        work = copy.deepcopy(module).eval()
        names = list(dict.fromkeys(c.layer for c in skeleton if c.method != PRUNE))
        held_t = torch.from_numpy(np.ascontiguousarray(heldout_x, dtype=np.float32))
        io = {} if fit_x is None else datafit.layer_io(
            dense_model, names, torch.from_numpy(np.ascontiguousarray(fit_x, dtype=np.float32)))
        if not device.is_cpu:  # a copy of the dense model on the device gives the reference logits there
            work, held_t = work.to(device.device), held_t.to(device.device)
            dense_model = work
        with torch.inference_mode():
            reference = dense_model(held_t)
        cluster = connect() if device.is_cpu else Local()
        shared = {"module": cluster.put(work), "held": cluster.put(held_t), "reference": cluster.put(reference)}
        layer_io = {name: cluster.put(io.get(name, (None, None))) for name in names}
        by_name = {m.name: m for name in names for m in methods_for(module.get_submodule(name), methods)}
        found = [c for c in skeleton if c.method is None]
        factored = [c for c in skeleton if c.method not in (None, PRUNE)]
        cuts = [c for c in skeleton if c.method == PRUNE]
        jobs = [Job(f"sensitivity {c.layer} {c.method} {'x'.join(map(str, c.ranks))}", measure_candidate,
                    (shared["module"], layer_io[c.layer], shared["held"], shared["reference"]),
                    {"name": c.layer, "method": by_name[c.method], "ranks": c.ranks, "seed": seed}) for c in factored]
        for c, measured in zip(factored, cluster.run(jobs, desc="sensitivity", progress=progress), strict=True):
            if measured is None:  # CP-ALS that diverged is simply not a candidate
                continue
            chain, kl, agreement = measured
            found.append(dataclasses.replace(c, params=sum(p.numel() for p in chain.parameters()), kl=kl,
                                             agreement=agreement))
        groups = {}
        if cuts:
            costs = count(module, input_shape)
            groups = {g.name: g for g in channel_groups(module, input_shape, layers=settings.layers,
                                                        exclude=settings.exclude, last_layer=list(costs)[-1])[0]}
            order = list(costs)
        fit_t = None if fit_x is None else cluster.put(torch.from_numpy(np.ascontiguousarray(fit_x, dtype=np.float32)))
        cut_jobs = [Job(f"sensitivity {c.layer} keep {c.ranks[0]}", measure_cut,
                        (shared["module"], fit_t, shared["held"], shared["reference"]),
                        {"input_shape": tuple(input_shape), "group": c.layer.removeprefix(CUT_PREFIX), "kept": c.ranks[0],
                         "consumers": tuple(n for n in order if n in groups[c.layer.removeprefix(CUT_PREFIX)].consumers),
                         "seed": seed})
                    for c in cuts]
        for c, (kl, agreement) in zip(cuts, cluster.run(cut_jobs, desc="sensitivity (cuts)", progress=progress),
                                      strict=True):
            found.append(dataclasses.replace(c, kl=kl, agreement=agreement))
        order = {name: i for i, name in enumerate(dict.fromkeys(c.layer for c in skeleton))}
        found.sort(key=lambda c: order[c.layer])  # each layer's dense entry, then its candidates; then the cuts
        seconds = round(time.perf_counter() - started, 2)
        write_text(path, json.dumps({"settings": key_settings, "base": base, "seconds": seconds,
                                     "candidates": [asdict(c) for c in found]}, indent=1))
        return found, {"cached": False, "path": str(path), "seconds": seconds}


def _wider_table(base: str, module: nn.Module, methods: tuple[str, ...]) -> tuple[list[Candidate], dict] | None:
    """A cached table of the same model, data and settings measured for more methods, cut down to `methods` (each
    candidate is measured alone, seeded and single-threaded, so its figures do not depend on the others)."""
    for path in sorted(cache_dir("sensitivity").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("base") != base or not set(methods) <= set(data["settings"]["methods"]):
            continue
        found, facts = _cached(path)
        offered = {}
        for c in found:
            if c.method not in (None, PRUNE) and c.layer not in offered:
                offered[c.layer] = {m.name for m in methods_for(module.get_submodule(c.layer), methods)}
        kept = [c for c in found if c.method is None or (c.method == PRUNE and PRUNE in methods)
                or c.method in offered.get(c.layer, ())]
        return kept, {**facts, "narrowed_from": list(data["settings"]["methods"])}
    return None


def _cached(path: Path, *, base: str | None = None) -> tuple[list[Candidate], dict]:
    data = json.loads(path.read_text())
    if base and "base" not in data:  # a table from before tables named their base: named now, so it can be narrowed
        write_text(path, json.dumps({**data, "base": base}, indent=1))
    return [Candidate(**{**c, "ranks": tuple(c["ranks"])}) for c in data["candidates"]], \
        {"cached": True, "path": str(path), "seconds": data["seconds"]}

"""Per-layer sensitivity: what each candidate factorisation of each layer costs in accuracy, measured.

For every selected layer and candidate (method x ranks), the layer alone is replaced by its data-aware
chain and the network's logits on held-out training images are compared with the dense ones (mean
KL divergence, plus top-1 agreement for the reader). The table is the input of `allocate`; it is
cached under the hashes of the weights, the images and the settings, so another budget costs nothing.
"""

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from fnmatch import fnmatch

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn
from tqdm import tqdm

from pipeline import datafit, factorize
from pipeline.atomic import write_text
from pipeline.cache import cache_base
from pipeline.decompose import fit_chain, set_submodule, unsupported_reason
from pipeline.errors import StageError
from pipeline.layer_latency import layer_latency_ms
from pipeline.macs import count
from pipeline.measure import host_machine
from pipeline.ranks import round_up

VERSION = 2  # bump when what a table means changes, so stale caches are not reused


@dataclass(frozen=True)
class Candidate:
    layer: str
    method: str | None  # None: the layer kept dense
    ranks: tuple[int, ...]
    macs: int
    params: int
    kl: float  # mean KL(dense || this) over the held-out images, in nats
    agreement: float  # top-1 agreement with the dense model on them
    latency_ms: float | None = None  # host int8 latency of the layer or chain alone (batch 1, one thread)


def candidate_ranks(layer: nn.Module, method: str, *, fractions: tuple[float, ...], round_to: int) -> list[tuple[int, ...]]:
    """Ranks at each fraction of every mode's maximum, rounded to the target's multiple, deduplicated."""
    maxima = factorize.max_ranks(layer, method)
    found = []
    for fraction in fractions:
        ranks = tuple(round_up(max(1, round(fraction * m)), round_to, m) for m in maxima)
        if ranks not in found:
            found.append(ranks)
    return found


def _fingerprint(module: nn.Module, *arrays: np.ndarray, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps({**settings, "version": VERSION}, sort_keys=True).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _kl(dense: torch.Tensor, logits: torch.Tensor) -> float:
    return float(F.kl_div(F.log_softmax(logits, 1), F.log_softmax(dense, 1), log_target=True, reduction="batchmean"))


def sensitivities(module: nn.Module, *, input_shape: tuple[int, ...], fit_x: np.ndarray | None, heldout_x: np.ndarray,
                  methods: tuple[str, ...], fractions: tuple[float, ...], round_to: int,
                  layers: tuple[str, ...] = ("*",), exclude: tuple[str, ...] = (), seed: int = 0,
                  quantization=None, use_cache: bool = True, progress: bool = True) -> tuple[list[Candidate], dict]:
    """Every candidate of every selected layer (a dense entry per layer included), and facts about the
    run: whether the cache answered, its path, the seconds spent. Without `fit_x` the factors fit the weights.
    With `quantization` (a targets.Quantization) each candidate's int8 latency on this host is measured too."""
    settings = {"methods": list(methods), "fractions": list(fractions), "round_to": round_to, "layers": list(layers),
                "exclude": list(exclude), "seed": seed, "input_shape": list(input_shape),
                "latency": None if quantization is None else {**asdict(quantization), "host": host_machine()}}
    key = _fingerprint(module, *([] if fit_x is None else [fit_x]), heldout_x, settings={**settings, "data_aware": fit_x is not None})
    path = cache_base() / "sensitivity" / f"{key[:24]}.json"
    if use_cache and path.is_file():
        data = json.loads(path.read_text())
        return [Candidate(**{**c, "ranks": tuple(c["ranks"])}) for c in data["candidates"]], \
            {"cached": True, "path": str(path), "seconds": data["seconds"]}
    started = time.perf_counter()
    costs = count(module, input_shape)
    dense_model = module.eval()
    work = copy.deepcopy(module).eval()
    names = [n for n, c in costs.items() if any(fnmatch(n, p) for p in layers)
             and not any(fnmatch(n, p) for p in exclude) and not unsupported_reason(module.get_submodule(n))]
    held_t = torch.from_numpy(np.ascontiguousarray(heldout_x, dtype=np.float32))
    io = {} if fit_x is None else datafit.layer_io(
        dense_model, names, torch.from_numpy(np.ascontiguousarray(fit_x, dtype=np.float32)))
    with torch.inference_mode():
        reference = dense_model(held_t)
    timed: dict[tuple, float | None] = {}  # by shape: ResNets repeat each block's shapes many times

    def latency(module: nn.Module, shape: tuple[int, ...]) -> float | None:
        if quantization is None:
            return None
        key = (shape, tuple((type(m).__name__, tuple(m.weight.shape), str(getattr(m, "stride", "")),
                             str(getattr(m, "padding", "")), str(getattr(m, "dilation", "")), getattr(m, "groups", 1))
                            for m in (module if isinstance(module, nn.Sequential) else [module])))
        if key not in timed:
            timed[key] = layer_latency_ms(module, shape, quantization=quantization)
        return timed[key]

    found = []
    jobs = [(n, m, r) for n in names for m in _methods_for(module.get_submodule(n), methods)
            for r in candidate_ranks(module.get_submodule(n), m, fractions=fractions, round_to=round_to)]
    bar = tqdm(jobs, desc="sensitivity", unit="candidate", disable=not progress, leave=False)
    for name in names:
        layer = module.get_submodule(name)
        shape = costs[name].input_shape
        found.append(Candidate(name, None, (), costs[name].macs, costs[name].params, 0.0, 1.0, latency(layer, shape)))
        for method, ranks in ((m, r) for n, m, r in jobs if n == name):
            bar.update()
            chain = factorize.skeleton(layer, method, ranks)
            macs = sum(c.macs for c in count(chain, costs[name].input_shape).values())
            if macs >= costs[name].macs:
                continue
            try:
                with threadpool_limits(limits=1):
                    x, y = io.get(name, (None, None))
                    chain, _, _ = fit_chain(layer, method, ranks, x=x, y=y, seed=seed)
            except StageError:  # CP-ALS that diverged is simply not a candidate
                continue
            set_submodule(work, name, chain)
            with torch.inference_mode():
                logits = work(held_t)
            set_submodule(work, name, layer)
            found.append(Candidate(name, method, ranks, macs, sum(p.numel() for p in chain.parameters()),
                                   round(_kl(reference, logits), 8),
                                   round(float((logits.argmax(1) == reference.argmax(1)).float().mean()), 6),
                                   latency(chain, shape)))
    bar.close()
    seconds = round(time.perf_counter() - started, 2)
    write_text(path, json.dumps({"settings": settings, "seconds": seconds,
                                 "candidates": [asdict(c) for c in found]}, indent=1))
    return found, {"cached": False, "path": str(path), "seconds": seconds}


def _methods_for(layer: nn.Module, methods: tuple[str, ...]) -> tuple[str, ...]:
    return ("svd",) if isinstance(layer, nn.Linear) else methods

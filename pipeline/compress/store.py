"""Save and reload a factored model as plain data: its plan plus a state dict (loadable with weights_only=True)."""

import json
import os

import torch
from torch import nn

from pipeline.compress.decompose import set_submodule
from pipeline.compress.methods import METHODS
from pipeline.compress.plan import DecompositionPlan
from pipeline.compress.prune import prune
from pipeline.errors import InputError
from pipeline.util import atomic_path

FORMAT = "cnn-deploy/factored-v3"  # v3: the plan may hold channel cuts; v2: linear layers name 'linear-svd'
READS = ("cnn-deploy/factored-v2", FORMAT)  # a v2 file is a v3 file without cuts


def save_factored(path: str | os.PathLike, model: nn.Module, plan: DecompositionPlan, *, model_name: str,
                  input_shape: tuple[int, ...] | None = None) -> None:
    """`input_shape` is needed to rebuild a model whose plan cuts channels (the pruner traces the model)."""
    payload = {"format": FORMAT, "model": model_name, "plan": plan.to_json(), "state_dict": model.state_dict(),
               "input_shape": list(input_shape) if input_shape else None}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_factored(path: str | os.PathLike, base: nn.Module) -> tuple[nn.Module, DecompositionPlan, str]:
    """Rebuild the factored layer chains on `base` (the dense architecture) and load the saved weights."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") not in READS:
            raise InputError(f"{path}: format {payload.get('format')!r}, expected {FORMAT!r}; write it again with "
                             "`cnn-deploy decompose --out`")
        plan = DecompositionPlan.from_dict(json.loads(payload["plan"]))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: not a factored model written by `cnn-deploy decompose` ({exc})") from exc
    if plan.cuts:  # the same channels cut again, then the chains built on the cut layers
        shape = payload.get("input_shape")
        if not shape:
            raise InputError(f"{path}: its plan cuts channels but the file names no input shape; write it again with "
                             "`cnn-deploy decompose --out`")
        base, _ = prune(base, tuple(shape), {g: len(k) for g, k in plan.cuts.items()}, indices=plan.cuts)
    for layer in plan.layers:
        if layer.method:
            set_submodule(base, layer.name, METHODS[layer.method].skeleton(base.get_submodule(layer.name), layer.ranks))
    missing, unexpected = base.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise InputError(f"{path}: weights do not fit model {payload['model']!r} (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return base.eval(), plan, payload["model"]

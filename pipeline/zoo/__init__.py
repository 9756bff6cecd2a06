"""The model zoo: named networks with their input shape, normalisation and reference weights.

A model is also accepted as `package.module:callable` (returning an `nn.Module`) plus a state-dict
checkpoint. Checkpoints are untrusted input: they load with `torch.load(..., weights_only=True)`.
"""

import glob
import importlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import InputError, unknown
from pipeline.util import sha256_file
from pipeline.zoo.nets import CifarResNet, SeedNet

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The ResNet checkpoints were trained with ImageNet statistics; seednet with the founding document's 0.5/0.5.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
SEEDNET_WEIGHTS = Path(__file__).with_name("seednet.pt")


@dataclass(frozen=True)
class ModelSpec:
    """A network ready to run: the module (eval mode) and what its input must look like."""

    name: str
    module: nn.Module = field(repr=False, compare=False)
    input_shape: tuple[int, int, int]  # C, H, W of one sample
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = CIFAR10_CLASSES
    weights: str | None = None
    weights_sha256: str | None = None


@dataclass(frozen=True)
class _ZooEntry:
    build: Callable[[], nn.Module]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_weights: Callable[[], Path | None]


def _resnet_weights(name: str) -> Callable[[], Path | None]:
    def find() -> Path | None:
        folder = os.environ.get("CIFAR_RESNET_DIR")
        hits = sorted(glob.glob(os.path.join(folder, f"{name}-*.th"))) if folder else []
        return Path(hits[0]) if hits else None

    return find


ZOO: dict[str, _ZooEntry] = {
    "seednet": _ZooEntry(SeedNet, HALF, HALF, lambda: SEEDNET_WEIGHTS),
    **{
        f"resnet{d}": _ZooEntry(lambda d=d: CifarResNet(d), IMAGENET_MEAN, IMAGENET_STD, _resnet_weights(f"resnet{d}"))
        for d in (20, 32, 44, 56)
    },
}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely; accept a bare state dict or one under 'state_dict', DataParallel prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Checkpoint {str(path)!r} does not exist (expected a PyTorch state-dict file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"Checkpoint {str(path)!r} was refused: it holds Python objects other than tensors, and loading "
            f"it would run code ({first_line}). Save only the state dict: torch.save(model.state_dict(), path)"
        ) from exc
    except Exception as exc:  # torch raises several types for a truncated or non-zip file
        raise InputError(f"Checkpoint {str(path)!r} could not be read ({type(exc).__name__}: {exc}); "
                         "expected a file written by torch.save") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"Checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(module: nn.Module, path: str | os.PathLike, *, model_name: str) -> None:
    state = read_state_dict(path)
    own = module.state_dict()
    # BatchNorm's step counter is absent from checkpoints older than torch 0.4 and unused in eval
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise InputError(
            f"Checkpoint {str(path)!r} does not fit model {model_name!r}: "
            f"missing keys {_few(missing)}, unexpected keys {_few(unexpected)}"
        )
    wrong = [f"{k} {tuple(state[k].shape)} (model wants {tuple(own[k].shape)})"
             for k in state if state[k].shape != own[k].shape]
    if wrong:
        raise InputError(f"Checkpoint {str(path)!r} does not fit model {model_name!r}: shapes differ for {_few(wrong)}")
    module.load_state_dict(state, strict=False)


def _few(items: list[str], limit: int = 6) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _import_callable(spec: str) -> Callable[[], nn.Module]:
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"Model {spec!r} could not be imported ({exc}); expected 'package.module:callable'") from exc


def load_model(name: str, weights: str | os.PathLike | None = None, *, pretrained: bool = True) -> ModelSpec:
    """Build a zoo model (or a user's `package.module:callable`) and load its weights.

    `pretrained=False` returns freshly initialised weights (for training and tests).
    """
    if ":" in name:
        module = _import_callable(name)()
        if not isinstance(module, nn.Module):
            raise InputError(f"Model {name!r} returned a {type(module).__name__}, expected a torch.nn.Module")
        shape = tuple(getattr(module, "input_shape", (3, 32, 32)))
        mean = tuple(getattr(module, "mean", HALF))
        std = tuple(getattr(module, "std", HALF))
        if pretrained and weights is None:
            raise InputError(f"Model {name!r} needs a checkpoint: pass WEIGHTS=path/to/state_dict.pt")
    elif name in ZOO:
        entry = ZOO[name]
        module, shape, mean, std = entry.build(), (3, 32, 32), entry.mean, entry.std
        if pretrained and weights is None:
            weights = entry.default_weights()
            if weights is None:
                raise InputError(
                    f"Model {name!r} needs weights and none were given: pass WEIGHTS=path/to/{name}-*.th "
                    "(the akamaster/pytorch_resnet_cifar10 checkpoints) or set CIFAR_RESNET_DIR to their folder"
                )
    else:
        raise unknown("model", name, [*ZOO, "package.module:callable"])
    if pretrained:
        load_weights(module, weights, model_name=name)
    module.eval()
    return ModelSpec(
        name=name, module=module, input_shape=shape, mean=mean, std=std,
        weights=str(weights) if pretrained else None,
        weights_sha256=sha256_file(weights) if pretrained else None,
    )

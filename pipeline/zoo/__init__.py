"""The model zoo: named networks with their input shape, normalisation, class names and reference weights.

A model is also accepted as an ONNX file (`path/to/model.onnx`): it is read into a torch module whose convs are
`nn.Conv2d` (see `pipeline.zoo.onnx_model`), its input shape from the graph, its weights from the file; and as a
Keras file (.keras, .h5), a SavedModel folder or a float .tflite, converted to ONNX by tf2onnx in the TensorFlow
environment (`pipeline.zoo.tensorflow_model`).

A model is also accepted as `package.module:callable` or `path/to/file.py:callable` (returning an `nn.Module`)
plus a state-dict checkpoint; the working directory is importable, as it is for `python -m`. Its input shape,
mean, std and class names come from the module's attributes (`input_shape`, `mean`, `std`, `class_names`) or
from overrides (INPUT_SHAPE=, MEAN=, STD= in make). Checkpoints are untrusted input: they load with
`torch.load(..., weights_only=True)`.
"""

import dataclasses
import glob
import importlib
import importlib.util
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from calib.formats import CIFAR10_CLASSES, FASHION_CLASSES
from pipeline.errors import InputError, unknown
from pipeline.util import sha256_file
from pipeline.zoo.nets import CifarResNet, SeedNet
from pipeline.zoo.tensorflow_model import is_tensorflow_model
from pipeline.zoo.tflite_file import read_tflite
from pipeline.zoo.tiny import DSCNN, FashionNet, MobileNetV1, ResNet8

# MLPerf Tiny keyword spotting: ten Speech Commands words, then silence and unknown, in the reference's order
KWS_CLASSES = ("down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes", "silence", "unknown")
VWW_CLASSES = ("no-person", "person")
# The ResNet checkpoints were trained with ImageNet statistics; seednet with the founding document's 0.5/0.5.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
HALF = (0.5, 0.5, 0.5)
HERE = Path(__file__).parent


@dataclass(frozen=True)
class ModelSpec:
    """A network ready to run: the module (eval mode) and what its input must look like."""

    name: str
    module: nn.Module = field(repr=False, compare=False)
    input_shape: tuple[int, int, int]  # C, H, W of one sample
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None  # None: the data's names, or class0..classN-1
    weights: str | None = None
    weights_sha256: str | None = None
    source: dict | None = field(default=None, compare=False)  # an ONNX file's import: its path, opset, match to ORT

    @property
    def num_classes(self) -> int:
        """The classifier's width, read from one forward pass on zeros (the module decides, not a constant)."""
        with torch.no_grad():
            return int(self.module(torch.zeros(1, *self.input_shape)).shape[-1])


@dataclass(frozen=True)
class _ZooEntry:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    default_weights: Callable[[], Path | None] = lambda: None
    weights_hint: str = "path/to/state_dict.pt"
    about: str = ""  # how to get weights when there are no default ones


def _resnet_weights(name: str) -> Callable[[], Path | None]:
    def find() -> Path | None:
        folder = os.environ.get("CIFAR_RESNET_DIR")
        hits = sorted(glob.glob(os.path.join(folder, f"{name}-*.th"))) if folder else []
        return Path(hits[0]) if hits else None

    return find


def _committed(file: str) -> Callable[[], Path | None]:
    return lambda: HERE / file if (HERE / file).is_file() else None


_RESNET_HELP = "(the akamaster/pytorch_resnet_cifar10 checkpoints) or set CIFAR_RESNET_DIR to their folder"
ZOO: dict[str, _ZooEntry] = {
    "seednet": _ZooEntry(SeedNet, (3, 32, 32), HALF, HALF, CIFAR10_CLASSES, _committed("seednet.pt")),
    **{
        f"resnet{d}": _ZooEntry(lambda d=d: CifarResNet(d), (3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, CIFAR10_CLASSES,
                                _resnet_weights(f"resnet{d}"), f"path/to/resnet{d}-*.th", _RESNET_HELP)
        for d in (20, 32, 44, 56)
    },
    "resnet8": _ZooEntry(ResNet8, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, CIFAR10_CLASSES, _committed("resnet8.pt")),
    "fashionnet": _ZooEntry(FashionNet, (1, 28, 28), (0.286,), (0.353,), FASHION_CLASSES, _committed("fashionnet.pt")),
    # features arrive normalised by the front end (MFCCs), images as 0..1: neither is shifted here
    "dscnn": _ZooEntry(DSCNN, (1, 49, 10), (0.0,), (1.0,), KWS_CLASSES,
                       about="(train it on your own MFCC features: cnn-deploy train --model dscnn --data ...)"),
    "mobilenetv1_025": _ZooEntry(MobileNetV1, (3, 96, 96), HALF, HALF, VWW_CLASSES,
                                 about="(train it on your own 96x96 images: cnn-deploy train --model mobilenetv1_025 --data ...)"),
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
    """`package.module:callable` (the working directory importable) or `path/to/file.py:callable`."""
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            if not path.is_file():
                raise InputError(f"Model {spec!r}: {str(path)!r} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"_user_model_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # console scripts leave it out; `python -m` puts it in
            module = importlib.import_module(target)
        return getattr(module, attr)
    except InputError:
        raise
    except Exception as exc:  # the user's code: a SyntaxError or any error its import raises
        raise InputError(f"Model {spec!r} could not be imported ({type(exc).__name__}: {exc}); expected "
                         "'package.module:callable' (importable from the working directory) or "
                         "'path/to/file.py:callable'") from exc


def per_channel(values, what: str, channels: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in ([values] if isinstance(values, int | float) else values))
    if len(values) == 1:
        values *= channels  # one value serves every channel
    if len(values) != channels:
        raise InputError(f"Model {name!r}: {what} has {len(values)} values for {channels} input channels; "
                         f"expected 1 or {channels}")
    if what == "std" and min(values) <= 0:
        raise InputError(f"Model {name!r}: std {values}; expected positive values")
    return values


def parse_shape(text: str) -> tuple[int, int, int]:
    """'1x49x10' or '3,96,96' (C x H x W) to a tuple; one readable error otherwise."""
    parts = text.replace(",", "x").lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"Input shape {text!r}; expected C x H x W, e.g. 1x49x10 or 3x96x96")
    return shape


def load_model(name: str, weights: str | os.PathLike | None = None, *, pretrained: bool = True,
               input_shape: Sequence[int] | None = None, mean: Sequence[float] | float | None = None,
               std: Sequence[float] | float | None = None, class_names: Sequence[str] | None = None,
               signature: str | None = None) -> ModelSpec:
    """Build a zoo model (or a user's `module:callable`) and load its weights.

    Overrides win over the module's attributes and the zoo's values. `pretrained=False` returns freshly
    initialised weights (for training and tests). `signature` picks a SavedModel's serving function.
    """
    if name.endswith(".onnx"):
        return _load_onnx(name, weights, input_shape=input_shape, mean=mean, std=std, class_names=class_names)
    if is_tensorflow_model(name):
        return _load_tensorflow(name, weights, signature=signature, input_shape=input_shape, mean=mean, std=std,
                                class_names=class_names)
    if ":" in name:
        factory = _import_callable(name)
        try:
            module = factory()
        except Exception as exc:  # the user's factory, called without arguments
            raise InputError(f"Model {name!r}: calling it raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(module, nn.Module):
            raise InputError(f"Model {name!r} returned a {type(module).__name__}, expected a torch.nn.Module")
        given = {"input_shape": input_shape, "mean": mean, "std": std}
        found = {k: v if v is not None else getattr(module, k, None) for k, v in given.items()}
        missing = [k for k, v in found.items() if v is None]
        if missing:
            how = {"input_shape": "INPUT_SHAPE=1x49x10 (make) or --input-shape", "mean": "MEAN=0.5 or --mean",
                   "std": "STD=0.25 or --std"}
            raise InputError(f"Model {name!r} does not say its {', '.join(missing)}: set the attribute(s) "
                             f"{', '.join(missing)} on the module, or give " + "; ".join(how[k] for k in missing))
        shape, mean, std = tuple(int(v) for v in found["input_shape"]), found["mean"], found["std"]
        names = class_names if class_names is not None else getattr(module, "class_names", None)
        if pretrained and weights is None:
            raise InputError(f"Model {name!r} needs a checkpoint: pass WEIGHTS=path/to/state_dict.pt")
    elif name in ZOO:
        entry = ZOO[name]
        module = entry.build()
        shape = tuple(input_shape) if input_shape is not None else entry.input_shape
        mean = mean if mean is not None else entry.mean
        std = std if std is not None else entry.std
        names = class_names if class_names is not None else entry.class_names
        if pretrained and weights is None:
            weights = entry.default_weights()
            if weights is None:
                raise InputError(f"Model {name!r} has no reference weights here: pass WEIGHTS={entry.weights_hint} "
                                 + entry.about)
    else:
        raise unknown("model", name, [*ZOO, "package.module:callable", "path/to/file.py:callable", "path/to/model.onnx",
                                       "model.keras", "model.h5", "saved_model_dir/", "model.tflite (float)"])
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"Model {name!r}: input shape {shape}; expected C x H x W of one sample")
    mean, std = per_channel(mean, "mean", shape[0], name), per_channel(std, "std", shape[0], name)
    if pretrained:
        load_weights(module, weights, model_name=name)
    return _checked(name, module, shape=shape, mean=mean, std=std, names=names,
                    weights=str(Path(weights).resolve()) if pretrained else None,
                    weights_sha256=sha256_file(weights) if pretrained else None)


def _load_tensorflow(name: str, weights, *, signature, input_shape, mean, std, class_names) -> ModelSpec:
    """A Keras, SavedModel or float TFLite file, through its ONNX conversion; `model_source` names the original."""
    from pipeline.zoo.tensorflow_model import convert

    if weights is not None:
        raise InputError(f"Model {name!r} holds its own weights; WEIGHTS={weights} is for PyTorch models: leave it out")
    if name.lower().endswith(".tflite") and read_tflite(name).precision == "int8":
        raise InputError(f"Model {name!r} is a full-int8 TFLite file: it is measured as it is on a microcontroller "
                         f"target, not compressed; give its float model (.tflite, .keras, .h5 or SavedModel) to compress")
    converted = convert(name, signature=signature)
    spec = _load_onnx(name, None, input_shape=input_shape, mean=mean, std=std, class_names=class_names,
                      path=converted.onnx)
    source = {**spec.source, "onnx_sha256": spec.source["sha256"], **converted.record()}
    return dataclasses.replace(spec, weights=str(converted.original), weights_sha256=converted.sha256, source=source)


def _load_onnx(name: str, weights, *, input_shape, mean, std, class_names, path: Path | None = None) -> ModelSpec:
    """An ONNX classifier: shape from the graph (or INPUT_SHAPE=), weights from the file, normalisation given or
    inside the graph. `path`: the file, where `name` is the one it was converted from."""
    from pipeline.zoo.onnx_model import import_onnx  # reads onnx and onnxsim: only when a file is given

    path = path or Path(name).resolve()
    if weights is not None and Path(weights).resolve() != path:
        raise InputError(f"Model {name!r} is an ONNX file, which holds its own weights; WEIGHTS={weights} is for "
                         "PyTorch models: leave it out")
    imported = import_onnx(path, input_shape=input_shape)
    shape = imported.input_shape
    if mean is None or std is None:
        if not imported.normalised_inside:
            raise InputError(f"Model {name!r} does not say how its input is normalised: give MEAN= and STD= (make) "
                             "or --mean/--std, e.g. MEAN=0 STD=1 when the graph takes the data as it is")
        mean, std = (0.0 if mean is None else mean), (1.0 if std is None else std)  # the graph normalises itself
    mean, std = per_channel(mean, "mean", shape[0], name), per_channel(std, "std", shape[0], name)
    digest = sha256_file(path)
    return _checked(name, imported.module, shape=shape, mean=mean, std=std, names=class_names, weights=str(path),
                    weights_sha256=digest, source={"onnx": str(path), "sha256": digest, **imported.record()})


def _checked(name: str, module: nn.Module, *, shape, mean, std, names, weights, weights_sha256,
             source: dict | None = None) -> ModelSpec:
    """The spec, once the module has run on one input and its class count matches the names."""
    module.eval()
    spec = ModelSpec(name=name, module=module, input_shape=shape, mean=mean, std=std,
                     class_names=tuple(str(c) for c in names) if names is not None else None,
                     weights=weights, weights_sha256=weights_sha256, source=source)
    try:
        classes = spec.num_classes
    except RuntimeError as exc:
        raise InputError(f"Model {name!r} does not run on one input of shape {shape} (C x H x W): "
                         f"{str(exc).splitlines()[0]}") from exc
    if spec.class_names is not None and len(spec.class_names) != classes:
        raise InputError(f"Model {name!r} has {classes} outputs but {len(spec.class_names)} class names")
    return spec

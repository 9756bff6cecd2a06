"""Labelled image sets as NHWC arrays, checked on load, with deterministic class-balanced subsets."""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calib import cifar10
from pipeline.errors import InputError


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray = field(repr=False)  # N, H, W, C; uint8 0..255 or float 0..1
    y: np.ndarray = field(repr=False)  # N, int64 class indices
    source: str

    def __len__(self) -> int:
        return len(self.y)

    def take(self, indices: np.ndarray) -> "Dataset":
        return Dataset(self.x[indices], self.y[indices], f"{self.source}[{len(indices)} samples]")


def check(x: np.ndarray, y: np.ndarray, *, source: str, channels: int = 3, num_classes: int = 10) -> Dataset:
    """Refuse data a model cannot take, naming what was got and what was expected."""
    if len(x) == 0:
        raise InputError(f"{source}: zero samples; expected at least one image")
    if x.ndim != 4 or x.shape[-1] != channels:
        raise InputError(f"{source}: images of shape {x.shape}; expected N x H x W x {channels} (NHWC)")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{source}: images of dtype {x.dtype}; expected uint8 (0..255) or float (0..1)")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise InputError(f"{source}: {int((~np.isfinite(x)).sum())} NaN or inf pixel values; expected finite values")
    if y.shape != (len(x),):
        raise InputError(f"{source}: labels of shape {y.shape}; expected ({len(x)},) to match the images")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{source}: labels of dtype {y.dtype}; expected integers")
    if y.min() < 0 or y.max() >= num_classes:
        raise InputError(f"{source}: labels range {y.min()}..{y.max()}; expected 0..{num_classes - 1}")
    return Dataset(x, y.astype(np.int64), source)


def load_dataset(split: str, data: str | os.PathLike | None = None) -> Dataset:
    """`split` is 'train' or 'test'. `data` is a CIFAR-10 folder, a .npz file (`x`, `y`) or None to search."""
    if split not in ("train", "test"):
        raise InputError(f"Unknown split {split!r}; known: test, train")
    if data is not None and str(data).endswith(".npz"):
        return _load_npz(Path(data))
    folder = cifar10.find_cifar10(data)
    x, y = cifar10.read_split(folder, split)
    return check(x, y, source=f"CIFAR-10 {split} ({folder})")


def _load_npz(path: Path) -> Dataset:
    if not path.is_file():
        raise InputError(f"Data file {str(path)!r} does not exist (expected a .npz with arrays 'x' and 'y')")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"x", "y"} - set(npz.files)
            if missing:
                raise InputError(f"{path}: arrays {sorted(npz.files)}; expected 'x' (NHWC images) and 'y' (labels)")
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from exc
    return check(x, y, source=str(path))


def preprocess(x: np.ndarray, *, mean, std) -> np.ndarray:
    """NHWC uint8 (or float 0..1) to the NCHW float32 a model takes, normalised per channel."""
    scaled = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    normalised = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))

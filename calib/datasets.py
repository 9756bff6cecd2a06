"""Labelled sample sets as NHWC arrays, checked on load, and the pair of splits a build draws from."""

from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import InputError


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray = field(repr=False)  # N, H, W, C; uint8 0..255 or float (0..1 for images, any range for features)
    y: np.ndarray = field(repr=False)  # N, int64 class indices
    source: str

    def __len__(self) -> int:
        return len(self.y)

    def take(self, indices: np.ndarray) -> "Dataset":
        return Dataset(self.x[indices], self.y[indices], f"{self.source}[{len(indices)} samples]")


@dataclass(frozen=True)
class DataSplits:
    """A training and a test split that share no sample: calibration, fitting, rank choice and fine-tuning draw
    from `train`, evaluation only from `test`."""

    name: str  # what the report calls the data ("CIFAR-10", "Fashion-MNIST", "image folder flowers")
    location: str  # absolute path it was read from
    train: Dataset
    test: Dataset
    classes: tuple[str, ...] | None = None  # None: the data does not name its classes
    split: str = "given"  # how the test split came about; "given" or the seeded cut made here

    def check_for(self, *, input_shape: tuple[int, int, int], num_classes: int, model: str) -> None:
        """Refuse data the model cannot take: channels, height and width from the model, classes from its output."""
        channels, height, width = input_shape
        for part in (self.train, self.test):
            got = part.x.shape[1:]
            if got != (height, width, channels):
                raise InputError(f"{part.source}: samples of {got[0]}x{got[1]} with {got[2]} channel(s) (H x W x C); "
                                 f"model {model!r} takes {height}x{width} with {channels} (input shape {channels}x"
                                 f"{height}x{width}; give INPUT_SHAPE= if the model's is wrong)")
            if part.y.max() >= num_classes:
                raise InputError(f"{part.source}: labels range {part.y.min()}..{part.y.max()}; model {model!r} has "
                                 f"{num_classes} outputs, so expected 0..{num_classes - 1}")
        if self.classes is not None and len(self.classes) != num_classes:
            raise InputError(f"{self.name} names {len(self.classes)} classes ({', '.join(self.classes[:4])}, ...); "
                             f"model {model!r} has {num_classes} outputs")

    def describe(self) -> dict:
        """What the report and manifest record about the data."""
        return {"name": self.name, "location": self.location, "train_samples": len(self.train),
                "test_samples": len(self.test), "split": self.split,
                "classes": list(self.classes) if self.classes is not None else None}


def check(x: np.ndarray, y: np.ndarray, *, source: str) -> Dataset:
    """Refuse arrays no model can take, naming what was got and what was expected. N x H x W arrays are
    one-channel samples."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) == 0:
        raise InputError(f"{source}: zero samples; expected at least one")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise InputError(f"{source}: samples of shape {x.shape}; expected N x H x W x C (NHWC) or N x H x W")
    if x.shape[-1] > 4 and x.shape[1] <= 4:
        raise InputError(f"{source}: samples of shape {x.shape} look channels-first; expected N x H x W x C (NHWC): "
                         "transpose with x.transpose(0, 2, 3, 1)")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{source}: samples of dtype {x.dtype}; expected uint8 (0..255) or float")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise InputError(f"{source}: {int((~np.isfinite(x)).sum())} NaN or inf values; expected finite values")
    if y.shape != (len(x),):
        raise InputError(f"{source}: labels of shape {y.shape}; expected ({len(x)},) to match the samples")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{source}: labels of dtype {y.dtype}; expected integers")
    if y.min() < 0:
        raise InputError(f"{source}: labels range {y.min()}..{y.max()}; expected class indices from 0")
    return Dataset(x, y.astype(np.int64), source)


def preprocess(x: np.ndarray, *, mean, std) -> np.ndarray:
    """NHWC uint8 (scaled to 0..1) or float to the NCHW float32 a model takes, normalised per channel."""
    scaled = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    normalised = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return normalised.transpose(0, 3, 1, 2).copy(order="C")  # row-major strides even for one channel

"""The data layouts users have, one registered reader each; `load_data` picks the one a path matches.

Each reader's docstring is what the user reads when no layout matches.
"""

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calib import cifar10
from calib.datasets import Dataset, DataSplits, check
from calib.splits import stratified_split
from pipeline.errors import InputError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian's dataset-fashion-mnist
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".pgm", ".ppm")
TEST_FRACTION = 0.2  # of a single x/y file, cut off as the test split
SPLIT_SEED = 0


@dataclass(frozen=True)
class Hint:
    """What the model takes, so image files can be read in its mode and size (never for arrays: those must fit)."""

    channels: int | None = None
    height: int | None = None
    width: int | None = None


class Format:
    name: str = ""
    about: str = ""  # the layout in a few words, for one-line errors

    def matches(self, path: Path) -> bool:
        raise NotImplementedError

    def read(self, path: Path, hint: Hint) -> DataSplits:
        raise NotImplementedError


FORMATS: dict[str, Format] = {}


def _register(cls: type[Format]) -> type[Format]:
    FORMATS[cls.name] = cls()
    return cls


def _npz(path: Path, needed: set[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = needed - set(npz.files)
            if missing:
                raise InputError(f"{path}: arrays {sorted(npz.files)}; expected {', '.join(sorted(needed))}")
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from exc


def _classes(arrays: dict[str, np.ndarray], source: Path) -> tuple[str, ...] | None:
    if "classes" not in arrays:
        return None
    names = arrays["classes"]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise InputError(f"{source}: 'classes' of shape {names.shape} and dtype {names.dtype}; expected a 1-D array "
                         "of class names (np.array(['yes', 'no', ...]))")
    return tuple(str(n) for n in names)


@_register
class Cifar10(Format):
    """CIFAR-10, python version: a folder holding data_batch_1..5 and test_batch (DATA unset: $CIFAR10_DIR, the
    cache, then a download)."""

    name = "cifar-10"
    about = "a folder with data_batch_1..5 and test_batch"

    def matches(self, path: Path) -> bool:
        return path.is_dir() and (path / "test_batch").is_file()

    def read(self, path: Path | None, hint: Hint) -> DataSplits:
        folder = cifar10.find_cifar10(path)
        splits = {s: check(*cifar10.read_split(folder, s), source=f"CIFAR-10 {s} ({folder})") for s in ("train", "test")}
        return DataSplits("CIFAR-10", str(folder.resolve()), splits["train"], splits["test"], CIFAR10_CLASSES)


def _read_idx(path: Path) -> np.ndarray:
    """The MNIST idx format: big-endian magic (dtype code, dimension count), the sizes, then the values."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 4 or blob[:2] != b"\0\0" or blob[2] != 0x08:
        raise InputError(f"{path}: not an idx file of unsigned bytes (magic {blob[:4].hex()})")
    dims = blob[3]
    shape = tuple(int.from_bytes(blob[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(blob, np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise InputError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


@_register
class FashionMnist(Format):
    """Fashion-MNIST: a folder with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz
    and t10k-labels-idx1-ubyte.gz; DATA=fashion-mnist reads Debian's dataset-fashion-mnist package."""

    name = "fashion-mnist"
    about = "'fashion-mnist', or a folder with its four idx files"
    FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def _file(self, folder: Path, stem: str) -> Path | None:
        return next((folder / (stem + s) for s in (".gz", "") if (folder / (stem + s)).is_file()), None)

    def matches(self, path: Path) -> bool:
        return path.is_dir() and all(self._file(path, stem) for pair in self.FILES.values() for stem in pair)

    def read(self, path: Path, hint: Hint) -> DataSplits:
        parts = {split: check(_read_idx(self._file(path, images)), _read_idx(self._file(path, labels)).astype(np.int64),
                              source=f"Fashion-MNIST {split} ({path})")
                 for split, (images, labels) in self.FILES.items()}
        return DataSplits("Fashion-MNIST", str(path.resolve()), parts["train"], parts["test"], FASHION_CLASSES)


@_register
class NpzPair(Format):
    """A folder with train.npz and test.npz, each holding 'x' (N x H x W x C, or N x H x W) and 'y' (class
    indices), optionally 'classes' (names)."""

    name = "npz-pair"
    about = "a folder with train.npz and test.npz (x, y)"

    def matches(self, path: Path) -> bool:
        return path.is_dir() and (path / "train.npz").is_file() and (path / "test.npz").is_file()

    def read(self, path: Path, hint: Hint) -> DataSplits:
        arrays = {s: _npz(path / f"{s}.npz", {"x", "y"}) for s in ("train", "test")}
        parts = {s: check(a["x"], a["y"], source=str(path / f"{s}.npz")) for s, a in arrays.items()}
        names = _classes(arrays["train"], path / "train.npz") or _classes(arrays["test"], path / "test.npz")
        return DataSplits(path.name, str(path.resolve()), parts["train"], parts["test"], names)


@_register
class NpzFile(Format):
    """One .npz holding 'x_train', 'y_train', 'x_test', 'y_test' (optionally 'classes'), or only 'x' and 'y':
    then a seeded, class-stratified 20% of it becomes the test split."""

    name = "npz"
    about = "one .npz with x_train, y_train, x_test, y_test, or x and y"

    def matches(self, path: Path) -> bool:
        return path.suffix == ".npz"

    def read(self, path: Path, hint: Hint) -> DataSplits:
        if not path.is_file():
            raise InputError(f"Data file {str(path)!r} does not exist (expected a .npz with x_train, y_train, x_test, "
                             "y_test, or x and y)")
        arrays = _npz(path, set())
        names = _classes(arrays, path)
        if {"x_train", "y_train", "x_test", "y_test"} <= set(arrays):
            train = check(arrays["x_train"], arrays["y_train"], source=f"{path} (train)")
            test = check(arrays["x_test"], arrays["y_test"], source=f"{path} (test)")
            return DataSplits(path.stem, str(path.resolve()), train, test, names)
        if not {"x", "y"} <= set(arrays):
            raise InputError(f"{path}: arrays {sorted(arrays)}; expected x_train, y_train, x_test, y_test, or x and y")
        whole = check(arrays["x"], arrays["y"], source=str(path))
        train_idx, test_idx = stratified_split(whole.y, TEST_FRACTION, seed=SPLIT_SEED)
        split = (f"no test split given: a seeded (seed {SPLIT_SEED}), class-stratified {TEST_FRACTION:.0%} of the "
                 f"{len(whole)} samples ({len(test_idx)}) is the test split, the other {len(train_idx)} the training split")
        return DataSplits(path.stem, str(path.resolve()), Dataset(whole.x[train_idx], whole.y[train_idx], f"{path} (train part)"),
                          Dataset(whole.x[test_idx], whole.y[test_idx], f"{path} (test part)"), names, split)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


@_register
class ImageFolder(Format):
    """An image-folder tree: train/<class>/*.png|jpg|bmp|... and test/<class>/..., one folder per class (its name
    the class name, sorted order the index). Images are read with Pillow in the model's mode (grey for one
    channel, RGB for three) and resized to its input size when they differ."""

    name = "image-folder"
    about = "a folder with train/<class>/*.png and test/<class>/..."

    def matches(self, path: Path) -> bool:
        return path.is_dir() and (path / "train").is_dir() and (path / "test").is_dir()

    def read(self, path: Path, hint: Hint) -> DataSplits:
        classes = sorted(p.name for p in (path / "train").iterdir() if p.is_dir())
        if not classes:
            raise InputError(f"{path / 'train'}: no class folders; expected train/<class>/*.png")
        tested = sorted(p.name for p in (path / "test").iterdir() if p.is_dir())
        if set(tested) - set(classes):
            raise InputError(f"{path / 'test'}: classes {sorted(set(tested) - set(classes))} have no training folder")
        parts = {s: self._split(path / s, classes, hint) for s in ("train", "test")}
        return DataSplits(f"image folder {path.name}", str(path.resolve()), parts["train"], parts["test"], tuple(classes))

    def _split(self, folder: Path, classes: list[str], hint: Hint) -> Dataset:
        from PIL import Image, UnidentifiedImageError

        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(hint.channels, "RGB")
        xs, ys = [], []
        for index, name in enumerate(classes):
            for file in _image_files(folder / name) if (folder / name).is_dir() else []:
                try:
                    with Image.open(file) as image:
                        image = image.convert(mode)
                        if hint.height and image.size != (hint.width, hint.height):
                            image = image.resize((hint.width, hint.height), Image.Resampling.BILINEAR)
                        xs.append(np.asarray(image, np.uint8).reshape(image.size[1], image.size[0], -1))
                except (OSError, UnidentifiedImageError) as exc:
                    raise InputError(f"{file}: not a readable image ({exc})") from exc
                ys.append(index)
        if not xs:
            raise InputError(f"{folder}: no images in any class folder (looked for {', '.join(IMAGE_SUFFIXES)})")
        sizes = {x.shape for x in xs}
        if len(sizes) > 1:
            raise InputError(f"{folder}: images of several sizes {sorted(sizes)[:4]}; give the model's input shape "
                             "so they are resized to it")
        return check(np.stack(xs), np.asarray(ys), source=str(folder))


def load_data(data: str | os.PathLike | None = None, *, hint: Hint = Hint()) -> DataSplits:
    """The training and test splits of `data`: a path in one of the layouts of FORMATS, 'fashion-mnist', or None
    for CIFAR-10 (searched and fetched as `calib.cifar10` says)."""
    if data is None or str(data).lower() in ("cifar-10", "cifar10"):
        return FORMATS["cifar-10"].read(None, hint)
    if str(data).lower() == "fashion-mnist":
        folder = os.environ.get("FASHION_MNIST_DIR") or next((d for d in FASHION_MNIST_DIRS if Path(d).is_dir()), None)
        if folder is None:
            raise InputError("Fashion-MNIST not found: install Debian's dataset-fashion-mnist (apt-get install "
                             "dataset-fashion-mnist), or set FASHION_MNIST_DIR to a folder with its idx files")
        return FORMATS["fashion-mnist"].read(Path(folder), hint)
    path = Path(data).expanduser()
    if not path.exists():
        raise InputError(f"Data {str(data)!r} does not exist; expected one of: {_layouts()}")
    for fmt in FORMATS.values():
        if fmt.matches(path):
            return fmt.read(path, hint)
    raise InputError(f"Data {str(data)!r} matches no known layout; known: {_layouts()}")


def _layouts() -> str:
    return "; ".join(f"{name} ({fmt.about})" for name, fmt in FORMATS.items())


def load_dataset(split: str, data: str | os.PathLike | None = None, *, hint: Hint = Hint()) -> Dataset:
    """One split ('train' or 'test') of `load_data(data)`."""
    if split not in ("train", "test"):
        raise InputError(f"Unknown split {split!r}; known: test, train")
    return getattr(load_data(data, hint=hint), split)

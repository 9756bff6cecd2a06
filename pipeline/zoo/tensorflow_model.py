"""Keras (.keras, .h5), SavedModel and float .tflite files in: converted to ONNX by tf2onnx, then read by the
ONNX importer like any user's ONNX file.

TensorFlow lives in its own environment (`make setup-tf` makes `.venv-tf`; `CNN_DEPLOY_TF_PYTHON` names another
interpreter), never in the main install: `tf_convert.py` runs there as a subprocess. Conversions are cached by
the file's SHA-256 (the converted file is kept in the build too). The original runs on the same images as the
converted model, so the conversion is checked against TensorFlow itself, not only against ONNX Runtime.
"""

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.util import atomic_path, cache_dir, cache_lock, sha256_bytes, sha256_file

SCRIPT = Path(__file__).with_name("tf_convert.py")
ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = (".keras", ".h5", ".hdf5", ".tflite")
CONVERT_SECONDS = 1800  # a MobileNet converts in under a minute; a hung TensorFlow must not hang the deploy


@dataclass(frozen=True)
class Converted:
    """A TensorFlow file as ONNX: where the ONNX file is and what the converter found."""

    original: Path
    onnx: Path | None  # None where only the original is run
    info: dict  # format, tensorflow and tf2onnx versions, input name and H x W x C
    sha256: str

    def record(self) -> dict:
        """What `report.json` `model_source` says of the original file."""
        return {"file": str(self.original), "sha256": self.sha256, "format": self.info["format"],
                "tensorflow": self.info["tensorflow"], "tf2onnx": self.info["tf2onnx"],
                **({"signature": self.info["signature"]} if "signature" in self.info else {})}


def is_tensorflow_model(name: str) -> bool:
    path = Path(name)
    return path.suffix.lower() in SUFFIXES or (path.is_dir() and (path / "saved_model.pb").is_file())


def tf_python() -> Path:
    """The TensorFlow environment's interpreter, or an error that says how to make it."""
    given = os.environ.get("CNN_DEPLOY_TF_PYTHON")
    python = Path(given) if given else ROOT / ".venv-tf" / "bin" / "python"
    if not python.is_file():
        where = f"CNN_DEPLOY_TF_PYTHON={given}" if given else str(python)
        raise InputError(f"Keras, SavedModel and TFLite files are converted with TensorFlow in its own environment, "
                         f"and there is none at {where}: run `make setup-tf` (TensorFlow and tf2onnx in .venv-tf)")
    return python


def _digest(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())  # a SavedModel folder: every file, by its path
    return sha256_bytes(*(f"{p.relative_to(path)}\0{sha256_file(p)}\0".encode() for p in files))


def _call(*args: str, what: str) -> None:
    try:
        done = subprocess.run([str(tf_python()), str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=CONVERT_SECONDS, check=False)
    except subprocess.TimeoutExpired as exc:
        raise InputError(f"{what}: TensorFlow took over {CONVERT_SECONDS} s") from exc
    if done.returncode == 2:  # the converter's own message about the file
        raise InputError(done.stderr.strip().splitlines()[-1])
    if done.returncode:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
        raise InputError(f"{what} failed (exit {done.returncode}): {' | '.join(tail)}")


def convert(name: str | os.PathLike, *, signature: str | None = None) -> Converted:
    """`name` as ONNX with a channels-first input (cached by content)."""
    path = Path(name).resolve()
    if not path.exists():
        raise InputError(f"Model {str(name)!r} does not exist (expected .keras, .h5, a SavedModel folder or .tflite)")
    digest = _digest(path)
    converter = sha256_file(SCRIPT)[:8]  # a changed converter converts again
    folder = cache_dir("tensorflow", f"{digest[:24]}-{converter}-{signature or 'default'}")
    info_path, onnx_path = folder / "info.json", folder / "model.onnx"
    with cache_lock(info_path):
        if not info_path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                _call("convert", str(path), "--onnx", f"{tmp}/model.onnx", "--info", f"{tmp}/info.json",
                      *(["--signature", signature] if signature else []), what=f"Converting {str(name)!r}")
                shutil.move(f"{tmp}/model.onnx", onnx_path)
                with atomic_path(info_path) as out:  # written last: the entry is complete
                    shutil.copyfile(f"{tmp}/info.json", out)
    return Converted(path, onnx_path, json.loads(info_path.read_text()), digest)


def run_original(converted: Converted, x_nchw: np.ndarray) -> np.ndarray:
    """The original file's outputs (TensorFlow, or LiteRT for a .tflite) on channels-first float inputs."""
    with tempfile.TemporaryDirectory(prefix="cnn-deploy-tf-") as tmp:
        np.save(f"{tmp}/x.npy", np.ascontiguousarray(np.asarray(x_nchw, np.float32).transpose(0, 2, 3, 1)))
        _call("run", str(converted.original), "--inputs", f"{tmp}/x.npy", "--outputs", f"{tmp}/y.npy",
              *(["--signature", converted.info["signature"]] if "signature" in converted.info else []),
              what=f"Running {str(converted.original)!r} in TensorFlow")
        return np.load(f"{tmp}/y.npy")


def check_original(source: dict, x_nchw: np.ndarray, y: np.ndarray, *, dense_logits: np.ndarray, mean, std,
                   normalised_inside: bool) -> tuple[str, str | None]:
    """The original file's own top-1 on the images the dense baseline was measured on, fed the same inputs.

    Returns a note and, where they disagree or the file scores no better than chance (the input it expects is not
    what it was fed), a failure that names the normalisation used."""
    original = run_original(Converted(Path(source["file"]), None, {k: source[k] for k in ("format", "signature")
                                                                    if k in source}, source["sha256"]), x_nchw)
    classes = original.shape[1]
    theirs, ours = original.argmax(1), np.asarray(dense_logits).argmax(1)
    file_top1, dense_top1 = float((theirs == y).mean()), float((ours == y).mean())
    differ = int((theirs != ours).sum())
    runtime = "LiteRT" if source["format"] == "tflite" else f"TensorFlow {source['tensorflow']}"
    note = (f"dense: the original {source['format']} file in {runtime} scores {file_top1:.2%} on the same "
            f"{len(y)} images (the converted model {dense_top1:.2%}; {differ} predictions differ)")
    fed = (f"fed (x - MEAN) / STD with x the data in 0..1, MEAN={_values(mean)} STD={_values(std)}"
           + (" (the graph normalises its input itself)" if normalised_inside else ""))
    if differ > max(1, len(y) // 1000):
        return note, (f"the converted model disagrees with the original {source['format']} file on {differ} of "
                      f"{len(y)} images ({dense_top1:.2%} against {file_top1:.2%}), {fed}")
    if classes > 1 and file_top1 <= 1.5 / classes:
        return note, (f"the original {source['format']} file scores {file_top1:.2%} on these images, about chance "
                      f"for {classes} classes: it was {fed}; a file that takes raw 0..255 pixels needs MEAN=0 "
                      f"STD=0.00392156862745098 (1/255), one that scales inside MEAN=0 STD=1")
    return note, None


def _values(values) -> str:
    values = [float(v) for v in np.atleast_1d(values)]
    return ",".join(f"{v:g}" for v in (values[:1] if len(set(values)) == 1 else values))

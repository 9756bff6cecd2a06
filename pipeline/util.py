"""Helpers every stage shares, written once: atomic writes, hashing, the cache root, the host's name, median
timing and markdown tables."""

import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from filelock import FileLock

from pipeline.errors import InputError

_UMASK = os.umask(0)
os.umask(_UMASK)


# ---- files ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds, so a failure
    never leaves a half-written artefact behind."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artefacts get the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(final: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def write_text(final: str | os.PathLike, text: str) -> Path:
    return write_bytes(final, text.encode())


def staging_beside(out: str | os.PathLike) -> Path:
    """A fresh folder beside `out` (same filesystem, so `swap_in` is a rename) to assemble a build in."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
        staging.chmod(0o755)  # mkdtemp makes 0700; the build folder is for others to read
        return staging
    except OSError as exc:
        raise InputError(f"Output folder {str(out)!r} is not writable ({exc.strerror}); choose another with OUT=") from exc


def swap_in(staging: Path, out: Path) -> None:
    """Replace `out` by the complete `staging` folder: a reader sees the old build or the new one, never a mix."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def cache_dir(*parts: str) -> Path:
    """Where derived, rebuildable data lives (emulator roots, sensitivity tables): $CNN_DEPLOY_CACHE or .cache/."""
    base = Path(os.environ.get("CNN_DEPLOY_CACHE") or Path(__file__).resolve().parents[1] / ".cache")
    return base.joinpath(*parts)


def cache_lock(path: Path) -> FileLock:
    """A lock for building one cache entry: concurrent runs wait for the first, then reuse what it made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_name(f".{path.name}.lock"))


# ---- hashing --------------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value) -> str:
    """A key for settings: the same values in any dictionary order give the same digest."""
    return sha256_bytes(json.dumps(value, sort_keys=True, default=str).encode())


# ---- the host and its clock -----------------------------------------------------------------------------

def host_machine() -> str:
    """Which machine computed host figures: architecture and CPU model (int8 results depend on it)."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{platform.machine()} host, {model}".rstrip(", ")


def seconds(call: Callable[[], object]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def median_ms(call: Callable[[], object], *, runs: int, warmup: int) -> float:
    """Median wall time of `call` in milliseconds, after `warmup` untimed calls (first calls allocate and pack)."""
    for _ in range(warmup):
        call()
    return statistics.median(seconds(call) for _ in range(runs)) * 1e3


# ---- text -----------------------------------------------------------------------------------------------

def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A padded markdown table: readable as plain text in a terminal and rendered as a table in report.md."""
    rows = [tuple(map(str, head)), *(tuple(map(str, r)) for r in rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def onnx_attributes(node) -> dict:
    """An ONNX node's attributes by name, as Python values (the QDQ reader and the ONNX importer both read them)."""
    from onnx.helper import get_attribute_value  # onnx only where a graph is read

    return {a.name: get_attribute_value(a) for a in node.attribute}


def onnx_data_inputs(graph) -> list:
    """A graph's inputs that are not weights: files from before IR version 4 list every initializer as an input too,
    in any order, so `graph.input[0]` need not be the data."""
    weights = {i.name for i in graph.initializer}
    return [v for v in graph.input if v.name not in weights]


# torch's F.interpolate(mode="nearest") and TFLite's RESIZE_NEAREST_NEIGHBOR: the one Resize rule both ends run
NEAREST_FLOOR = ("nearest", "asymmetric", "floor")


def onnx_resize_rule(node) -> tuple[str, str, str]:
    """A Resize node's mode, coordinate transformation and nearest rule, with ONNX's defaults."""
    a = onnx_attributes(node)
    return tuple(v.decode() if isinstance(v, bytes) else v for v in (
        a.get("mode", b"nearest"), a.get("coordinate_transformation_mode", b"half_pixel"),
        a.get("nearest_mode", b"round_prefer_floor")))

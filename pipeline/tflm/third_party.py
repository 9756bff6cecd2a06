"""The firmware's third-party sources (TFLM, CMSIS-NN, CMSIS, flatbuffers, gemmlowp), pinned in
`third_party.toml`: fetched with git at exactly those commits, trimmed to the kept paths, patched as TFLM's own
download scripts do, and verified against the pinned SHA-256 of the kept files before use.

Written here because no package registry ships these trees and TFLM's own download scripts fetch unpinned
archives into its source tree. A checkout elsewhere (CI's `../shared/third_party`, a user's own copy) is
named by `TFLM_SOURCES=`; `cnn-deploy third-party --check DIR` verifies one against the same pins.
"""

import hashlib
import os
import shutil
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import DeviceError
from pipeline.util import cache_dir, cache_lock, sha256_json

PINS_FILE = Path(__file__).with_name("third_party.toml")


@dataclass(frozen=True)
class Pin:
    name: str  # the folder it is kept in
    repository: str
    commit: str  # a full commit hash, or a tag
    licence: str
    keep: tuple[str, ...]
    sha256: str
    drop: tuple[str, ...] = ()
    patch: str = ""  # a patch file, relative to the sources root (i.e. inside another pinned tree)
    moves: dict = field(default_factory=dict)  # a repository folder -> where its files go in the kept tree


def load_pins(path: Path = PINS_FILE) -> tuple[Pin, ...]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return tuple(Pin(name=name, **{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})
                 for name, entry in data.items())


def _kept_files(tree: Path, pin: Pin) -> list[Path]:
    dropped = [tree / d for d in pin.drop]
    files = []
    for kept in pin.keep:
        top = tree / kept
        candidates = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file() or p.is_symlink())
        files += [p for p in candidates if ".git" not in p.relative_to(tree).parts
                  and not any(p == d or d in p.parents for d in dropped)]
    return sorted(set(files))


def tree_digest(tree: Path, pin: Pin) -> str:
    """SHA-256 over the kept files' paths and bytes (a link by its target): equal digests, equal trees."""
    digest = hashlib.sha256()
    for path in _kept_files(tree, pin):
        content = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        digest.update(f"{path.relative_to(tree).as_posix()}\0{hashlib.sha256(content).hexdigest()}\n".encode())
    return digest.hexdigest()


def check(root: Path, pins: tuple[Pin, ...] | None = None) -> dict[str, str | None]:
    """Each pinned tree under `root` against its pin: None where it matches, else what differs."""
    found = {}
    for pin in pins or load_pins():
        tree = root / pin.name
        if not tree.is_dir():
            found[pin.name] = f"missing ({tree} is not a folder)"
            continue
        digest = tree_digest(tree, pin)
        found[pin.name] = None if digest == pin.sha256 else f"SHA-256 {digest}, pinned {pin.sha256}"
    return found


def _git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", "-c", "advice.detachedHead=false", *args], cwd=cwd, capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise DeviceError(f"git {' '.join(args[:2])} failed in {cwd} (exit {done.returncode}): "
                          f"{done.stderr.strip()[-400:]}")
    return done.stdout.strip()


def _fetch_one(pin: Pin, staging: Path, work: Path, *, log) -> None:
    clone = work / pin.name
    clone.mkdir()
    log(f"[third-party] {pin.name}: {pin.repository} at {pin.commit}")
    _git("init", "-q", cwd=clone)
    _git("fetch", "-q", "--depth", "1", pin.repository, pin.commit, cwd=clone)
    _git("checkout", "-q", "FETCH_HEAD", cwd=clone)
    head = _git("rev-parse", "HEAD", cwd=clone)
    if len(pin.commit) == 40 and head != pin.commit:
        raise DeviceError(f"{pin.name}: {pin.repository} gave commit {head}, pinned {pin.commit}")
    if pin.patch:  # the patch lives in an earlier tree (TFLM's); applied in the clone before trimming
        _git("apply", str(staging / pin.patch), cwd=clone)
    for source, target in pin.moves.items():  # `keep` names the kept tree's paths, after these moves
        for path in sorted(p for p in (clone / source).rglob("*") if p.is_file()):
            moved = clone / target / path.relative_to(clone / source)
            moved.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, moved)
    tree = staging / pin.name
    for path in _kept_files(clone, pin):
        target = tree / path.relative_to(clone)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target, follow_symlinks=False)


def fetch(*, pins: tuple[Pin, ...] | None = None, dest: Path | None = None, log=print) -> Path:
    """The pinned trees in one folder of the cache (or `dest`), fetched once with git and verified; a tree that
    does not match its pin is an error naming both digests, and nothing is kept."""
    pins = pins or load_pins()
    dest = dest or _cache_folder(pins)
    if (dest / "verified").is_file():
        return dest
    if shutil.which("git") is None:
        raise DeviceError("Fetching the firmware's sources needs git; run: apt-get install -y git")
    with cache_lock(dest):
        if (dest / "verified").is_file():
            return dest
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
            staging, work = Path(tmp) / "trees", Path(tmp) / "clones"
            staging.mkdir()
            work.mkdir()
            for pin in pins:
                _fetch_one(pin, staging, work, log=log)
            wrong = {name: why for name, why in check(staging, pins).items() if why}
            if wrong:
                raise DeviceError("Fetched sources do not match their pins (nothing kept): " +
                                  "; ".join(f"{name}: {why}" for name, why in wrong.items()))
            (staging / "verified").write_text("".join(f"{p.name} {p.commit} {p.sha256}\n" for p in pins))
            shutil.rmtree(dest, ignore_errors=True)  # an interrupted fetch's leftovers
            os.replace(staging, dest)
    return dest


def _cache_folder(pins: tuple[Pin, ...]) -> Path:
    return cache_dir("third-party", sha256_json([p.__dict__ for p in pins])[:16])


def fetched() -> Path | None:
    """The cache's verified copy of the pinned trees, if `fetch` has made one."""
    dest = _cache_folder(load_pins())
    return dest if (dest / "verified").is_file() else None

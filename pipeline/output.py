"""Output folders: what a run may write into or replace, and who else is writing there.

A deploy replaces its output folder whole, a bench or an MLPerf Tiny run adds to its own, firmware and regress
add to a deploy's build. So a run writes only where this tool wrote before: `OUT` must be absent, empty, or an
earlier output of the same kind (it holds `MARK`). Anything else is refused before any work, and nothing outside
`OUT` (and the cache) is ever moved or deleted. One run at a time writes a folder: a second is refused at once.
"""

import contextlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.errors import ConfigError, InputError
from pipeline.util import cache_dir, sha256_bytes, write_text

MARK = ".cnn-deploy.json"  # what makes a folder this tool's: {"kind": ...}
KINDS = {"deploy": "a deploy build", "bench": "a benchmark folder", "mlperf-tiny": "an MLPerf Tiny run",
         "families": "a comparison of compression families"}
# kinds that add to their folder and never delete from it: they may also start in a folder holding only this
# tool's outputs (bench/ holding bench/mlperf-tiny/)
ADDITIVE = {"bench", "mlperf-tiny"}
# outputs made before the mark existed, recognised by the file each kind always wrote
_LEGACY = {"manifest.json": ("deploy", "target_profile"), "results.json": ("bench", "models"),
           "mlperf-tiny.json": ("mlperf-tiny", "rows")}
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def build_folder(profile_name: str, out: str | os.PathLike | None = None) -> Path:
    """`out`, or `build/<profile name>`: from the profile's name, never its path, so a profile given as
    `TARGET=boards/mine.toml` is not where its own build goes."""
    if out is not None:
        return Path(out)
    if not _SAFE_NAME.fullmatch(profile_name):
        raise ConfigError(f"Profile name {profile_name!r} cannot name a build folder; expected letters, digits, "
                          "'.', '_' or '-' (or give OUT=)")
    return Path("build") / profile_name


def kind_of(folder: Path) -> str | None:
    """Which of this tool's outputs `folder` is, or None when it is not one."""
    try:
        return json.loads((folder / MARK).read_text())["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for name, (kind, key) in _LEGACY.items():
        try:
            if key in json.loads((folder / name).read_text()):
                return kind
        except (OSError, ValueError, TypeError):
            continue
    return None


def mark(folder: Path, kind: str) -> None:
    """Make `folder` recognisable as this tool's `kind` output, so a later run may replace it."""
    write_text(folder / MARK, json.dumps({"kind": kind, "tool": "cnn-deploy"}) + "\n")


def _refuse(out: Path, why: str, option: str, kind: str) -> InputError:
    return InputError(f"{option}={out} {why}; `{kind}` writes only into a new folder, an empty one or "
                      f"{KINDS[kind]} this tool made before. Nothing was changed; choose another {option}= "
                      "(a folder that does not exist yet is best)")


def check_output(out: str | os.PathLike, *, kind: str, inputs: Iterable[str | os.PathLike | None] = (),
                 option: str = "OUT") -> Path:
    """Refuse, before any work, an `out` this `kind` of run could not write without losing a user's files:
    a symbolic link, a file, the current folder (or one holding it), a folder holding one of the run's
    `inputs`, or a non-empty folder that is not an earlier output of the same kind."""
    out = Path(out)
    if out.is_symlink():
        raise _refuse(out, f"is a symbolic link (to {os.readlink(out)}); a run would replace the link, not "
                           "write where it points", option, kind)
    if out.exists() and not out.is_dir():
        raise _refuse(out, "is a file, not a folder", option, kind)
    resolved, here = out.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise _refuse(out, f"is the folder you are in ({here}) or holds it", option, kind)
    for given in inputs:
        if given and resolved in (Path(given).resolve(), *Path(given).resolve().parents):
            raise _refuse(out, f"holds {given}, which this run reads", option, kind)
    if out.is_dir():
        found = kind_of(out)
        entries = sorted(p.name for p in out.iterdir())
        ours = kind in ADDITIVE and all(kind_of(out / name) for name in entries)
        if entries and found != kind and not ours:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            why = (f"is {KINDS[found]}, not {KINDS[kind]}" if found else
                   f"holds files this tool did not make ({shown})")
            raise _refuse(out, why, option, kind)
    return out


def check_build(out: str | os.PathLike, *, option: str = "OUT", hint: str = "") -> Path:
    """`out` must be a deploy's build: firmware and regress add their files to one."""
    out = Path(out)
    if out.is_symlink() or kind_of(out) != "deploy":
        raise InputError(f"{option}={out} is not a build of this tool (no {MARK} or manifest.json there); "
                         f"expected the folder a deploy wrote{hint}")
    return out


@contextlib.contextmanager
def writing(*folders: str | os.PathLike) -> Iterator[None]:
    """Hold `folders` for this run; a second run writing one of them is refused at once, naming it."""
    with contextlib.ExitStack() as held:
        for folder in folders:
            key = sha256_bytes(str(Path(folder).resolve()).encode())[:24]
            lock = cache_dir("locks", f"out-{key}.lock")
            lock.parent.mkdir(parents=True, exist_ok=True)
            try:
                held.enter_context(FileLock(lock, timeout=0))
            except Timeout:
                raise InputError(f"Another cnn-deploy run is writing {folder}; wait for it to finish or choose "
                                 "another OUT=") from None
        yield

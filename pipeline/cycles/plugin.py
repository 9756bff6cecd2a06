"""The block-profile plugin (`blockprof.c`), built with the host's gcc at first use and cached by its source."""

import subprocess
from pathlib import Path

from pipeline.cycles.tools import require
from pipeline.errors import DeviceError
from pipeline.util import atomic_path, cache_dir, sha256_bytes

SOURCE = Path(__file__).with_name("blockprof.c")
FLAGS = ("-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-unused-parameter")


def plugin_path() -> Path:
    """The shared library QEMU loads with `-plugin PATH,out=...`."""
    source = SOURCE.read_bytes()
    path = cache_dir("cycles", f"blockprof-{sha256_bytes(source, ' '.join(FLAGS).encode())[:16]}.so")
    if path.is_file():
        return path
    require("gcc")
    with atomic_path(path) as tmp:  # two builds at once each write their own file; the last rename wins whole
        done = subprocess.run(["gcc", *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, check=False)
        if done.returncode:
            raise DeviceError(f"Building the block-profile plugin failed: {done.stderr.strip()[-600:]}")
    return path


def plugin_arg(path: Path, out: Path, **settings: int) -> str:
    """QEMU's `-plugin` value: the library, where it writes, and how the guest marks phases."""
    return ",".join([str(path), f"out={out}", *(f"{k}={v:#x}" for k, v in settings.items())])

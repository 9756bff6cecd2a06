"""The host tools cycle estimation runs, and the one error a machine without them gets."""

import functools
import shutil
import subprocess

from pipeline.errors import DeviceError

# which Debian package brings each tool
PACKAGES = {"qemu-aarch64": "qemu-user", "qemu-system-arm": "qemu-system-arm", "llvm-mc": "llvm", "llvm-mca": "llvm",
            "gcc": "gcc", "setarch": "util-linux"}


class MissingTool(DeviceError):
    """A host tool cycle estimation needs is not installed; the message names the apt command."""


def require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        packages = " ".join(dict.fromkeys(PACKAGES[t] for t in missing))
        raise MissingTool(f"Estimating board cycles needs {', '.join(missing)}, not installed here; run: "
                          f"apt-get install -y {packages}")


@functools.cache
def llvm_version() -> str:
    require("llvm-mca")
    done = subprocess.run(["llvm-mca", "--version"], capture_output=True, text=True, check=False)
    return next((line.strip() for line in done.stdout.splitlines() if "version" in line), "unknown")


def missing(*tools: str) -> str | None:
    """Why `tools` cannot run here (the apt command), or None when they all can."""
    try:
        require(*tools)
    except MissingTool as exc:
        return str(exc)
    return None

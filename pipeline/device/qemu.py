"""An emulated Raspberry Pi 4: an arm64 Debian root with the aarch64 build of ONNX Runtime, run by qemu-user.

Built from the registries alone (Debian's archive via mmdebstrap, PyPI's aarch64 wheels via the host pip),
cached per ONNX Runtime and numpy version, and checked before use. Only numerics come from emulation.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from pipeline.errors import DeviceError
from pipeline.util import cache_dir

PACKAGES = "python3.11-minimal,libpython3.11-stdlib,libstdc++6,libgcc-s1,zlib1g"
# qemu-user shows the guest the host's x86 /proc/cpuinfo and ORT's cpuinfo reader crashes on it;
# with -L the guest reads this Cortex-A72 description instead.
CPUINFO = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
           "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n")
APT_HINT = "apt-get install -y mmdebstrap qemu-user-static"


def cache_root() -> Path:
    return cache_dir(f"qemu-aarch64-ort{metadata.version('onnxruntime')}-numpy{metadata.version('numpy')}")


def _mirror() -> str:
    """The Debian mirror apt on this machine already uses (the network here reaches only that)."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if path.is_file():
            for line in path.read_text().splitlines():
                words = line.split()
                if line.startswith("URIs:") and len(words) > 1:
                    return words[1]
                if words[:1] == ["deb"] and len(words) > 1:
                    return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def command(root: Path, *args: str) -> tuple[list[str], dict]:
    """argv and environment that run the guest's python 3.11 on `args` as a Cortex-A72."""
    env = {**os.environ, "QEMU_CPU": "cortex-a72", "PYTHONPATH": "/opt/site", "PYTHONDONTWRITEBYTECODE": "1"}
    return [shutil.which("qemu-aarch64-static") or "qemu-aarch64-static", "-L", str(root),
            str(root / "usr/bin/python3.11"), *args], env


def profiled_command(root: Path, workdir: Path, *args: str, plugin: str) -> tuple[list[str], dict]:
    """argv and environment that run the guest's python on `args` (paths relative to `workdir`, the process's
    working directory) under the dynamic qemu-aarch64 with `plugin` (the static build cannot load plugins).

    What the guest executes must not depend on the host: its environment is fixed, every BLAS runs one thread,
    the hash seed is fixed (CYCLES.md), and every path it sees is relative and the same on every host (the root
    is linked into `workdir` as `root`), since path lengths move the guest's stack and heap and with them the
    alignment-dependent paths of copy and vector loops."""
    (workdir / "root").symlink_to(root)
    env = {"QEMU_CPU": "cortex-a72", "PYTHONPATH": "/opt/site", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}
    return [shutil.which("qemu-aarch64") or "qemu-aarch64", "-plugin", plugin, "-L", "root", "-0", "python3",
            "root/usr/bin/python3.11", *args], env


def check(root: Path) -> str:
    """The guest's machine and package versions; raises if the root is broken."""
    argv, env = command(root, "-c", "import platform, numpy, onnxruntime; "
                        "print(platform.machine(), 'numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__)")
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError as exc:
        raise DeviceError(f"qemu-aarch64-static is not installed; run: {APT_HINT}") from exc
    if done.returncode or not done.stdout.startswith("aarch64"):
        raise DeviceError(f"Emulated Raspberry Pi in {root} does not work (exit {done.returncode}): "
                          f"{(done.stderr or done.stdout).strip()[-300:]}; delete it to rebuild")
    return done.stdout.strip()


def ensure(*, log=print) -> Path:
    """The cached root, built on first use (~30 s, ~210 MB)."""
    root = cache_root()
    if (root / "usr/bin/python3.11").exists():
        check(root)
        return root
    missing = [tool for tool in ("mmdebstrap", "qemu-aarch64-static") if shutil.which(tool) is None]
    if missing:
        raise DeviceError(f"Building the emulated Raspberry Pi needs {', '.join(missing)}; run: {APT_HINT}")
    root.parent.mkdir(parents=True, exist_ok=True)
    log(f"[device] building the emulated Raspberry Pi 4 in {root} (once; ~30 s)")
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".qemu-build-") as tmp:
        staging = Path(tmp) / "root"
        _run(["mmdebstrap", "--quiet", "--variant=extract", "--architectures=arm64", f"--include={PACKAGES}",
              "bookworm", str(staging), _mirror()], "mmdebstrap")
        wheels = [f"onnxruntime=={metadata.version('onnxruntime')}", f"numpy=={metadata.version('numpy')}",
                  "flatbuffers", "packaging", "protobuf"]
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
              "--target", str(staging / "opt/site"), "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64",
              "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", *wheels], "pip (aarch64 wheels)")
        (staging / "proc").mkdir(exist_ok=True)
        (staging / "proc/cpuinfo").write_text(CPUINFO)
        check(staging)
        os.replace(staging, root)
    return root


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise DeviceError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")

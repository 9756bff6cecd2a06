"""An emulated Raspberry Pi 4: an arm64 Debian root with the aarch64 build of ONNX Runtime, run by qemu-user.

Built from the registries alone (Debian's archive via mmdebstrap, PyPI's aarch64 wheels via the host pip),
cached per ONNX Runtime and numpy version, and checked before use. Only numerics come from emulation.
"""

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from pipeline.errors import DeviceError
from pipeline.util import cache_dir, cache_lock

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
    the hash seed is fixed (CYCLES.md), every path it sees is relative and the same on every host (the root is
    linked into `workdir` as `root`; python's -P keeps the folder's name out of sys.path), since path lengths
    move the guest's stack and heap and with them the alignment-dependent paths of copy and vector loops; and
    address-space randomisation is off for qemu (setarch -R), whose guest addresses are the host's mmap
    addresses: ONNX Runtime keys some maps by pointer, so where its objects land changes the work it does. The
    guest's random numbers come from a seeded generator (qemu's -seed) and the CPU facts it reads from /sys are a
    Pi 4's, not the host's (`write_board_facts`)."""
    write_board_facts(root)
    (workdir / "root").symlink_to(root)
    # ORT_DISABLE_TELEMETRY: ONNX Runtime's Linux wheels start a telemetry thread on a timer, whose allocations
    # interleave with the inference's by the host's timing and move where its tensors land
    env = {"QEMU_CPU": "cortex-a72", "PYTHONPATH": "/opt/site", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "ORT_DISABLE_TELEMETRY": "1", "LANG": "C.UTF-8",
           "PATH": "/usr/bin:/bin"}
    return ["setarch", platform.machine(), "-R", shutil.which("qemu-aarch64") or "qemu-aarch64", "-plugin", plugin,
            "-seed", "0", "-L", "root", "-0", "python3", "root/usr/bin/python3.11", "-P", *args], env


# What a Raspberry Pi 4's kernel says of its CPUs, for the readers in the guest (ONNX Runtime's cpuinfo sizes its
# kernels' blocking by the caches): four Cortex-A72s, 32 KB L1 data and 48 KB L1 instruction caches each, 1 MB of
# shared L2 (BCM2711; Arm Cortex-A72 TRM). qemu-user reads a guest path under -L's root first, else the host's.
_CACHES = (("0", "1", "Data", "32K", "2", "0"), ("1", "1", "Instruction", "48K", "3", "0"),
           ("2", "2", "Unified", "1024K", "16", "0-3"))


def write_board_facts(root: Path) -> None:
    cpu = root / "sys/devices/system/cpu"
    if (cpu / "complete").is_file():
        return
    facts = {"possible": "0-3", "present": "0-3", "online": "0-3", "kernel_max": "3"}
    for n in range(4):
        facts |= {f"cpu{n}/topology/physical_package_id": "0", f"cpu{n}/topology/core_id": str(n),
                  f"cpu{n}/topology/core_siblings_list": "0-3", f"cpu{n}/topology/thread_siblings_list": str(n),
                  f"cpu{n}/cpufreq/cpuinfo_max_freq": "1500000", f"cpu{n}/cpufreq/cpuinfo_min_freq": "600000"}
        for index, level, kind, size, ways, shared in _CACHES:
            sets = int(size[:-1]) * 1024 // (64 * int(ways))
            facts |= {f"cpu{n}/cache/index{index}/{key}": value for key, value in (
                ("level", level), ("type", kind), ("size", size), ("ways_of_associativity", ways),
                ("coherency_line_size", "64"), ("number_of_sets", str(sets)),
                ("shared_cpu_list", shared if shared != "0" else str(n)))}
    for name, value in facts.items():
        (cpu / name).parent.mkdir(parents=True, exist_ok=True)
        (cpu / name).write_text(value + "\n")
    (cpu / "complete").write_text("")


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
    if not (root / "usr/bin/python3.11").exists():
        with cache_lock(root):  # a run beside this one building the root waits for it, then uses it
            if not (root / "usr/bin/python3.11").exists():
                _build(root, log=log)
    check(root)
    return root


def _build(root: Path, *, log) -> None:
    missing = [tool for tool in ("mmdebstrap", "qemu-aarch64-static") if shutil.which(tool) is None]
    if missing:
        raise DeviceError(f"Building the emulated Raspberry Pi needs {', '.join(missing)}; run: {APT_HINT}")
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
        shutil.rmtree(root, ignore_errors=True)  # an interrupted build's leftovers
        os.replace(staging, root)


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise DeviceError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")

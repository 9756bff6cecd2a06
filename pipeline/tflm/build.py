"""Firmware for Cortex-M parts: TFLM + CMSIS-NN compiled with Debian's arm-none-eabi toolchain, linked with the
model's C array and the harness in `harness/` into an ELF for the emulated MPS2 board.

Written here rather than driving TFLM's own Makefile: that Makefile downloads its dependencies, writes into
the source tree (read-only in CI) and compiles ~300 objects (4-8 minutes on 2 cores, FIRMWARE.md); a CNN
firmware needs the TFLM core, the kernels of the operator table and CMSIS-NN, ~170 objects, compiled once per
(sources, flags, CPU) into the cache and reused by every model.
"""

import concurrent.futures
import functools
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DeviceError
from pipeline.tflm.ops import KERNEL_SOURCES
from pipeline.tflm.third_party import PINS_FILE, fetched, load_pins
from pipeline.util import atomic_path, cache_dir, cache_lock, sha256_bytes, sha256_json

HARNESS = Path(__file__).with_name("harness")
PACKAGES = "gcc-arm-none-eabi libnewlib-arm-none-eabi libstdc++-arm-none-eabi-newlib qemu-system-arm"
TREES = tuple(pin.name for pin in load_pins())
DEFAULT_SOURCES = Path(__file__).resolve().parents[3] / "shared" / "third_party"


@dataclass(frozen=True)
class Cpu:
    flags: tuple[str, ...]  # code generation for the core and its FPU
    machine: str  # the qemu board with this core


CPUS = {
    "cortex-m4": Cpu(("-mcpu=cortex-m4", "-mfpu=fpv4-sp-d16"), "mps2-an386"),  # Cortex-M4F
    "cortex-m7": Cpu(("-mcpu=cortex-m7", "-mfpu=fpv5-d16"), "mps2-an500"),
}
# TFLM's cortex_m_generic flags, less its device headers (the harness has its own clock) and with CMSIS-NN
COMMON = ("-mfloat-abi=hard", "-mthumb", "-mlittle-endian", "-ffunction-sections", "-fdata-sections",
          "-fno-unwind-tables", "-fno-asynchronous-unwind-tables", "-fomit-frame-pointer", "-funsigned-char",
          "-DTF_LITE_STATIC_MEMORY", "-DTF_LITE_DISABLE_X86_NEON", "-DTF_LITE_MCU_DEBUG_LOG", "-DCMSIS_NN",
          "-DNDEBUG", "-DKERNELS_OPTIMIZED_FOR_SPEED")
CXX = ("arm-none-eabi-g++", "-std=c++17", "-fno-rtti", "-fno-exceptions", "-fno-threadsafe-statics")
CC = ("arm-none-eabi-gcc", "-std=c17")
# kernels for speed, the interpreter core for size: FIRMWARE.md's figures were measured so
KERNEL_OPT, CORE_OPT = "-O2", "-Os"
LINK = ("-nostartfiles", "--specs=nano.specs", "--specs=nosys.specs", "-Wl,--gc-sections")


def check_toolchain() -> None:
    missing = [t for t in ("arm-none-eabi-g++", "arm-none-eabi-size", "qemu-system-arm") if shutil.which(t) is None]
    if missing:
        raise DeviceError(f"Building microcontroller firmware needs {', '.join(missing)}; run: apt-get install -y {PACKAGES}")


def sources_root(given: str = "") -> Path:
    """TFLM_SOURCES=, else the profile's `sources`, else the pinned trees `make third-party` fetched into the
    cache, else ../shared/third_party beside the project (this project's CI)."""
    chosen = os.environ.get("TFLM_SOURCES") or given
    root = Path(chosen).expanduser().resolve() if chosen else (fetched() or DEFAULT_SOURCES)
    missing = [tree for tree in TREES if not (root / tree).is_dir()]
    if missing:
        raise DeviceError(f"TFLM sources not found in {root} (missing {', '.join(missing)}); run `make third-party` "
                          f"(fetches the commits pinned in {PINS_FILE.name} with git) or set TFLM_SOURCES= to a "
                          f"folder holding {', '.join(TREES)} at those commits")
    return root


def _includes(root: Path) -> tuple[str, ...]:
    return (f"-I{root / 'tflite-micro'}", f"-I{root / 'flatbuffers/include'}", f"-I{root / 'gemmlowp'}",
            f"-I{root / 'cmsis-nn'}", f"-I{root / 'cmsis-nn/Include'}", f"-I{root / 'cmsis/CMSIS/Core/Include'}",
            f"-I{HARNESS}")


def library_sources(root: Path) -> list[Path]:
    """The TFLM core, the kernels of every builtin the converter writes, and CMSIS-NN's int8 sources."""
    micro = root / "tflite-micro/tensorflow/lite/micro"
    skip = {"debug_log.cc", "micro_time.cc",  # the harness's platform.cc provides both
            "fake_micro_context.cc", "mock_micro_graph.cc", "test_helpers.cc", "test_helper_custom_ops.cc"}
    core = [p for folder in ("", "arena_allocator", "memory_planner", "tflite_bridge")
            for p in sorted((micro / folder).glob("*.cc")) if not p.name.endswith("_test.cc") and p.name not in skip]
    lite = sorted(p for p in (root / "tflite-micro/tensorflow").rglob("*") if p.suffix in (".c", ".cc")
                  and "lite/micro" not in p.as_posix() and "experimental" not in p.as_posix())
    kernels = [micro / "kernels" / name for name in
               dict.fromkeys(["kernel_util.cc", *(f for files in KERNEL_SOURCES.values() for f in files)])]
    cmsis_nn = [p for p in sorted((root / "cmsis-nn/Source").rglob("*.c"))
                if not p.name.endswith(("_f16.c", "_f32.c")) and p.name != "arm_nntables_flt.c"]
    return core + lite + kernels + cmsis_nn


def _command(source: Path, obj: Path, cpu: Cpu, root: Path, *extra: str) -> list[str]:
    fast = "kernels" in source.parts or "cmsis-nn" in source.parts
    tool = CXX if source.suffix in (".cc", ".cpp") else CC
    return [*tool, *cpu.flags, *COMMON, KERNEL_OPT if fast else CORE_OPT, *_includes(root), *extra,
            "-c", str(source), "-o", str(obj)]


def _compile_all(jobs: list[tuple[Path, list[str]]]) -> None:
    def one(job):
        source, argv = job
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode:
            raise DeviceError(f"arm-none-eabi failed on {source.name}: {done.stderr.strip()[-600:]}")

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(one, jobs))


@functools.cache
def library_key(cpu_name: str, root: Path) -> str:
    """What the library is built from: the sources' contents, the flags, the CPU and the compiler."""
    cpu = CPUS[cpu_name]
    return sha256_json([cpu.flags, COMMON, CXX, CC, KERNEL_OPT, CORE_OPT, compiler_version(),
                        [(str(s.relative_to(root)), sha256_bytes(s.read_bytes())) for s in library_sources(root)]])[:16]


def build_library(cpu_name: str, root: Path, *, log=print) -> list[Path]:
    """The compiled TFLM + CMSIS-NN objects for `cpu_name`, from the cache when these sources and flags built
    them before."""
    check_toolchain()
    cpu = CPUS[cpu_name]
    sources = library_sources(root)
    key = library_key(cpu_name, root)
    folder = cache_dir("firmware", f"tflm-{cpu_name}-{key}")
    if not (folder / "complete").is_file():
        log(f"[firmware] compiling TFLM + CMSIS-NN for {cpu_name} ({len(sources)} files, once; cached in {folder})")
    return _compiled(folder, [(s, f"{s.relative_to(root).as_posix().replace('/', '__')}.o") for s in sources],
                     lambda source, obj: _command(source, obj, cpu, root))


def _compiled(folder: Path, units: list[tuple[Path, str]], command) -> list[Path]:
    """The objects of `units` (source, object name) in `folder`, compiled into a staging folder that is swapped
    in whole, so an interrupted build never leaves a half-written object in the cache."""
    objects = [folder / name for _, name in units]
    if (folder / "complete").is_file():
        return objects
    with cache_lock(folder):  # a run beside this one building the same objects waits, then reuses them
        if (folder / "complete").is_file():
            return objects
        staging = folder.with_name(f".{folder.name}.building-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            _compile_all([(source, command(source, staging / name)) for source, name in units])
            (staging / "complete").write_text("\n".join(str(source) for source, _ in units) + "\n")
            shutil.rmtree(folder, ignore_errors=True)  # an interrupted build's leftovers, never a complete one
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return objects


@functools.cache
def compiler_version() -> str:
    done = subprocess.run(["arm-none-eabi-gcc", "-dumpfullversion"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


@dataclass(frozen=True)
class Firmware:
    elf: Path
    map: Path


def link_firmware(model_dir: Path, elf: Path, *, cpu_name: str, root: Path, library: list[Path]) -> Firmware:
    """Compile the harness with `model_dir`'s `model_data.cc`, `model_data.h` and `model_settings.h`, and link
    them with the library into `elf` (and its map file beside it). The model's objects are cached by content,
    so the same model links byte-identically."""
    cpu = CPUS[cpu_name]
    # each object is cached under what it is compiled from: the harness's platform code is shared by every model
    units = [(HARNESS / "main.cc", (model_dir / "model_settings.h", model_dir / "model_data.h", HARNESS / "platform.h")),
             (HARNESS / "platform.cc", (HARNESS / "platform.h",)), (HARNESS / "startup.c", ()),
             (model_dir / "model_data.cc", (model_dir / "model_data.h",))]
    objects = []
    for source, headers in units:
        key = sha256_json([cpu_name, compiler_version(), *(sha256_bytes(p.read_bytes()) for p in (source, *headers))])
        objects += _compiled(cache_dir("firmware", f"unit-{cpu_name}-{key[:16]}"), [(source, f"{source.name}.o")],
                             lambda src, obj: _command(src, obj, cpu, root, f"-I{model_dir}"))
    link = ["arm-none-eabi-g++", *cpu.flags, "-mfloat-abi=hard", "-mthumb", *LINK, "-T", str(HARNESS / "link.ld"),
            "-o", "ELF", *map(str, objects), *map(str, library), "-lm"]
    map_path = elf.with_suffix(".map")
    with atomic_path(elf) as tmp_elf, atomic_path(map_path) as tmp_map:
        argv = [str(tmp_elf) if a == "ELF" else a for a in link] + [f"-Wl,-Map={tmp_map}"]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode:
            raise DeviceError(f"Linking the firmware failed: {done.stderr.strip()[-600:]}")
        # the map names the temporary output file; name the final one so two links of one model are identical
        tmp_map.write_text(tmp_map.read_text().replace(str(tmp_elf), elf.name))
    return Firmware(elf, map_path)


def _portable(argv: list[str], root: Path) -> str:
    return " ".join(shlex.quote(a) for a in argv).replace(str(root), "$TFLM_SOURCES").replace(str(HARNESS), "$HERE")


def rebuild_script(sources: list[Path], *, cpu_name: str, root: Path) -> str:
    """A shell script that rebuilds the ELF from the sources alone (TFLM_SOURCES= points at the trees)."""
    cpu = CPUS[cpu_name]
    pins = ", ".join(f"{pin.name} {pin.commit}" for pin in load_pins())
    lines = ["#!/bin/sh", "# Rebuilds measure.elf (the measuring harness) with the commands cnn-deploy used. Needs Debian's " + PACKAGES + ".",
             f"# TFLM_SOURCES holds the trees pinned in cnn-deploy's pipeline/tflm/third_party.toml ({pins});",
             "# `make third-party` fetches them, `make third-party CHECK=$TFLM_SOURCES` verifies a copy.",
             "set -e", f'TFLM_SOURCES="${{TFLM_SOURCES:-{root}}}"', 'HERE="$(cd "$(dirname "$0")" && pwd)"',
             "mkdir -p obj"]
    own = []
    for name in ("main.cc", "platform.cc", "startup.c", "model_data.cc"):
        own.append(f"obj/{name}.o")
        lines.append(_portable(_command(HARNESS / name, Path(own[-1]), cpu, root), root))
    library = []
    for source in sources:
        library.append(f"obj/{source.relative_to(root).as_posix().replace('/', '__')}.o")
        lines.append(_portable(_command(source, Path(library[-1]), cpu, root), root))
    objects = own + library  # the order link_firmware links in, so the ELF comes out the same
    lines.append(" ".join(["arm-none-eabi-g++", *cpu.flags, "-mfloat-abi=hard", "-mthumb", *LINK, "-T", "$HERE/link.ld",
                           "-o", "measure.elf", "-Wl,-Map=measure.map", *objects, "-lm"]))
    return "\n".join(lines) + "\n"

"""The benchmark firmware: the model in TFLite Micro behind MLPerf Tiny's serial protocol, built for a board.

`benchmark/submitter.cc` implements the protocol's th_* functions; MLPerf Tiny's own `internally_implemented.cpp`
(pinned in third_party.toml, compiled unchanged) parses the host's commands; a board layer (`boards/*.c`, named in
`boards/boards.toml`) gives the UART, the clock and the DWT cycle counter. The same sources build the emulated MPS2
board's image (qemu, its UART on a TCP port) and each real board's, so what the host checks on the emulator is
what a board runs.
"""

import shlex
import shutil
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError, DeviceError
from pipeline.tflm.build import CPUS, LINK, _command, _compile_all
from pipeline.util import atomic_path

HERE = Path(__file__).parent
BOARDS_FILE = HERE / "boards" / "boards.toml"
BENCHMARK = HERE / "benchmark" / "submitter.cc"
EMULATED = "mps2"
DEFAULT_BAUD = 115200


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    sources: tuple[str, ...]  # board layer, startup and runtime support: in pipeline/tflm, or in a pinned tree
    linker: str
    cpu: str = ""  # the board's core ("" = the profile's: the emulated board has both)
    includes: tuple[str, ...] = ()  # in the pinned trees
    defines: tuple[str, ...] = ()
    flash: tuple[int, int] | None = None  # origin, bytes: where the image is flashed
    ram: tuple[int, int] | None = None
    pyocd_target: str = ""

    def path(self, entry: str, root: Path) -> Path:
        """A source or header path of the table: in pipeline/tflm, or in the firmware sources' pinned trees."""
        local = HERE / entry
        return local if local.exists() else root / entry


def load_boards() -> dict[str, Board]:
    with open(BOARDS_FILE, "rb") as f:
        table = tomllib.load(f)
    return {name: Board(name=name, **{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})
            for name, entry in table.items()}


def board_named(name: str) -> Board:
    boards = load_boards()
    if name not in boards:
        raise ConfigError(f"Board '{name}' has no board layer; known: {', '.join(boards)} (pipeline/tflm/boards)")
    return boards[name]


def _linked(argv: list[str], board: Board) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        overflow = [line.split("ld: ")[-1] for line in done.stderr.splitlines() if "overflowed by" in line]
        if overflow:
            raise DeviceError(f"The firmware does not fit {board.description}: {'; '.join(overflow)} (the model, its "
                              "arena and the stack together; give a smaller arena budget or a larger part)")
        raise DeviceError(f"Linking the firmware for {board.name} failed: {done.stderr.strip()[-600:]}")


def _benchmark_argv(model_dir: Path, elf: Path, *, board: Board, cpu: str, root: Path, library: list[Path], baud: int,
                    work: Path) -> tuple[list[tuple[Path, list[str]]], list[str]]:
    """The compile commands (source, argv) and the link command of the benchmark for `board`; `work` holds the
    API's include folder, memory.ld and the objects."""
    flags = [f"-I{HERE / 'boards'}", f"-I{model_dir}", *(f"-I{root / i}" for i in board.includes),
             *(f"-D{d}" for d in board.defines), f'-DTH_MODEL_VERSION="{model_sha256(model_dir)}"',
             f"-DBENCHMARK_BAUD={baud}", f"-I{work / 'include'}"]
    sources = [BENCHMARK, root / "mlperf-tiny-api" / "internally_implemented.cpp", model_dir / "model_data.cc",
               *(board.path(s, root) for s in board.sources)]
    objects = [work / f"obj-{board.name}" / f"{i}-{s.name}.o" for i, s in enumerate(sources)]
    compiles = [(s, _command(s, o, CPUS[cpu], root, *flags)) for s, o in zip(sources, objects, strict=True)]
    link = ["arm-none-eabi-g++", *CPUS[cpu].flags, "-mfloat-abi=hard", "-mthumb", *LINK, "-T",
            str(board.path(board.linker, root)), f"-L{HERE / 'boards'}", f"-L{work}", "-o", str(elf),
            *map(str, objects), *map(str, library), "-lm"]
    return compiles, link


def _memory_ld(board: Board, flash_bytes: int, ram_bytes: int) -> str:
    """The FLASH and RAM regions a real board's linker script includes: the board's origins, the profile's sizes."""
    return (f"MEMORY\n{{\n  FLASH (rx) : ORIGIN = {board.flash[0]:#x}, LENGTH = {flash_bytes or board.flash[1]}\n"
            f"  RAM (rwx) : ORIGIN = {board.ram[0]:#x}, LENGTH = {ram_bytes or board.ram[1]}\n}}\n")


def link_benchmark(model_dir: Path, elf: Path, *, board: Board, cpu: str, root: Path, library: list[Path],
                   baud: int = DEFAULT_BAUD, flash_bytes: int = 0, ram_bytes: int = 0) -> Path:
    """Compile the benchmark with `model_dir`'s model_data.cc, model_data.h and model_settings.h and the board's
    layer, link them with the TFLM library into `elf`, and write `.bin` and `.hex` beside a real board's. The
    protocol's `profile` reply names the model by its SHA-256 (m-model-[...]), so a host can tell which model a
    board runs. `flash_bytes` and `ram_bytes` (the profile's; 0: the board's) bound the link."""
    if board.cpu and board.cpu != cpu:
        raise ConfigError(f"Board '{board.name}' has a {board.cpu}; the profile builds for {cpu}")
    with tempfile.TemporaryDirectory(prefix="cnn-deploy-benchmark-") as tmp:
        work = Path(tmp)
        (work / "include").mkdir()
        (work / "include" / "api").symlink_to(root / "mlperf-tiny-api")  # the API includes itself as "api/..."
        (work / f"obj-{board.name}").mkdir()
        if board.flash is not None and board.ram is not None:
            (work / "memory.ld").write_text(_memory_ld(board, flash_bytes, ram_bytes))
        with atomic_path(elf) as tmp_elf:
            compiles, link = _benchmark_argv(model_dir, tmp_elf, board=board, cpu=cpu, root=root, library=library,
                                             baud=baud, work=work)
            _compile_all(compiles)
            _linked(link, board)
    if board.flash is not None:
        for suffix, kind in ((".bin", "binary"), (".hex", "ihex")):
            with atomic_path(elf.with_suffix(suffix)) as out:
                subprocess.run(["arm-none-eabi-objcopy", "-O", kind, str(elf), str(out)], check=True)
    return elf


def rebuild_lines(folder: Path, *, board: Board, cpu: str, root: Path, library: list[Path], baud: int,
                  elf: str) -> list[str]:
    """build.sh's lines for one benchmark image, with the board layer's files copied into `folder` (a build's
    firmware/, beside the harness): the same commands `link_benchmark` ran, in the script's own paths."""
    for source in (BENCHMARK, *(board.path(s, root) for s in (*board.sources, board.linker) if (HERE / s).exists()),
                   HERE / "boards" / "board.h", HERE / "boards" / "dwt.h",
                   *([HERE / "boards" / "stm32.ld"] if board.flash else [])):
        if not (folder / source.name).exists():
            shutil.copyfile(source, folder / source.name)
    placeholder = Path("/WORK")
    compiles, link = _benchmark_argv(folder, Path(elf), board=board, cpu=cpu, root=root, baud=baud, work=placeholder,
                                     library=[Path("obj") / p.name for p in library])

    def portable(argv: list[str]) -> str:
        text = " ".join(shlex.quote(a) for a in argv)
        for path, variable in ((placeholder / "include", "include"), (placeholder / "obj-", "obj-"),
                               (placeholder, "$HERE"), (HERE / "benchmark", "$HERE"), (HERE / "boards", "$HERE"),
                               (HERE / "harness", "$HERE"), (folder, "$HERE"), (root, "$TFLM_SOURCES")):
            text = text.replace(str(path), variable)
        return text

    lines = [f"# {elf}: the benchmark firmware (MLPerf Tiny's serial protocol) for {board.description}",
             f'mkdir -p include obj-{board.name} && ln -sfn "$TFLM_SOURCES/mlperf-tiny-api" include/api']
    lines += [portable(argv) for _, argv in compiles] + [portable(link)]
    if board.flash is not None:
        lines += [f"arm-none-eabi-objcopy -O binary {elf} {elf[:-4]}.bin",
                  f"arm-none-eabi-objcopy -O ihex {elf} {elf[:-4]}.hex"]
    return lines


def model_sha256(model_dir: Path) -> str:
    """The SHA-256 of the .tflite the C array in `model_dir` holds (model_sources writes it in its banner)."""
    banner = (model_dir / "model_data.h").read_text().splitlines()[0]
    if "sha256 " not in banner:
        raise DeviceError(f"{model_dir / 'model_data.h'} does not name its model's SHA-256: regenerate it")
    return banner.split("sha256 ")[1].split(")")[0]


def vector_table(elf: Path) -> int:
    """Where the image's vector table lies (its first loaded section's address)."""
    done = subprocess.run(["arm-none-eabi-objdump", "-h", str(elf)], capture_output=True, text=True, check=True)
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] in (".isr_vector", ".text"):
            return int(parts[3], 16)
    raise DeviceError(f"{elf} has no .isr_vector or .text section")



def benchmark_images(folder: Path, *, cpu: str, root: Path, board: str = "", baud: int = DEFAULT_BAUD,
                     flash_bytes: int = 0, ram_bytes: int = 0, log=print) -> dict:
    """The benchmark firmware of the model whose C files are in `folder` (a build's `firmware/`): `firmware.elf`
    for `cpu`'s emulated board, with `run-emulated.sh PORT` to start it, and with `board` that board's `board.elf`,
    `.bin` and `.hex`. Returns what was built, with the real board's flash and RAM as linked."""
    from pipeline.tflm.build import build_library
    from pipeline.tflm.emulator import emulated_board_argv, size

    library = build_library(cpu, root, log=log)
    emulated = link_benchmark(folder, folder / "firmware.elf", board=board_named(EMULATED), cpu=cpu, root=root,
                              library=library, baud=baud)
    argv = emulated_board_argv(Path("firmware.elf"), cpu=cpu, port=0)
    argv[argv.index("-kernel") + 1] = '"$HERE/firmware.elf"'
    script = folder / "run-emulated.sh"
    script.write_text("#!/bin/sh\n# Starts firmware.elf on the emulated board, its UART (MLPerf Tiny's serial protocol) on TCP "
                      "127.0.0.1:PORT;\n# qemu waits for the connection, e.g. `cnn-deploy regress --device "
                      "socket://127.0.0.1:PORT`\n# or MLPerf Tiny's runner. Needs Debian's qemu-system-arm.\n"
                      'set -e\nPORT="${1:?usage: run-emulated.sh PORT}"\nHERE="$(cd "$(dirname "$0")" && pwd)"\nexec '
                      + " ".join(a.replace("127.0.0.1:0,", "127.0.0.1:$PORT,") for a in argv) + "\n")
    script.chmod(0o755)
    found = {"emulated": {"elf": emulated.name, **size(emulated)}}
    lines = rebuild_lines(folder, board=board_named(EMULATED), cpu=cpu, root=root, library=library, baud=baud,
                          elf="firmware.elf")
    if board:
        chosen = board_named(board)
        elf = link_benchmark(folder, folder / "board.elf", board=chosen, cpu=cpu, root=root, library=library,
                             baud=baud, flash_bytes=flash_bytes, ram_bytes=ram_bytes)
        (folder / "memory.ld").write_text(_memory_ld(chosen, flash_bytes, ram_bytes))
        lines += rebuild_lines(folder, board=chosen, cpu=cpu, root=root, library=library, baud=baud, elf="board.elf")
        found["board"] = {"name": board, "elf": elf.name, "vector_table": hex(vector_table(elf)), "baud": baud,
                          "flash_capacity_bytes": flash_bytes or chosen.flash[1],
                          "ram_capacity_bytes": ram_bytes or chosen.ram[1], **size(elf)}
    script = folder / "build.sh"
    if script.is_file():  # the measuring harness's script: the benchmark images are rebuilt after it
        script.write_text(script.read_text() + "\n".join(lines) + "\n")
    return found

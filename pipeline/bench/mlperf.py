"""MLPerf Tiny side by side, from MLPerf Tiny's own files (`MLPERF_TINY_DIR`, default ../shared/models/mlperf-tiny):
each reference int8 .tflite measured as it is on a Cortex-M board, beside our dense and factored int8 models made
from the reference float file, and the latencies published for the reference board (NUCLEO-L4R5ZI, Cortex-M4F at
120 MHz; `../shared/models/mlperf-tiny/README.md`).

ResNet-8 runs on CIFAR-10, raw 0..255 pixels as its files take them. Speech Commands and Visual Wake Words are not
on this machine: DS-CNN and MobileNetV1 0.25 run seeded synthetic inputs spread over their int8 input's range,
which is enough for their cost (an int8 kernel does the same work whatever the values) but not for accuracy; the
table marks them. Our models from the float files need the TensorFlow environment (`make setup-tf`); without it
their columns say why they are missing and the reference files are still measured.
"""

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.device.regress import DEFAULT_MLPERF_DIR
from pipeline.errors import ConfigError, InputError
from pipeline.output import check_output, mark, writing
from pipeline.tflm import interpreter
from pipeline.util import markdown_table, write_bytes, write_text
from pipeline.zoo.tflite_file import read_tflite
from targets import load_target


@dataclass(frozen=True)
class Reference:
    """One MLPerf Tiny task: its files, what its input is, and the latencies published on NUCLEO-L4R5ZI (ms)."""

    task: str
    int8_file: str  # the benchmark's submitted model
    float_file: str  # what ours is made from
    classes: int
    published: dict[str, float] = field(default_factory=dict)
    cifar: bool = False  # scored on CIFAR-10 (raw 0..255 pixels); else synthetic inputs, cost only


# Published latencies: TFLM reference kernels (v0.5), microTVM + CMSIS-NN (v1.0), ST X-CUBE-AI 9.0 (v1.2), Plumerai
# (v1.1, arena <= 40 KiB), all measured on NUCLEO-L4R5ZI (../shared/models/mlperf-tiny/README.md).
REFERENCES = {
    "resnet8": Reference("image classification (CIFAR-10)", "pretrainedResnet_quant.tflite", "pretrainedResnet.h5", 10,
                         {"TFLM reference": 704.0, "microTVM": 390.0, "ST X-CUBE-AI": 165.1, "Plumerai": 167.8},
                         cifar=True),
    "dscnn": Reference("keyword spotting (Speech Commands)", "kws_ref_model.tflite", "kws_ref_model_float32.tflite", 12,
                       {"TFLM reference": 181.9, "ST X-CUBE-AI": 43.2}),
    "vww": Reference("visual wake words (96x96)", "vww_96_int8.tflite", "vww_96.h5", 2,
                     {"TFLM reference": 600.6, "ST X-CUBE-AI": 88.9}),
}
PUBLISHED_COLUMNS = ("TFLM reference", "microTVM", "ST X-CUBE-AI", "Plumerai")
SYNTHETIC = {"train": 512, "test": 200}  # samples: calibration and allocation, then the figures nobody reads


def mlperf_dir() -> Path:
    return Path(os.environ.get("MLPERF_TINY_DIR") or DEFAULT_MLPERF_DIR)


def input_normalisation(int8_file: Path) -> tuple[float, float]:
    """MEAN and STD that spread data in 0..1 over the int8 input's whole float range (synthetic inputs)."""
    q = interpreter.io_quant(int8_file.read_bytes())
    low, high = q.input_scale * (-128 - q.input_zero_point), q.input_scale * (127 - q.input_zero_point)
    std = 1.0 / (high - low)
    return -low * std, std


def synthetic_data(shape: tuple[int, int, int], classes: int, path: Path) -> Path:
    """Seeded uint8 inputs of the model's C x H x W shape, labels cycling through the classes."""
    if not path.is_file():
        rng = np.random.default_rng(0)
        c, h, w = shape
        arrays = {}
        for split, count in SYNTHETIC.items():
            arrays[f"x_{split}"] = rng.integers(0, 256, (count, h, w, c), dtype=np.uint8)
            arrays[f"y_{split}"] = np.arange(count) % classes
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes(path, buffer.getvalue())
    return path


def mlperf_tiny(*, target: str = "nucleo-l4r5zi", budget: str = "0.7", data: str | None = None,
                eval_samples: int = 1000, out: str | Path = "bench/mlperf-tiny", log=print) -> Path:
    """Measure each reference int8 file on `target` and deploy our model from its float file at `budget` (builds in
    `out/<model>-reference` and `out/<model>`); write `out/mlperf-tiny.json` and `out/mlperf-tiny.md`."""
    profile = load_target(target)  # an unknown or non-Cortex-M target is refused before any work
    if not profile.firmware.cpu:
        raise ConfigError(f"Target {target!r} runs {profile.runtime} without firmware; MLPerf Tiny's published figures "
                          "are for Cortex-M boards: give one, e.g. nucleo-l4r5zi")
    folder = mlperf_dir()
    missing = [f for r in REFERENCES.values() for f in (r.int8_file, r.float_file) if not (folder / f).is_file()]
    if missing:
        raise InputError(f"MLPerf Tiny's files are not all in {folder}: missing {', '.join(missing)}; set "
                         f"MLPERF_TINY_DIR= to a copy of mlcommons/tiny's benchmark/training models")
    out = check_output(out, kind="mlperf-tiny", inputs=[data])
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        mark(out, "mlperf-tiny")
        return _run(target, budget, folder=folder, data=data, eval_samples=eval_samples, out=out, log=log)


def _figures(variant, *, scored: bool) -> dict:
    board, details = variant.board or {}, variant.details
    firmware = details.get("firmware") or {}
    return {"macs": variant.macs, "ms": board.get("ms"), "cycles": board.get("cycles"),
            "arena_bytes": firmware.get("arena_used_bytes", details.get("arena_bytes")),  # what TFLM used on the board
            "flash_model_bytes": details.get("flash_bytes"), "top1": variant.top1 if scored else None,
            "bit_exact": firmware.get("bit_exact")}


def _run(target: str, budget: str, *, folder: Path, data, eval_samples: int, out: Path, log) -> Path:
    from pipeline.deploy import deploy  # the orchestration, which this command runs twice per model

    rows = []
    for name, ref in REFERENCES.items():
        int8_file = folder / ref.int8_file
        mean, std = (0.0, 1 / 255) if ref.cifar else input_normalisation(int8_file)
        shape = read_tflite(int8_file).input_shape
        own_data = data if ref.cifar else str(synthetic_data(shape, ref.classes, out / "work" / f"{name}-synthetic.npz"))
        samples = eval_samples if ref.cifar else 0
        log(f"[mlperf-tiny] {name}: {ref.int8_file} measured as it is on {target}"
            + ("" if ref.cifar else " (synthetic inputs: cost only)"))
        given = deploy(target=target, model=str(int8_file), mean=mean, std=std, data=own_data, eval_samples=samples,
                       out=out / f"{name}-reference", progress=False)
        row = {"model": name, "task": ref.task, "scored": ref.cifar, "eval_samples": given.eval_samples,
               "reference": _figures(given.variants["given_int8"], scored=ref.cifar), "published_ms": ref.published}
        log(f"[mlperf-tiny] {name}: ours from {ref.float_file} at budget {budget}")
        try:
            ours = deploy(target=target, model=str(folder / ref.float_file), mean=mean, std=std, data=own_data,
                          budget=budget, eval_samples=samples, out=out / name, progress=False)
            row.update(dense=_figures(ours.variants["dense_int8"], scored=ref.cifar),
                       factored=_figures(ours.variants["factored_int8"], scored=ref.cifar))
        except InputError as exc:  # no TensorFlow environment: the reference row stands alone, saying why
            row["ours_missing"] = str(exc)
            log(f"[mlperf-tiny] {name}: ours not made: {exc}")
        rows.append(row)
    profile = load_target(target)
    clock, core = profile.board.clock_mhz, profile.firmware.cpu
    path = write_text(out / "mlperf-tiny.json", json.dumps({"target": profile.name, "budget": budget, "core": core,
                                                            "clock_mhz": clock, "rows": rows}, indent=2) + "\n")
    write_text(out / "mlperf-tiny.md", render(rows, target=profile.name, budget=budget, clock_mhz=clock, core=core))
    return path


def _cell(value, fmt="{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _model_cell(figures: dict | None) -> str:
    """est. ms / arena KiB / top-1 of one model."""
    if not figures:
        return "-"
    top1 = f" / {figures['top1']:.2%}" if figures.get("top1") is not None else ""
    arena = f"{figures['arena_bytes'] / 1024:.1f} KiB" if figures.get("arena_bytes") else "-"
    return f"{_cell(figures['ms'])} ms / {arena}{top1}"


def render(rows: list[dict], *, target: str, budget: str, clock_mhz: float | None, core: str = "cortex-m4") -> str:
    """The table with its caption: what each column is, and what the estimate leaves out."""
    table = markdown_table(
        ("model", "MLPerf's int8 file", "ours, dense int8", f"ours, factored ({budget})",
         *(f"published: {c}" for c in PUBLISHED_COLUMNS)),
        [(f"{r['model']}{'' if r['scored'] else ' *'}", _model_cell(r["reference"]), _model_cell(r.get("dense")),
          _model_cell(r.get("factored")), *(_cell(r["published_ms"].get(c)) for c in PUBLISHED_COLUMNS))
         for r in rows])
    missing = [f"- {r['model']}: ours not made: {r['ours_missing']}" for r in rows if r.get("ours_missing")]
    scored = next((r for r in rows if r["scored"]), None)
    return "\n".join([
        f"# MLPerf Tiny on {target}", "",
        (f"Estimated milliseconds per inference at {clock_mhz:g} MHz" if clock_mhz else
         "No milliseconds estimated here (no clock, or the cycle tools are missing: the builds' notes say which)")
        + " in TFLite Micro + CMSIS-NN firmware (this project's), with the TFLM arena and the int8 top-1 in TFLM"
        + (f" on {scored['eval_samples']} CIFAR-10 test images" if scored else "")
        + ": MLPerf Tiny's own int8 files measured as they are, and our int8 models made from MLPerf Tiny's float "
        f"files (dense, and factored at budget {budget}), beside the latencies published for NUCLEO-L4R5ZI (Cortex-M4F "
        "at 120 MHz): the v0.5 reference submission (TFLM reference kernels), microTVM + CMSIS-NN (v1.0), ST "
        "X-CUBE-AI 9.0 (v1.2) and Plumerai (v1.1).", "",
        table, "",
        "Caption: each cell is est. ms / arena the firmware used on the emulated board / int8 top-1. The estimates are the blocks the firmware executed for one "
        f"inference in qemu-system-arm, each timed by LLVM's {core} scheduling model (llvm-mca). No flash wait states "
        "(5 at 120 MHz on the STM32L4R5, partly hidden by its ART accelerator), caches or bus contention are "
        "modelled, so a board runs somewhat slower than estimated; the published figures were measured on the "
        "board. * synthetic inputs (no Speech Commands or Visual Wake Words data here): their cost is real, their "
        "accuracy and plan are not.", *([""] + missing if missing else []), ""])

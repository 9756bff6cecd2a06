"""MLPerf Tiny side by side: the three image and audio reference models, dense and factored, deployed to a
Cortex-M board and estimated in milliseconds on it, beside the latencies published for the MLPerf Tiny reference
board (NUCLEO-L4R5ZI, Cortex-M4F at 120 MHz; `../shared/docs/CYCLES.md`).

ResNet-8 runs with the zoo's CIFAR-10 weights on the CIFAR-10 data. DS-CNN and MobileNetV1 0.25 have no weights
or data here (Speech Commands and Visual Wake Words are not on this machine): they run freshly initialised weights
(seed 0) on seeded synthetic inputs, which is enough for their cost, since an int8 kernel does the same work
whatever the values, but not for accuracy or for a plan that means anything beyond cost; the table says so.
"""

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.output import check_output, mark, writing
from pipeline.util import markdown_table, write_bytes, write_text
from pipeline.zoo import ZOO
from targets import load_target


@dataclass(frozen=True)
class Published:
    task: str
    reference_ms: float  # MLPerf Tiny v0.5 reference submission, TFLM 2.3.1
    microtvm_ms: float | None  # v1.0, microTVM + CMSIS-NN
    xcube_ms: float | None  # v1.0, ST X-CUBE-AI


PUBLISHED = {
    "resnet8": Published("image classification (CIFAR-10)", 704, 390, 227),
    "dscnn": Published("keyword spotting (Speech Commands)", 182, None, 75.1),
    "mobilenetv1_025": Published("visual wake words (96x96)", 601, None, 230),
}
SYNTHETIC = {"train": 512, "test": 200}  # samples: calibration and allocation, then the figures nobody reads


def _synthetic(name: str, folder: Path) -> tuple[Path, Path]:
    """Seeded initial weights and inputs of the model's shape, for a model without weights or data here."""
    entry = ZOO[name]
    torch.manual_seed(0)
    weights = folder / f"{name}-seed0.pt"
    if not weights.is_file():
        buffer = io.BytesIO()
        torch.save(entry.build().state_dict(), buffer)
        write_bytes(weights, buffer.getvalue())
    data = folder / f"{name}-synthetic.npz"
    if not data.is_file():
        rng = np.random.default_rng(0)
        c, h, w = entry.input_shape
        arrays = {}
        for split, count in SYNTHETIC.items():
            arrays[f"x_{split}"] = rng.integers(0, 256, (count, h, w, c), dtype=np.uint8)
            arrays[f"y_{split}"] = np.arange(count) % len(entry.class_names)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes(data, buffer.getvalue())
    return weights, data


def _ms(report, name: str) -> float | None:
    board = report.variants[name].board
    return board["ms"] if board else None


def mlperf_tiny(*, target: str = "nucleo-l4r5zi", budget: str = "0.7", data: str | None = None,
                eval_samples: int = 1000, out: str | Path = "bench/mlperf-tiny", log=print) -> Path:
    """Deploy each MLPerf Tiny model to `target` at `budget` (one build per model in `out/<model>`) and write
    `out/mlperf-tiny.json` and `out/mlperf-tiny.md`, the estimated milliseconds beside the published ones."""
    profile = load_target(target)  # an unknown or non-Cortex-M target is refused before any work
    if not profile.firmware.cpu:
        raise ConfigError(f"Target {target!r} runs {profile.runtime} without firmware; MLPerf Tiny's published figures "
                          "are for Cortex-M boards: give one, e.g. nucleo-l4r5zi")
    out = check_output(out, kind="mlperf-tiny", inputs=[data])
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        mark(out, "mlperf-tiny")
        return _run(target, budget, data=data, eval_samples=eval_samples, out=out, log=log)


def _run(target: str, budget: str, *, data, eval_samples: int, out: Path, log) -> Path:
    from pipeline.deploy import deploy  # the orchestration, which this command runs once per model

    rows = []
    for name, published in PUBLISHED.items():
        trained = ZOO[name].default_weights() is not None
        weights, own_data = (None, data) if trained else _synthetic(name, out / "work")
        log(f"[mlperf-tiny] {name}: deploy to {target} at budget {budget}"
            + ("" if trained else " (seeded weights, synthetic inputs: cost only)"))
        report = deploy(target=target, model=name, weights=weights, budget=budget, data=own_data,
                        eval_samples=eval_samples, out=out / name, progress=False)
        dense, factored = report.variants["dense_int8"], report.variants["factored_int8"]
        rows.append({"model": name, "task": published.task, "trained": trained, "target": report.target,
                     "macs_dense": dense.macs, "macs_factored": factored.macs,
                     "cycles_dense": (dense.board or {}).get("cycles"), "cycles_factored": (factored.board or {}).get("cycles"),
                     "ms_dense": _ms(report, "dense_int8"), "ms_factored": _ms(report, "factored_int8"),
                     "top1_dense_int8": dense.top1 if trained else None,
                     "top1_factored_int8": factored.top1 if trained else None,
                     "eval_samples": report.eval_samples, "published_ms": published.__dict__})
    board = report.variants["dense_int8"].board or {}
    clock, core = board.get("clock_mhz", 0.0), board.get("core", "?")
    path = write_text(out / "mlperf-tiny.json", json.dumps({"target": report.target, "budget": budget, "core": core,
                                                            "clock_mhz": clock, "rows": rows}, indent=2) + "\n")
    write_text(out / "mlperf-tiny.md", render(rows, target=report.target, budget=budget, clock_mhz=clock, core=core))
    return path


def _cell(value, fmt="{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(rows: list[dict], *, target: str, budget: str, clock_mhz: float | None, core: str = "cortex-m4") -> str:
    """The table with its caption: what each column is, and what the estimate leaves out."""
    table = markdown_table(
        ("model", "MACs dense -> factored", "est. ms dense", f"est. ms factored ({budget})", "int8 top-1 dense / factored",
         "published: reference TFLM", "microTVM + CMSIS-NN", "ST X-CUBE-AI"),
        [(f"{r['model']}{'' if r['trained'] else ' *'}", f"{r['macs_dense'] / 1e6:.2f} M -> {r['macs_factored'] / 1e6:.2f} M",
          _cell(r["ms_dense"]), _cell(r["ms_factored"]),
          f"{r['top1_dense_int8']:.2%} / {r['top1_factored_int8']:.2%} ({r['eval_samples']} images)" if r["trained"] else "-",
          _cell(r["published_ms"]["reference_ms"]), _cell(r["published_ms"]["microtvm_ms"]),
          _cell(r["published_ms"]["xcube_ms"])) for r in rows])
    return "\n".join([
        f"# MLPerf Tiny on {target}", "",
        (f"Estimated milliseconds per inference at {clock_mhz:g} MHz" if clock_mhz else
         "No milliseconds estimated here (no clock, or the cycle tools are missing: the builds' notes say which)")
        + f" for TFLite Micro + CMSIS-NN firmware (this "
        f"project's), dense and factored at budget {budget}, beside the latencies published for NUCLEO-L4R5ZI "
        "(Cortex-M4F at 120 MHz): the MLPerf Tiny v0.5 reference submission (TFLM 2.3.1) and the v1.0 microTVM and ST "
        "X-CUBE-AI results.", "",
        table, "",
        "Caption: the estimates are the blocks the firmware executed for one inference in qemu-system-arm, each timed "
        f"by LLVM's {core} scheduling model (llvm-mca). No flash wait states (5 at 120 MHz on the STM32L4R5, partly "
        "hidden by its ART accelerator), caches or bus contention are modelled, so a board runs somewhat slower than "
        "estimated; the published figures were measured on the board. * seeded, untrained weights on synthetic inputs "
        "(no Speech Commands or Visual Wake Words data here): their cost is real, their plan and accuracy are not.", ""])

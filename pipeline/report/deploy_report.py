"""The deploy report: `report.json` (keys other tools read), `report.md` and the top-1 vs MACs plot."""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.metrics import VariantReport
from pipeline.util import atomic_path, markdown_table, write_text

PLOT = "top1_vs_macs.png"


@dataclass(frozen=True)
class DeployReport:
    target: str
    model: str
    data: dict  # the data set: name, location, sample counts, how the test split came about, class names
    class_names: tuple[str, ...]
    variants: dict[str, VariantReport]
    decomposition: dict
    eval_samples: int
    thresholds: dict
    passed: bool
    top1_drop: float
    notes: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()  # every threshold missed, in words
    warnings: tuple[str, ...] = ()  # every cost factoring made worse than dense (see report.compare)
    device: dict | None = None  # the on-device check, when the profile runs it on deploy
    wall_seconds: float = 0.0
    model_source: dict | None = None  # an ONNX model's file, opset and how closely the torch module matched it

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["notes"], data["failures"], data["warnings"] = list(self.notes), list(self.failures), list(self.warnings)
        data["class_names"] = list(self.class_names)
        return data

    def summary_table(self) -> str:
        lines = [markdown_table(("variant", "MACs", "params", "bytes", "peak act. B", "top-1", "agreement", "latency ms",
                                 "host ms"),
                                [(name, f"{v.macs:,}", f"{v.params:,}", f"{v.bytes:,}", f"{v.peak_activation_bytes:,}",
                                  f"{v.top1:.2%}", f"{v.agreement:.2%}", _latency_cell(v),
                                  f"{v.host_latency_ms:.3f}" if v.host_latency_ms is not None else "-")
                                 for name, v in self.variants.items()])]
        estimated = {n: v for n, v in self.variants.items() if v.board}
        if estimated:
            lines += ["", board_table(estimated)]
        micro = {n: v.details for n, v in self.variants.items() if "arena_bytes" in v.details}
        if micro:
            lines += ["", markdown_table(
                ("int8 in TFLM", "flash B", "arena B", "smallest arena B", "LiteRT top-1", "ORT int8 (QDQ ref.) top-1",
                 "agreement w/ ORT", "max diff (steps)"),
                [(n, f"{d['flash_bytes']:,}", f"{d['arena_bytes']:,}", f"{d['smallest_arena_bytes']:,}",
                  f"{d['litert_top1']:.2%}", *_against_onnx(d)) for n, d in micro.items()])]
        board = {n: v.details["firmware"] for n, v in self.variants.items() if "firmware" in v.details}
        if board:
            lines += ["", firmware_table(board)]
        verdict = "PASSED" if self.passed else "FAILED"
        if "factored_int8" in self.variants:
            lines.append(f"\n{verdict}: factored_int8 top-1 drop vs dense_fp32 {self.top1_drop * 100:+.2f} points "
                         f"(allowed {self.thresholds['max_top1_drop'] * 100:.2f}) on {self.eval_samples} images")
        else:  # a file measured as it is: nothing was compressed, so there is no drop to hold it to
            lines.append(f"\n{verdict}: {', '.join(self.variants)} measured as it is on {self.eval_samples} images")
        lines.extend(f"  - {failure}" for failure in self.failures)
        if self.warnings:
            lines.append(f"WARNING: factoring made {len(self.warnings)} cost(s) worse than dense int8:")
            lines.extend(f"  - {warning}" for warning in self.warnings)
        return "\n".join(lines)


def _against_onnx(details: dict) -> tuple[str, str, str]:
    """The TFLite file against the QDQ ONNX it was converted from; '-' for a file given as it is."""
    if "ort_int8_top1" not in details:
        return "-", "-", "-"
    steps = f"{details['max_output_diff_steps']:g}" + (" (logits)" if details.get("output_diff_on", "output") != "output"
                                                         else "")
    return f"{details['ort_int8_top1']:.2%}", f"{details['ort_agreement']:.2%}", steps


def _latency_cell(variant: VariantReport) -> str:
    """The board's latency, marked where it is this host's instead (no estimate, no board)."""
    return f"{variant.latency_ms:.3f}" + (" (host)" if variant.latency_source == "host" else "")


def board_table(variants: dict[str, VariantReport]) -> str:
    """One inference of each variant on the board's core, estimated; a board's own timing beside it."""
    first = next(iter(variants.values())).board
    dense = {n.split("_")[1]: v.board["cycles"] for n, v in variants.items() if n.startswith("dense")}
    clock = f" at {first['clock_mhz']:g} MHz" if first["clock_mhz"] else ""
    measured = any(v.latency_source == "measured" for v in variants.values())
    head = (f"on the board: {first['core']}{clock}", "instructions", "est. cycles", "est. ms", "cycles vs dense",
            *(["measured ms"] if measured else []))
    rows = []
    for name, v in variants.items():
        b = v.board
        base = dense.get(name.split("_")[1])
        rows.append((name, f"{b['instructions']:,}", f"{b['cycles']:,}", f"{b['ms']:.3f}" if b["ms"] is not None else "-",
                     f"{b['cycles'] / base:.3f}" if base else "-",
                     *([f"{v.latency_ms:.3f}" if v.latency_source == "measured" else "-"] if measured else [])))
    return markdown_table(head, rows)


def _compression_lines(record: dict) -> list[str]:
    """How the plan was reached: the budget allocation and the fine-tuning, when there were any."""
    lines = [record["why"]] if record.get("why") else []  # nothing was compressed, and why
    allocation, tuned = record.get("allocation"), record.get("finetune")
    if allocation:
        source = "read from the cache" if allocation["sensitivity"]["cached"] else \
            f"measured in {allocation['sensitivity']['seconds']:.0f} s"
        kept = allocation.get("kept_by_resource") or {allocation["budget"].split(":")[0]: allocation["kept"]}
        predicted = ", ".join(f"{r} {k:.1%}" for r, k in kept.items())
        lines.append(f"Budget {allocation['budget']}: predicted to keep {predicted} of the dense model's; "
                     f"{allocation['candidates']} candidates ({source}); summed KL of the choices "
                     f"{allocation['predicted_kl']:.4f}; latency weight {allocation['latency_weight']:g}.")
        arena = allocation.get("arena")
        if arena:
            lines.append(f"Arena: estimated {arena['estimated']:,.0f} B before export (dense {arena['dense_estimated']:,.0f} B), "
                         f"measured {arena['measured']:,} B (dense {arena['dense_measured']:,} B; "
                         f"{arena['measured_as']}); allowed {arena['limit']:,} B.")
    if tuned:
        lines.append(tuning_sentence(tuned))
    torch_work = record.get("torch")
    if torch_work and (allocation or tuned):
        lines.append(f"Torch work (sensitivity sweep, fine-tuning) ran on {torch_work['torch_device']}"
                     + (", bf16 mixed precision" if torch_work["mixed_precision"] else "")
                     + ("; deterministic: a rerun gives the same weights." if torch_work["deterministic"] else
                        "; not deterministic: a rerun may differ in the last bits."))
    return [*lines, ""] if lines else []


def tuning_sentence(tuned: dict) -> str:
    """The fine-tuning record in words: epochs, cost, held-out top-1 and, when compressed gradually, each step."""
    steps = [f"{s['budget']} for {len(s['epochs'])} epochs (held-out {s['start_heldout_top1']:.2%} -> "
             f"{s['best_heldout_top1']:.2%})" for s in tuned.get("steps", ())]
    gradual = f" by steps: {', then '.join(steps)}; at the budget" if steps else ""
    optimiser = f", {tuned['optimizer']}" if "optimizer" in tuned else ""  # records from before the setting
    extras = f", weights averaged with decay {tuned['ema_decay']:g}" if tuned.get("ema_decay") else ""
    extras += f", mixup {tuned['mixup']:g}" if tuned.get("mixup") else ""
    extras += f", seed {tuned['seed']}" if tuned.get("seed") else ""
    restored = tuned.get("restored_batchnorms") or ()
    extras += f", a BatchNorm for each of {len(restored)} convs without one, folded in after" if restored else ""
    where = tuned.get("torch_device", "cpu")  # records from before the setting ran on the CPU
    teacher = tuned.get("teacher") or {"dense_model": True}  # records from before the setting: the dense model
    source = "" if teacher["dense_model"] else (f" from {teacher['model']} (held-out top-1 "
                                                f"{tuned['teacher_heldout_top1']:.2%})")
    return (f"Fine-tuned {len(tuned['epochs'])} epochs by distillation{source} ({tuned['seconds_per_epoch']:.0f} s per epoch on "
            f"this host's {where}, BatchNorm {tuned['bn']}{optimiser}{extras}){gradual}: held-out top-1 "
            f"{tuned['start_heldout_top1']:.2%} -> "
            f"{tuned['best_heldout_top1']:.2%} (epoch {tuned['best_epoch']} kept, {tuned['heldout_samples']:,} training "
            "images never trained on).")


def _latency_source(report: DeployReport) -> str:
    """Say plainly whose latency each figure is."""
    sources: dict[str, list[str]] = {}
    for name, variant in report.variants.items():
        sources.setdefault(variant.latency_on, []).append(name)
    estimated = next((v.board for v in report.variants.values() if v.board), None)
    lines = [f"The latency column is the {report.target}'s where it can be: "
             + "; ".join(f"{', '.join(names)}: {source}" for source, names in sources.items()) + "."]
    if estimated:
        lines.append(f"Estimated figures are the blocks the real runtime executed for one inference on the board's ISA "
                     f"in qemu, each timed by LLVM's {estimated['core']} scheduling model (llvm-mca): deterministic, the "
                     "same on any host, but caches, memory and flash wait states (and on a Pi, its other cores) are not "
                     "modelled.")
    lines.append("The host ms column is this host's wall time, for reference only.")
    return " ".join(lines)


def firmware_table(board: dict[str, dict]) -> str:
    """The firmware figures of each variant, side by side."""
    estimated = all(f.get("board") for f in board.values())
    return markdown_table(
        (f"firmware on {next(iter(board.values()))['cpu']}", "instructions", *(["est. cycles"] if estimated else []),
         "flash B (runtime + model)", "RAM B (data + bss)", "arena used B", "stack B", "bit-exact vs host TFLM"),
        [(n, f"{f['instructions']:,}", *([f"{f['board']['cycles']:,}"] if estimated else []),
          f"{f['flash_bytes']:,} ({f['flash_runtime_bytes']:,} + {f['flash_model_bytes']:,})",
          f"{f['ram_bytes']:,}", f"{f['arena_used_bytes']:,}", f"{f['stack_used_bytes']:,}",
          f"yes ({f['samples']} images)" if f["bit_exact"] else f"NO: {f['outputs_differing']} of {f['samples']} differ")
         for n, f in board.items()])


def _firmware_lines(report: DeployReport) -> list[str]:
    """What the firmware figures are, and the most expensive operators of the factored model."""
    shown = next((n for n in ("factored_int8", *report.variants) if n in report.variants
                  and report.variants[n].details.get("firmware")), None)  # a file measured as it is: its one variant
    figures = report.variants[shown].details["firmware"] if shown else None
    if not figures:
        return []
    board = figures.get("board")
    counted = board["operators"] if board else figures["layers"]
    by_op: dict[str, list[int]] = {}
    for layer in counted:  # convolutions by kernel shape: a 3x1 and a 3x3 conv cost differently per MAC
        sums = by_op.setdefault(" ".join(filter(None, (layer["op"], layer.get("kernel")))), [0, 0, 0, 0])
        for i, value in enumerate((1, layer["instructions"], layer.get("cycles", 0), layer.get("macs", 0))):
            sums[i] += value
    key = 2 if board else 1
    total = sum(s[key] for s in by_op.values()) or 1
    what = ("Cycles are estimated: each executed block timed by LLVM's scheduling model of the core (llvm-mca), with "
            "no caches or flash wait states modelled. Cycles per MAC show where factoring pays: a factored chain's thin "
            "convolutions cost more per MAC than the dense kernel they replace." if board else
            "Cycles were not estimated here (the reason is in the notes): these are instructions.")
    return ["", "## Firmware", "",
            f"TFLite Micro with CMSIS-NN kernels, built with arm-none-eabi-gcc for {figures['cpu']} and run in "
            "qemu-system-arm with `-icount shift=0`: the instruction counts are the firmware's own, deterministic on any "
            f"host. {what}", "",
            markdown_table((f"operator ({shown})", "calls", "MACs", "instructions", *(["est. cycles", "cycles/MAC"]
                                                                                            if board else []), "share"),
                           [(op, str(s[0]), f"{s[3]:,}" if s[3] else "-", f"{s[1]:,}",
                             *([f"{s[2]:,}", f"{s[2] / s[3]:.2f}" if s[3] else "-"] if board else []),
                             f"{s[key] / total:.1%}")
                            for op, s in sorted(by_op.items(), key=lambda i: -i[1][key])])]


def write_reports(out_dir: Path, report: DeployReport, plan_table: str) -> list[Path]:
    json_path = write_text(out_dir / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    plot_path = _plot(out_dir / PLOT, report)
    machine = next(iter(report.variants.values())).machine
    runtimes = ", ".join(sorted({v.runtime for v in report.variants.values()}))
    classes = next(iter(report.variants.values())).per_class
    per_class_table = markdown_table(("class", *report.variants),
                                     [(name, *(f"{v.per_class[name]:.1%}" for v in report.variants.values()))
                                      for name in classes])
    absent = [n for n in report.class_names if n not in classes]
    data = report.data
    split = "" if data["split"] == "given" else f" Test split: {data['split']}."
    text = "\n".join([
        f"# {report.model} on {report.target}",
        "",
        f"Evaluated on {report.eval_samples} test samples of {data['name']} ({data['location']}; "
        f"{len(report.class_names)} classes; {data['train_samples']:,} training and {data['test_samples']:,} test "
        f"samples, none shared: calibration, fitting, rank choice and fine-tuning use only the training ones).{split} "
        f"Accuracy and agreement were computed on the {machine} ({runtimes}; latency at batch 1 on one thread). "
        f"{_latency_source(report)} "
        "ONNX Runtime's int8 accuracy is the file's own arithmetic (unfused), which ARM's kernels compute; its "
        "fused x86 kernels saturate on CPUs without VNNI.",
        "",
        report.summary_table(),
        "",
        f"![top-1 against MACs]({PLOT})",
        "",
        "## Per-class accuracy",
        "",
        per_class_table,
        *([f"\nNo evaluation samples of: {', '.join(absent)}."] if absent else []),
        "",
        *(["## Warnings", "", *[f"- {w}" for w in report.warnings], ""] if report.warnings else []),
        "## Decomposition plan",
        "",
        *_compression_lines(report.decomposition),
        plan_table,
        *_firmware_lines(report),
        *(["", "## On-device check", "", f"{report.device['device']} ({report.device['device_about']}): "
           f"top-1 {report.device['device_top1']:.2%} on {report.device['eval_samples']} images, agreement with "
           f"dense_fp32 {report.device['agreement']:.2%}, with the host's int8 {report.device['host_agreement']:.2%}; "
           f"baseline {report.device['baseline']['status']}"] if report.device else []),
        *(["", "## Notes", "", *[f"- {n}" for n in report.notes]] if report.notes else []),
        "",
    ])
    md_path = write_text(out_dir / "report.md", text)
    return [json_path, md_path, plot_path]


def _plot(path: Path, report: DeployReport) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, v in report.variants.items():
        marker = "o" if name.endswith("fp32") else "s"
        ax.scatter(v.macs / 1e6, v.top1 * 100, marker=marker, s=60, label=name)
    ax.set_xlabel("MACs (millions, batch 1)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{report.model} on {report.target}: top-1 against MACs")
    # MACs from zero, so the saving is seen at its true size; top-1 over its real spread, at least 2 points
    most = max(v.macs for v in report.variants.values()) / 1e6
    top = [v.top1 * 100 for v in report.variants.values()]
    middle, half = (max(top) + min(top)) / 2, max((max(top) - min(top)) * 0.6, 1.0)
    ax.set_xlim(0, most * 1.1)
    ax.set_ylim(max(0.0, middle - half), min(100.0, middle + half) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)
    return path

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
    variants: dict[str, VariantReport]
    decomposition: dict
    eval_samples: int
    thresholds: dict
    passed: bool
    top1_drop: float
    notes: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()  # every threshold missed, in words
    device: dict | None = None  # the on-device check, when the profile runs it on deploy
    wall_seconds: float = 0.0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["notes"], data["failures"] = list(self.notes), list(self.failures)
        return data

    def summary_table(self) -> str:
        lines = [markdown_table(("variant", "MACs", "params", "bytes", "peak act. B", "top-1", "agreement", "latency ms"),
                                [(name, f"{v.macs:,}", f"{v.params:,}", f"{v.bytes:,}", f"{v.peak_activation_bytes:,}",
                                  f"{v.top1:.2%}", f"{v.agreement:.2%}", f"{v.latency_ms:.3f}")
                                 for name, v in self.variants.items()])]
        micro = {n: v.details for n, v in self.variants.items() if "arena_bytes" in v.details}
        if micro:
            lines += ["", markdown_table(
                ("int8 in TFLM", "flash B", "arena B", "smallest arena B", "LiteRT top-1", "ORT int8 top-1",
                 "agreement w/ ORT", "max diff (steps)"),
                [(n, f"{d['flash_bytes']:,}", f"{d['arena_bytes']:,}", f"{d['smallest_arena_bytes']:,}",
                  f"{d['litert_top1']:.2%}", f"{d['ort_int8_top1']:.2%}", f"{d['ort_agreement']:.2%}",
                  f"{d['max_output_diff_steps']:g}") for n, d in micro.items()])]
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"\n{verdict}: factored_int8 top-1 drop vs dense_fp32 {self.top1_drop * 100:+.2f} points "
                     f"(allowed {self.thresholds['max_top1_drop'] * 100:.2f}) on {self.eval_samples} images")
        lines.extend(f"  - {failure}" for failure in self.failures)
        return "\n".join(lines)


def _compression_lines(record: dict) -> list[str]:
    """How the plan was reached: the budget allocation and the fine-tuning, when there were any."""
    lines = []
    allocation, tuned = record.get("allocation"), record.get("finetune")
    if allocation:
        source = "read from the cache" if allocation["sensitivity"]["cached"] else \
            f"measured in {allocation['sensitivity']['seconds']:.0f} s"
        lines.append(f"Budget {allocation['budget']}: {allocation['kept']:.1%} kept; {allocation['candidates']} "
                     f"candidates ({source}); summed KL of the choices {allocation['predicted_kl']:.4f}; latency "
                     f"weight {allocation['latency_weight']:g}.")
    if tuned:
        lines.append(f"Fine-tuned {len(tuned['epochs'])} epochs by distillation ({tuned['seconds_per_epoch']:.0f} s per "
                     f"epoch on this host, BatchNorm {tuned['bn']}): held-out top-1 {tuned['start_heldout_top1']:.2%} "
                     f"-> {tuned['best_heldout_top1']:.2%} (epoch {tuned['best_epoch']} kept, "
                     f"{tuned['heldout_samples']:,} training images never trained on).")
    return [*lines, ""] if lines else []


def write_reports(out_dir: Path, report: DeployReport, plan_table: str) -> list[Path]:
    json_path = write_text(out_dir / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    plot_path = _plot(out_dir / PLOT, report)
    machine = next(iter(report.variants.values())).machine
    runtimes = ", ".join(sorted({v.runtime for v in report.variants.values()}))
    classes = next(iter(report.variants.values())).per_class
    per_class_table = markdown_table(("class", *report.variants),
                                     [(name, *(f"{v.per_class[name]:.1%}" for v in report.variants.values()))
                                      for name in classes])
    text = "\n".join([
        f"# {report.model} on {report.target}",
        "",
        f"Evaluated on {report.eval_samples} CIFAR-10 test images. Accuracy, agreement and latency were computed "
        f"on the {machine} ({runtimes}; latency at batch 1 on one thread, "
        "median). Int8 results on an x86 host can differ from an ARM board's: ORT's u8s8 kernels saturate on x86 CPUs without VNNI and not on ARM.",
        "",
        report.summary_table(),
        "",
        f"![top-1 against MACs]({PLOT})",
        "",
        "## Per-class accuracy",
        "",
        per_class_table,
        "",
        "## Decomposition plan",
        "",
        *_compression_lines(report.decomposition),
        plan_table,
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
    ax.margins(x=0.15, y=0.2)  # dense fp32/int8 share a MAC count: the legend, not labels, tells them apart
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)
    return path

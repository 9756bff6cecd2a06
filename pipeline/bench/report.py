"""bench/report.md and bench/pareto.png from bench/results.json: the rows side by side, ratios, a top-1 vs
MACs Pareto plot with the published results, and per-budget plans."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a build machine
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.report.deploy_report import tuning_sentence  # noqa: E402
from pipeline.util import atomic_path, markdown_table, write_text  # noqa: E402


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def _table(rows: list[dict], dense_top1: float) -> str:
    counted = any(r.get("instructions") for r in rows)  # a Cortex-M target: its firmware's instruction counts
    timed = any(r.get("cycles") for r in rows)  # the board's estimated cycles
    head = ("variant", "MACs", "kept", "params", "bytes", "top-1", "vs dense fp32", "host ms", "host speedup",
            "MAC reduction", "host speedup / MAC red.", *(("instructions", "instr. reduction") if counted else ()),
            *(("est. cycles", "est. ms", "cycle reduction", "cycle red. / MAC red.") if timed else ()),
            "decompose s", "sensitivity s", "fine-tune s (per epoch)")
    cells = []
    for r in rows:
        ft = "-" if r["finetune_s"] is None else f"{r['finetune_s']:.0f} ({r['finetune_s_per_epoch']:.0f})"
        instructions = ("-", "-") if not r.get("instructions") else (f"{r['instructions']:,}",
                                                                     f"{r['instruction_reduction']:.2f}x")
        cycles = ("-",) * 4 if not r.get("cycles") else (
            f"{r['cycles']:,}", "-" if r.get("est_ms") is None else f"{r['est_ms']:.3f}", f"{r['cycle_reduction']:.2f}x",
            f"{r['cycle_reduction'] / r['mac_reduction']:.2f}")
        cells.append((r["variant"], f"{r['macs']:,}", f"{r['macs_kept']:.3f}", f"{r['params']:,}", f"{r['bytes']:,}",
                      _pct(r["top1"]), f"{(r['top1'] - dense_top1) * 100:+.2f} pt", f"{r['latency_ms']:.3f}",
                      f"{r['speedup']:.2f}x", f"{r['mac_reduction']:.2f}x", f"{r['speedup'] / r['mac_reduction']:.2f}",
                      *(instructions if counted else ()), *(cycles if timed else ()),
                      "-" if r["decompose_s"] is None else f"{r['decompose_s']:.1f}",
                      "-" if r["sensitivity_s"] is None else f"{r['sensitivity_s']:.1f}", ft))
    return markdown_table(head, cells)


def _anchors(entry: dict) -> str:
    rows = [r for r in entry["rows"] if r["budget"] is not None and r["precision"] == "int8"]
    cells = []
    for p in entry["published"]:
        ours = [r for r in rows if 1 - r["macs_kept"] >= p["macs_removed"] - 1e-9]
        best = max(ours, key=lambda r: r["top1"], default=None)
        cells.append((p["method"], f"{p['macs_removed']:.0%}", _pct(p["top1"]),
                      "-" if best is None else f"{best['variant']}: {1 - best['macs_kept']:.1%} fewer, {_pct(best['top1'])} "
                      f"({(best['top1'] - p['top1']) * 100:+.2f} pt), "
                      f"{entry['finetune_epochs'] if best['finetuned'] else 0} epochs"))
    return markdown_table(("published", "MACs removed", "top-1", "ours"), cells)


def _latency_lines(plan: dict) -> list[str]:
    """Which factored layers run slower than the dense layer they replace (host int8, layer alone)."""
    allocation = plan.get("allocation") or {}
    summed = allocation.get("layer_latency")
    if not summed:
        return []
    unit = allocation.get("latency_unit", "ms on this host")
    slower = [f"{layer['name']} ({layer['method']} {'x'.join(map(str, layer['ranks']))}: "
              f"{layer['latency']:.4g} vs {layer['dense_latency']:.4g} {unit})"
              for layer in plan["layers"]
              if layer.get("method") and layer.get("latency") is not None and layer.get("dense_latency")
              and layer["latency"] > layer["dense_latency"]]
    return [f"Summed layer latency (int8, each layer alone, {unit}): {summed['chosen']:.4g} chosen vs "
            f"{summed['dense']:.4g} dense, latency weight {allocation['latency_weight']:g}. "
            f"Factored layers slower than their dense conv: {', '.join(slower) or 'none'}."]


def plot(results: dict, path: Path) -> None:
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, entry in zip(axes[0], models, strict=True):
        rows = entry["rows"]
        dense = next(r for r in rows if r["variant"] == "dense_fp32")
        styles = {(False, "fp32"): ("o", "one-shot fp32"), (False, "int8"): ("s", "one-shot int8"),
                  (True, "fp32"): ("^", "fine-tuned fp32"), (True, "int8"): ("D", "fine-tuned int8")}
        for (tuned, precision), (marker, label) in styles.items():
            pts = [r for r in rows if r["budget"] is not None and r["finetuned"] == tuned and r["precision"] == precision]
            if pts:
                pts.sort(key=lambda r: r["macs"])
                ax.plot([r["macs"] / 1e6 for r in pts], [r["top1"] * 100 for r in pts], marker=marker, label=label)
        for r in rows:
            if r["budget"] is None:
                ax.scatter([r["macs"] / 1e6], [r["top1"] * 100], marker="*", s=160, zorder=5,
                           label=r["variant"].replace("_", " "))
        for p in entry["published"]:
            ax.scatter([dense["macs"] * (1 - p["macs_removed"]) / 1e6], [p["top1"] * 100], marker="x", color="k")
            ax.annotate(p["method"].split(" (")[0], (dense["macs"] * (1 - p["macs_removed"]) / 1e6, p["top1"] * 100),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{entry['model']} ({entry.get('target', results['target'])}): top-1 vs MACs ({entry['eval_samples']:,} test images)")
        ax.set_xlabel("MACs (millions)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(results: dict, out: Path) -> Path:
    plot(results, out / "pareto.png")
    lines = ["# Benchmark: budgeted low-rank compression", "",
             f"Host: {results['host']}; latency at batch 1 on one thread, medians of interleaved runs; "
             f"ratios against the dense model of the same precision. Target profiles: `{results['target']}`; each compression job ran with "
             f"{results['threads']} torch threads. "
             f"Wall time {results['wall_seconds']:.0f} s, of which compressing (sensitivity, fit, fine-tuning) "
             f"{results.get('compress_seconds', 0):.0f} s ({results.get('runner', 'local')}).", "", "![top-1 vs MACs](pareto.png)", ""]
    for entry in results["models"]:
        rows = entry["rows"]
        dense_top1 = next(r for r in rows if r["variant"] == "dense_fp32")["top1"]
        lines += [f"## {entry['model']} on {entry.get('target', results['target'])}", "",
                  f"{entry['eval_samples']:,} test images; fine-tuning: {entry['finetune_epochs']} epochs of "
                  "distillation from the dense model.", "", _table(rows, dense_top1), ""]
        if entry["published"]:
            lines += ["Against published results (theirs: full retraining on GPUs; ours: the best int8 model removing "
                      "at least as many MACs, with its fine-tuning epochs):", "", _anchors(entry), ""]
        for budget, plan in entry["plans"].items():
            chosen = [f"{layer['name']} {layer['method'] or 'dense'} {'x'.join(map(str, layer['ranks']))}".rstrip()
                      for layer in plan["layers"]]
            lines += [f"Budget {budget}: " + ", ".join(chosen), "", *_latency_lines(plan), ""]
            if plan.get("finetune"):
                lines += [tuning_sentence(plan["finetune"]), ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path

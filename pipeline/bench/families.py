"""`make families`: factorisation only, channel pruning only and both, at one budget on each board, side by side.

The question it answers: at the same estimated cycles on a core, which family of compression keeps more accuracy and
less RAM? For every model and target it runs the deploy itself (`pipeline.deploy.deploy`) once per family, with the
same budget, data, test images and fine-tuning, the budget's candidate methods restricted to the family: the
profile's factorisations, `prune` alone, or both. Each row is read from that build's report.json: int8 top-1 on the
target's runtime (TFLM on a microcontroller, the int8 graph's own arithmetic in ONNX Runtime for a Linux board), the
board's estimated cycles against the dense int8 model's, MACs, and RAM: TFLM's arena as the firmware used it on the
emulated board, or on a Linux board the int8 graph's peak activation memory. The budget applies as in a deploy: on a
microcontroller it keeps the arena at most the dense model's (`arena_never_grows`), which factorisation alone cannot
do, so the deploy lets channel cuts join that family (it says so, and the plan column shows them); to compare the
families with the arena free, name a profile of your own that sets `arena_never_grows = false`. A family whose
options cannot reach the budget is refused by the deploy before any work; its row names the floor instead (a build
that fails for another reason gets its error, and the others go on). The builds stay in `<out>/builds/` (report.md,
firmware) for a closer look.
"""

import json
import time
from pathlib import Path

from pipeline.compress.methods import PRUNE
from pipeline.errors import BudgetOutOfReach, ConfigError, PipelineError
from pipeline.output import check_output, mark, writing
from pipeline.util import host_machine, markdown_table, write_text
from targets import load_target
from targets.budget import parse_budget

FAMILIES = ("factorisation", "pruning", "both")
RUN_ORDER = ("both", "factorisation", "pruning")  # both first: the others' sensitivity tables are narrowed from its


def family_candidates(family: str, profile_candidates: tuple[str, ...]) -> list[str]:
    """The methods a budget may pick in `family`: the profile's factorisations, channel cuts, or both."""
    factorisations = [m for m in profile_candidates if m != PRUNE]
    return {"factorisation": factorisations, "pruning": [PRUNE], "both": [*factorisations, PRUNE]}[family]


def _cycles(variant: dict) -> int | None:
    return (variant.get("board") or {}).get("cycles")


def _ram(variant: dict) -> tuple[int | None, str]:
    firmware = (variant.get("details") or {}).get("firmware")
    if firmware and firmware.get("arena_used_bytes"):
        return firmware["arena_used_bytes"], "TFLM arena used by the firmware (emulated board)"
    return variant.get("peak_activation_bytes"), "peak activation memory of the int8 graph"


def _plan(layers: list[dict]) -> str:
    """The plan in a few words: how many layers each method took, how many had channels cut (a cut group touches
    every layer that writes or reads its channels)."""
    counts: dict[str, int] = {}
    for layer in layers:
        if layer.get("channels") is not None and layer.get("channels") != layer.get("channels_before"):
            counts["cut"] = counts.get("cut", 0) + 1
        if layer.get("method") not in (None, PRUNE):
            counts[layer["method"]] = counts.get(layer["method"], 0) + 1
    return ", ".join(f"{n} layers cut" if m == "cut" else f"{n} {m}" for m, n in sorted(counts.items())) or "dense"


def row_from_report(report: dict) -> dict:
    """One family's figures from its build's report.json."""
    dense, factored = report["variants"]["dense_int8"], report["variants"]["factored_int8"]
    ram, ram_kind = _ram(factored)
    dense_cycles, cycles = _cycles(dense), _cycles(factored)
    return {
        "top1": factored["top1"], "dense_top1": dense["top1"], "runtime": factored["runtime"],
        "cycles": cycles, "dense_cycles": dense_cycles,
        "cycles_kept": round(cycles / dense_cycles, 4) if cycles and dense_cycles else None,
        "est_ms": factored["latency_ms"] if factored.get("latency_source") != "host" else None,
        "macs_kept": round(factored["macs"] / dense["macs"], 4), "ram_bytes": ram, "dense_ram_bytes": _ram(dense)[0],
        "ram_kind": ram_kind, "plan": _plan(report["decomposition"].get("layers") or []), "passed": report["passed"],
    }


def families(*, models=("resnet8", "resnet20"), targets=("rpi4", "nucleo-l4r5zi", "nucleo-h743zi"),
             budget: str = "cycles:0.75", epochs: int = 0, data: str | None = None, eval_samples: int = 2000,
             out: str = "bench/families", log=print) -> Path:
    """Every model x target x family deployed at `budget` with `epochs` of fine-tuning, scored on `eval_samples`
    test images (0: all); writes `<out>/results.json` and `<out>/report.md` and returns the first."""
    from pipeline.zoo import ZOO

    parse_budget(budget)  # a bad budget, model, count or target is refused before any work, not as a failed row
    unknown = [m for m in models if m not in ZOO]
    if unknown:
        raise ConfigError(f"MODELS={' '.join(unknown)}: not zoo models; known: {', '.join(ZOO)}")
    if epochs < 0:
        raise ConfigError(f"FINETUNE_EPOCHS={epochs}; expected 0 or a positive count")
    if eval_samples < 0:
        raise ConfigError(f"EVAL_SAMPLES={eval_samples}; expected 0 (the full test set) or a positive count")
    profiles = {target: load_target(target) for target in targets}
    out = check_output(out, kind="families", inputs=[data])
    from pipeline.deploy import deploy  # the whole pipeline, loaded once the settings are known to be good

    with writing(out):
        mark(out, "families")
        started, rows = time.perf_counter(), []
        for model in models:
            for target, profile in profiles.items():
                for family in RUN_ORDER:
                    candidates = family_candidates(family, profile.decomposition.candidates)
                    build = out / "builds" / f"{model}-{profile.name}-{family}"
                    log(f"[families] {model} on {profile.name}, {family} ({' '.join(candidates)}) at {budget}")
                    row = {"model": model, "target": profile.name, "core": profile.core or profile.firmware.cpu,
                           "family": family, "candidates": candidates, "build": str(build.relative_to(out))}
                    begun = time.perf_counter()
                    try:
                        deploy(target=target, model=model, budget=budget, candidates=candidates, finetune_epochs=epochs,
                               data=data, eval_samples=eval_samples, out=build, progress=False)
                    except BudgetOutOfReach as exc:
                        row.update(refused=str(exc), floors=exc.floors)
                    except PipelineError as exc:  # one build's failure is a row of the comparison, not its end
                        row.update(failed=f"{type(exc).__name__}: {exc}")
                        log(f"[families] {model} on {profile.name}, {family}: failed: {exc}")
                    else:
                        row.update(row_from_report(json.loads((build / "report.json").read_text())))
                    row["seconds"] = round(time.perf_counter() - begun, 1)
                    rows.append(row)
        names = [p.name for p in profiles.values()]
        rows.sort(key=lambda r: (list(models).index(r["model"]), names.index(r["target"]), FAMILIES.index(r["family"])))
        results = {"host": host_machine(), "budget": budget, "finetune_epochs": epochs, "eval_samples": eval_samples,
                   "rows": rows, "wall_seconds": round(time.perf_counter() - started, 1)}
        write_text(out / "results.json", json.dumps(results, indent=1))
        write_text(out / "report.md", report_text(results))
    return out / "results.json"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def report_text(results: dict) -> str:
    """The rows side by side, one table per model: what each family keeps at the same budget."""
    lines = [f"# Factorisation, channel pruning and both at `{results['budget']}`", "",
             f"{results['finetune_epochs']} epochs of fine-tuning; int8 top-1 on each target's runtime over "
             f"{results['eval_samples'] or 'all'} test images. Cycles are the board's, estimated for its core; RAM is "
             "TFLM's arena as the firmware used it (microcontrollers) or the int8 graph's peak activation memory "
             f"(Linux boards). Host: {results['host']}; {results['wall_seconds']:.0f} s in all.", ""]
    head = ("target (core)", "family", "int8 top-1 (dense)", "cycles kept", "est. ms", "MACs kept", "RAM B (dense)",
            "plan")
    for model in dict.fromkeys(r["model"] for r in results["rows"]):
        cells = []
        for r in (r for r in results["rows"] if r["model"] == model):
            where = f"{r['target']} ({r['core']})"
            if "failed" in r:
                cells.append((where, r["family"], "failed", "-", "-", "-", "-", r["failed"][:120]))
                continue
            if "refused" in r:
                floors = ", ".join(f"{k} {v:.3f}" for k, v in r["floors"].items())
                cells.append((where, r["family"], "out of reach", f"floor: {floors}", "-", "-", "-", "-"))
                continue
            cells.append((where, r["family"], f"{_pct(r['top1'])} ({_pct(r['dense_top1'])})",
                          "-" if r["cycles_kept"] is None else f"{r['cycles_kept']:.3f}",
                          "-" if r["est_ms"] is None else f"{r['est_ms']:.2f}", f"{r['macs_kept']:.3f}",
                          f"{r['ram_bytes']:,} ({r['dense_ram_bytes']:,})" if r["ram_bytes"] else "-", r["plan"]))
        lines += [f"## {model}", "", markdown_table(head, cells), ""]
    return "\n".join(lines)

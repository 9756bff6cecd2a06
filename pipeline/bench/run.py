"""`make bench`: dense vs budgeted factored models, before and after fine-tuning, fp32 and int8, in one run.

For each model: the dense fp32 and int8 baselines, then for every budget the one-shot (allocation +
data-aware fit) and the fine-tuned model, each exported, simplified and quantized as `deploy` does for
the target. Accuracy on the test set in ONNX Runtime; latency at batch 1 on one thread with all
variants of a model interleaved round by round, so drift of the host hits them all alike; ratios are to
the dense model of the same precision. Compressed models are kept in `<out>/work/` keyed by everything
that made them, so a rerun (another report, an added budget) does not fine-tune again.
"""

import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from calib import balanced_subset, load_dataset, preprocess
from pipeline.compress.budget.allocate import parse_budget
from pipeline.compress.stage import compress
from pipeline.compress.store import load_factored, save_factored
from pipeline.errors import ConfigError
from pipeline.metrics import top1
from pipeline.onnx.chain import to_onnx
from pipeline.onnx.cost import onnx_cost
from pipeline.onnx.run import run, session
from pipeline.deploy import layer_latency_for
from pipeline.util import host_machine, seconds, sha256_json, write_text
from pipeline.zoo import load_model
from targets import load_target

BUDGETS = (0.75, 0.5, 0.35, 0.25)
SEED = 0
# Published CIFAR-10 ResNet-20 low-rank results (dense 91.73%), all with full retraining on GPUs.
PUBLISHED = {"resnet20": [
    {"method": "LC low-rank (Idelbayev & Carreira-Perpinan 2020)", "macs_removed": 0.57, "top1": 0.905},
    {"method": "Trained Rank Pruning (Xu et al. 2020)", "macs_removed": 0.65, "top1": 0.9062},
    {"method": "HALOC (2023)", "macs_removed": 0.72, "top1": 0.9180},
]}


def _compressed(spec, weights, train_set, profile, budget: float, epochs: int, work: Path, log) -> dict:
    """One-shot and fine-tuned models for one budget, from `work` when an identical run left them there."""
    profile = profile.override(decomposition={"budget": str(budget)}, finetune={"epochs": epochs})
    settings, tuning = profile.decomposition, profile.finetune
    key = sha256_json([spec.name, spec.weights_sha256, dataclasses.asdict(settings), dataclasses.asdict(tuning),
                       SEED])[:16]
    meta_path = work / f"{spec.name}-b{budget:g}-ft{epochs}-{key}.json"
    files = {"oneshot": meta_path.with_suffix(".oneshot.pt"), "finetuned": meta_path.with_suffix(".finetuned.pt")}
    if meta_path.is_file():
        log(f"{spec.name} budget {budget:g}: reusing {meta_path.name}")
        meta = json.loads(meta_path.read_text())
        models = {k: load_factored(p, load_model(spec.name, weights).module)[0] for k, p in files.items() if p.is_file()}
        return {**meta, "models": models}
    result = compress(spec, train_set, settings=settings, tuning=tuning,
                      layer_latency=layer_latency_for(profile, log=log), seed=SEED, log=log)
    models = {"oneshot": result.one_shot}
    if epochs:
        models["finetuned"] = result.model
    for name, model in models.items():
        save_factored(files[name], model, result.plan, model_name=spec.name)
    meta = {"record": result.record(), "seconds": result.seconds}
    write_text(meta_path, json.dumps(meta, indent=1))
    return {**meta, "models": models}


def _onnx_pair(module, folder: Path, stem: str, *, check_x, calibration, quantization) -> dict[str, Path]:
    pair = to_onnx(module, folder, stem, check_inputs=check_x, calibration=calibration, quantization=quantization)
    return {"fp32": pair.fp32, "int8": pair.int8}


def interleaved_latency(paths: dict[str, Path], sample: np.ndarray, *, rounds: int, runs: int, warmup: int) -> dict[str, float]:
    """Median single-image, single-thread latency (ms) of each model, measured round-robin in shuffled order,
    so drift of the host hits every model alike."""
    calls = {}
    for name, path in paths.items():
        sess = session(path, threads=1)
        feed = {sess.get_inputs()[0].name: sample[None]}
        calls[name] = lambda sess=sess, feed=feed: sess.run(None, feed)
        for _ in range(warmup):  # first runs allocate and pack weights
            calls[name]()
    times = {name: [] for name in calls}
    rng = np.random.default_rng(SEED)
    for _ in range(rounds):
        for name in rng.permutation(list(calls)):
            times[name] += [seconds(calls[name]) for _ in range(runs)]
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def bench_model(model: str, *, budgets=BUDGETS, epochs: int, target: str, data, eval_samples: int, out: Path,
                latency_rounds: int, log=print) -> dict:
    profile = load_target(target)
    spec = load_model(model)
    train_set, test_set = load_dataset("train", data), load_dataset("test", data)
    idx = balanced_subset(test_set.y, eval_samples or None, seed=SEED)
    eval_x, eval_y = preprocess(test_set.x[idx], mean=spec.mean, std=spec.std), test_set.y[idx]
    calibration = preprocess(train_set.x[balanced_subset(train_set.y, profile.quantization.calibration_samples, seed=SEED)],
                             mean=spec.mean, std=spec.std)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    pair = dict(check_x=eval_x[:64], calibration=calibration, quantization=profile.quantization)
    variants = {"dense": {"files": _onnx_pair(spec.module, work, f"{model}-dense", **pair), "budget": None,
                          "finetuned": False, "seconds": {}}}
    plans = {}
    for budget in budgets:
        log(f"{model}: budget {budget:g} of MACs, {epochs} fine-tuning epochs")
        made = _compressed(spec, spec.weights, train_set, profile, budget, epochs, work, log)
        plans[f"{budget:g}"] = made["record"]
        for stage, module in made["models"].items():
            name = f"b{budget:g}_{stage}"
            variants[name] = {"files": _onnx_pair(module, work, f"{model}-{name}", **pair), "budget": budget,
                              "finetuned": stage == "finetuned", "seconds": made["seconds"],
                              "finetune": made["record"].get("finetune") if stage == "finetuned" else None}
    log(f"{model}: accuracy of {2 * len(variants)} variants on {len(eval_y)} test images; interleaved latency")
    rows = []
    for precision in ("fp32", "int8"):
        paths = {name: v["files"][precision] for name, v in variants.items()}
        latency = interleaved_latency(paths, eval_x[0], rounds=latency_rounds, runs=20, warmup=20)
        dense_cost = onnx_cost(paths["dense"])
        for name, v in variants.items():
            cost = onnx_cost(paths[name])
            logits = run(session(paths[name]), eval_x)
            spent = v["seconds"]
            rows.append({
                "model": model, "variant": f"{name}_{precision}" if name != "dense" else f"dense_{precision}",
                "budget": v["budget"], "finetuned": v["finetuned"], "precision": precision,
                "macs": cost.macs, "params": cost.params, "bytes": paths[name].stat().st_size,
                "macs_kept": round(cost.macs / dense_cost.macs, 4), "top1": top1(logits, eval_y),
                "latency_ms": round(latency[name], 4), "speedup": round(latency["dense"] / latency[name], 3),
                "mac_reduction": round(dense_cost.macs / cost.macs, 3),
                "decompose_s": spent.get("decompose"), "sensitivity_s": spent.get("sensitivity"),
                "finetune_s": spent.get("finetune") if v["finetuned"] else None,
                "finetune_s_per_epoch": (v["finetune"] or {}).get("seconds_per_epoch") if v["finetuned"] else None,
            })
    return {"model": model, "weights_sha256": spec.weights_sha256, "eval_samples": int(len(eval_y)),
            "finetune_epochs": epochs, "rows": rows, "plans": plans, "published": PUBLISHED.get(model, [])}


def bench(*, models=("resnet20", "resnet56"), budgets=BUDGETS, epochs: dict[str, int] | int = 3, target: str = "rpi4",
          data=None, eval_samples: int = 0, out: str = "bench", latency_rounds: int = 10, log=print) -> Path:
    counts = [epochs] if isinstance(epochs, int) else list(epochs.values())
    for budget in budgets:
        parse_budget(budget)  # a bad budget or epoch count is refused before any work
    if any(n < 0 for n in counts):
        raise ConfigError(f"FINETUNE_EPOCHS={' '.join(map(str, counts))}; expected 0 or positive counts")
    torch.manual_seed(SEED)
    out = Path(out)
    started = time.perf_counter()
    results = {"host": host_machine(), "threads": torch.get_num_threads(), "target": target, "models": []}
    for model in models:
        n = epochs if isinstance(epochs, int) else epochs[model]
        results["models"].append(bench_model(model, budgets=budgets, epochs=n, target=target, data=data,
                                             eval_samples=eval_samples, out=out, latency_rounds=latency_rounds, log=log))
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    from pipeline.bench.report import write_report

    write_text(out / "results.json", json.dumps(results, indent=1))
    write_report(results, out)
    return out / "results.json"


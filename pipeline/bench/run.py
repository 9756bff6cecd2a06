"""`make bench`: dense vs budgeted factored models, before and after fine-tuning, fp32 and int8, in one run.

The grid is model x target x budget. Its compression points (sensitivity, fit, fine-tuning) share nothing,
so they run as independent jobs: one after another here, or as Ray tasks across a cluster when
RAY_ADDRESS is set (pipeline/cluster). Measuring stays on this machine, so every latency is comparable.

For each model and target: the dense fp32 and int8 baselines, then for every budget the one-shot (allocation +
data-aware fit) and the fine-tuned model, each exported, simplified and quantized as `deploy` does for
the target. Accuracy on the test set in ONNX Runtime; for a Cortex-M target, instructions per inference of
each int8 model as firmware on its emulated board (deterministic, so comparable across hosts); latency at
batch 1 on one thread with all variants of a model interleaved round by round, so drift of the host hits them all alike; ratios are to
the dense model of the same precision. Compressed models are kept in `<out>/work/` keyed by everything
that made them, so a rerun (another report, an added budget) does not fine-tune again.
"""

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from calib import balanced_subset, load_dataset, preprocess
from pipeline.cluster import Job, connect
from pipeline.compress.options import check_budget
from pipeline.compress.plan import DecompositionPlan
from pipeline.compress.stage import compress, samples_for, sensitivity_table
from pipeline.compress.store import load_factored, save_factored
from pipeline.compute import gpus_asked, torch_device
from pipeline.cycles.tools import missing
from pipeline.deploy import layer_cost_for
from pipeline.device.board_cycles import onnx_cycles
from pipeline.errors import ConfigError, DeviceError
from pipeline.metrics import top1
from pipeline.onnx.chain import to_onnx
from pipeline.onnx.cost import onnx_cost
from pipeline.onnx.run import reference_session, run, session
from pipeline.output import check_output, mark, writing
from pipeline.tflm.board_cycles import CYCLE_TOOLS
from pipeline.tflm.build import sources_root
from pipeline.tflm.convert import convert_to_tflite
from pipeline.tflm.on_board import count_on_board
from pipeline.util import cache_dir, host_machine, seconds, sha256_json, write_text
from pipeline.zoo import load_model
from targets import load_target
from targets.budget import parse_budget

BUDGETS = (0.75, 0.5, 0.35, 0.25)
SEED = 0
# Published CIFAR-10 ResNet-20 low-rank results (dense 91.73%), all with full retraining on GPUs.
PUBLISHED = {"resnet20": [
    {"method": "LC low-rank (Idelbayev & Carreira-Perpinan 2020)", "macs_removed": 0.57, "top1": 0.905},
    {"method": "Trained Rank Pruning (Xu et al. 2020)", "macs_removed": 0.65, "top1": 0.9062},
    {"method": "HALOC (2023)", "macs_removed": 0.72, "top1": 0.9180},
]}


def _grid_profile(target: str, budget: float, epochs: int):
    return load_target(target).override(decomposition={"budget": str(budget)}, finetune={"epochs": epochs})


def _meta_path(spec, profile, budget: float, epochs: int, work: Path) -> Path:
    """Where one grid point's models live, keyed by everything that made them (not by where they ran)."""
    key = sha256_json([spec.name, spec.weights_sha256, dataclasses.asdict(profile.decomposition),
                       dataclasses.asdict(profile.finetune), SEED])[:16]
    return work / f"{spec.name}-{profile.name}-b{budget:g}-ft{epochs}-{key}.json"


def compress_point(spec, train_set, target: str, budget: float, epochs: int, cache_files: dict[str, str]) -> dict:
    """One grid point's one-shot and fine-tuned models, wherever it runs. `cache_files` (cache-relative path ->
    text) seed this machine's cache with the sensitivity table the driver measured, so no node measures it again."""
    for relative, text in cache_files.items():
        path = cache_dir(*Path(relative).parts)
        if not path.is_file():
            write_text(path, text)
    profile = _grid_profile(target, budget, epochs)
    result = compress(spec, train_set, settings=profile.decomposition, tuning=profile.finetune,
                      layer_cost=layer_cost_for(profile), seed=SEED, progress=False)
    models, plans = {"oneshot": result.one_shot}, {"oneshot": result.one_shot_plan.to_dict()}
    if epochs:  # the tuned model's chains differ from the one-shot's when compressed gradually
        models["finetuned"], plans["finetuned"] = result.model, result.plan.to_dict()
    return {"record": result.record(), "seconds": result.seconds, "models": models, "plans": plans}


def _load_point(meta_path: Path, spec, weights) -> dict:
    meta = json.loads(meta_path.read_text())
    models = {}
    for stage in ("oneshot", "finetuned"):
        path = meta_path.with_suffix(f".{stage}.pt")
        if path.is_file():
            models[stage] = load_factored(path, load_model(spec.name, weights).module)[0]
    return {**meta, "models": models}


def _save_point(meta_path: Path, made: dict, spec) -> None:
    for stage, model in made["models"].items():
        plan = DecompositionPlan.from_dict(made["plans"][stage])
        save_factored(meta_path.with_suffix(f".{stage}.pt"), model, plan, model_name=spec.name,
                      input_shape=spec.input_shape)
    write_text(meta_path, json.dumps({"record": made["record"], "seconds": made["seconds"]}, indent=1))


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


def target_counts(int8_paths: dict[str, Path], profile, x: np.ndarray) -> dict[str, dict]:
    """Each int8 model on the profile's board: estimated cycles and ms on its core (the aarch64 ONNX Runtime in the
    emulated board, or the firmware on the emulated Cortex-M, whose instructions come too); empty where the
    target has no core or the cycle tools are missing (the log says which)."""
    clock, cpu = profile.board.clock_mhz, profile.firmware.cpu
    counts = {}
    try:
        if cpu:
            root = sources_root(profile.firmware.sources)
            for name, path in int8_paths.items():
                data = convert_to_tflite(path, path.with_suffix(".tflite")).read_bytes()
                counts[name] = count_on_board(data, cpu=cpu, root=root, x_nchw=x, cycles=missing(*CYCLE_TOOLS) is None)
        elif profile.core:
            figures = onnx_cycles(list(int8_paths.values()), sample=x[0], core=profile.core, clock_mhz=clock)
            counts = {name: {"cycles": f["cycles"]} for name, f in zip(int8_paths, figures, strict=True)}
    except DeviceError as exc:
        print(f"[bench] {profile.name}: board cycles not estimated: {exc}", flush=True)
        return {}
    for count in counts.values():
        if "cycles" in count and clock:
            count["est_ms"] = round(count["cycles"] / (clock * 1e3), 4)
    return counts


@dataclass
class Cell:
    """One model on one target of the grid, with its data and the compressed models of each budget."""

    model: str
    target: str
    epochs: int
    spec: object
    train_set: object
    test_set: object
    made: dict = field(default_factory=dict)  # budget -> {"record", "seconds", "models"}


def grid_job(cell: Cell, budget: float, *, spec, train, shipped: dict[str, str], threads: int) -> Job:
    """One grid point as a job: `threads` CPUs, and a GPU when the profile's torch work runs on CUDA."""
    profile = _grid_profile(cell.target, budget, cell.epochs)
    return Job(f"bench {cell.model} {cell.target} budget {budget:g} ({cell.epochs} epochs)", compress_point,
               (spec, train), {"target": cell.target, "budget": budget, "epochs": cell.epochs, "cache_files": shipped},
               threads=threads, gpus=gpus_asked(profile.finetune.device))


def _prepare(cells: list[Cell], budgets, *, work: Path, threads: int, log) -> None:
    """Every grid point's compressed models: from `work` where an identical run left them, else measured.
    Each cell's sensitivity table is measured once here (its candidate fits are jobs themselves), then the
    missing points run as independent jobs (Ray tasks under RAY_ADDRESS), each seeded with that table."""
    cluster = connect()
    jobs, points = [], []
    for cell in cells:
        missing = []
        for budget in budgets:
            meta = _meta_path(cell.spec, _grid_profile(cell.target, budget, cell.epochs), budget, cell.epochs, work)
            if meta.is_file():
                log(f"{cell.model} on {cell.target}, budget {budget:g}: reusing {meta.name}")
                cell.made[budget] = _load_point(meta, cell.spec, cell.spec.weights)
            else:
                missing.append((budget, meta))
        if not missing:
            continue
        profile = _grid_profile(cell.target, missing[0][0], cell.epochs)
        samples = samples_for(cell.spec, cell.train_set, settings=profile.decomposition, tuning=profile.finetune, seed=SEED)
        _, facts = sensitivity_table(cell.spec, samples, settings=profile.decomposition,
                                     layer_cost=layer_cost_for(profile, log=log), seed=SEED,
                                     device=torch_device(profile.finetune.device))
        table = Path(facts["path"])
        shipped = {str(table.relative_to(cache_dir())): table.read_text()}
        spec, train = cluster.put(cell.spec), cluster.put(cell.train_set)
        for budget, meta in missing:
            jobs.append(grid_job(cell, budget, spec=spec, train=train, shipped=shipped, threads=threads))
            points.append((cell, budget, meta))
    if jobs:
        log(f"{len(jobs)} grid points to compress ({cluster.name}, {threads} threads each)")
    for (cell, budget, meta), made in zip(points, cluster.run(jobs, desc="bench grid", log=log), strict=True):
        _save_point(meta, made, cell.spec)
        cell.made[budget] = made


def measure_cell(cell: Cell, budgets, *, eval_samples: int, work: Path, latency_rounds: int, log=print) -> dict:
    """Dense and every budget's models exported, quantized and measured on this host as the target's deploy does."""
    spec, model, profile = cell.spec, cell.model, load_target(cell.target)
    idx = balanced_subset(cell.test_set.y, eval_samples or None, seed=SEED)
    eval_x, eval_y = preprocess(cell.test_set.x[idx], mean=spec.mean, std=spec.std), cell.test_set.y[idx]
    calibration = preprocess(cell.train_set.x[balanced_subset(cell.train_set.y, profile.quantization.calibration_samples,
                                                              seed=SEED)], mean=spec.mean, std=spec.std)
    pair = dict(check_x=eval_x[:64], calibration=calibration, quantization=profile.quantization)
    stem = f"{model}-{profile.name}"  # a profile given as a path is named by its `name`
    variants = {"dense": {"files": _onnx_pair(spec.module, work, f"{stem}-dense", **pair), "budget": None,
                          "finetuned": False, "seconds": {}}}
    plans = {}
    for budget in budgets:
        made = cell.made[budget]
        plans[f"{budget:g}"] = made["record"]
        for stage, module in made["models"].items():
            name = f"b{budget:g}_{stage}"
            variants[name] = {"files": _onnx_pair(module, work, f"{stem}-{name}", **pair), "budget": budget,
                              "finetuned": stage == "finetuned", "seconds": made["seconds"],
                              "finetune": made["record"].get("finetune") if stage == "finetuned" else None}
    log(f"{model} on {cell.target}: accuracy of {2 * len(variants)} variants on {len(eval_y)} test images; "
        "interleaved latency")
    rows = []
    for precision in ("fp32", "int8"):
        paths = {name: v["files"][precision] for name, v in variants.items()}
        latency = interleaved_latency(paths, eval_x[0], rounds=latency_rounds, runs=20, warmup=20)
        counts = target_counts(paths, profile, eval_x[:2]) if precision == "int8" else {}
        dense_cost = onnx_cost(paths["dense"])
        for name, v in variants.items():
            cost = onnx_cost(paths[name])
            logits = run(reference_session(paths[name]), eval_x)
            spent = v["seconds"]
            rows.append({
                "model": model, "variant": f"{name}_{precision}" if name != "dense" else f"dense_{precision}",
                "budget": v["budget"], "finetuned": v["finetuned"], "precision": precision,
                "macs": cost.macs, "params": cost.params, "bytes": paths[name].stat().st_size,
                "macs_kept": round(cost.macs / dense_cost.macs, 4), "top1": top1(logits, eval_y),
                "latency_ms": round(latency[name], 4), "speedup": round(latency["dense"] / latency[name], 3),
                "mac_reduction": round(dense_cost.macs / cost.macs, 3),
                "instructions": counts.get(name, {}).get("instructions"),
                "instruction_reduction": _ratio(counts, "instructions", name),
                "cycles": counts.get(name, {}).get("cycles"), "est_ms": counts.get(name, {}).get("est_ms"),
                "cycle_reduction": _ratio(counts, "cycles", name),
                "decompose_s": spent.get("decompose"), "sensitivity_s": spent.get("sensitivity"),
                "finetune_s": spent.get("finetune") if v["finetuned"] else None,
                "finetune_s_per_epoch": (v["finetune"] or {}).get("seconds_per_epoch") if v["finetuned"] else None,
            })
    return {"model": model, "target": cell.target, "weights_sha256": spec.weights_sha256,
            "eval_samples": int(len(eval_y)), "finetune_epochs": cell.epochs, "rows": rows, "plans": plans,
            "published": PUBLISHED.get(model, [])}


def _ratio(counts: dict[str, dict], key: str, name: str) -> float | None:
    """The dense model's count over this one's: how many times fewer on the board."""
    dense, this = counts.get("dense", {}).get(key), counts.get(name, {}).get(key)
    return round(dense / this, 3) if dense and this else None


def bench(*, models=("resnet20", "resnet56"), budgets=BUDGETS, epochs: dict[str, int] | int = 3,
          targets=("rpi4",), data=None, eval_samples: int = 0, out: str = "bench", latency_rounds: int = 10,
          threads: int | None = None, log=print) -> Path:
    """The model x budget x target grid. `threads` is each compression job's torch thread count (default: this
    machine's); a job gives the same models with the same count wherever it runs, here or on a Ray node."""
    counts = [epochs] if isinstance(epochs, int) else list(epochs.values())
    for budget in budgets:
        parse_budget(budget)  # a bad budget, epoch count or target is refused before any work
    if any(n < 0 for n in counts):
        raise ConfigError(f"FINETUNE_EPOCHS={' '.join(map(str, counts))}; expected 0 or positive counts")
    names = [load_target(target).name for target in targets]
    if len(set(names)) < len(names):  # work files and report sections are named by the profile's name
        raise ConfigError(f"TARGET={' '.join(targets)} names profiles {', '.join(names)}; expected each profile "
                          "once, under a name of its own")
    if threads is not None and threads < 1:
        raise ConfigError(f"TASK_THREADS={threads}; expected a positive thread count (default: all of this machine's)")
    threads = threads or torch.get_num_threads()
    out = check_output(out, kind="bench", inputs=[data])
    with writing(out):
        return _bench(models, budgets, epochs, targets, data=data, eval_samples=eval_samples, out=out,
                      latency_rounds=latency_rounds, threads=threads, log=log)


def _bench(models, budgets, epochs, targets, *, data, eval_samples, out: Path, latency_rounds, threads, log) -> Path:
    torch.manual_seed(SEED)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    mark(out, "bench")
    started = time.perf_counter()
    cells = []
    for model in models:
        spec = load_model(model)
        train_set, test_set = load_dataset("train", data), load_dataset("test", data)
        cells += [Cell(model, target, epochs if isinstance(epochs, int) else epochs[model], spec, train_set, test_set)
                  for target in targets]
    for cell in cells:  # an unreachable budget fails before any grid point runs
        for budget in budgets:
            profile = _grid_profile(cell.target, budget, cell.epochs)
            check_budget(cell.spec, profile.decomposition, layer_cost_for(profile, log=log))
    _prepare(cells, budgets, work=work, threads=threads, log=log)
    compressed = time.perf_counter() - started
    results = {"host": host_machine(), "threads": threads, "target": " ".join(targets), "targets": list(targets),
               "runner": connect().name, "compress_seconds": round(compressed, 1),
               "models": [measure_cell(cell, budgets, eval_samples=eval_samples, work=work,
                                       latency_rounds=latency_rounds, log=log) for cell in cells]}
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    from pipeline.bench.report import write_report

    write_text(out / "results.json", json.dumps(results, indent=1))
    write_report(results, out)
    return out / "results.json"

"""Stage 1 as a whole: choose what to factor (a rank rule, or a budget met by measured sensitivity), fit the
factors to real activations, and optionally fine-tune by distillation. The training split is cut once by
`calib.split_training`, so nothing is judged on what it was fitted or trained on."""

import dataclasses
import functools
import time
from dataclasses import dataclass

from torch import nn

from calib import Dataset, preprocess, split_training
from pipeline.compress.budget.allocate import CostBudget, allocate, check_reachable, parse_budget
from pipeline.compress.budget.macs import totals
from pipeline.compress.budget.sensitivity import LayerCost, sensitivities, skeleton_candidates
from pipeline.compress.decompose import collapse, decompose
from pipeline.compress.finetune import finetune
from pipeline.compress.plan import DecompositionPlan
from pipeline.compute import CPU, TorchDevice, torch_device
from pipeline.errors import ConfigError
from pipeline.zoo import ModelSpec
from targets import Decomposition, Finetune, check_gradual


@dataclass(frozen=True)
class Compressed:
    one_shot: nn.Module  # factored and fitted, before any fine-tuning
    model: nn.Module  # what the pipeline goes on with: fine-tuned when epochs > 0, else one_shot
    plan: DecompositionPlan  # model's
    allocation: dict | None  # budget, lambda, predicted KL, sensitivity cache facts
    finetune: dict | None  # per-epoch loss, held-out top-1, seconds
    seconds: dict  # wall time of each step
    one_shot_plan: DecompositionPlan  # one_shot's: plan's, unless compressed gradually (model's chains then differ)
    torch_device: dict = dataclasses.field(default_factory=CPU.about)  # where the torch work ran

    def plan_table(self) -> str:
        """The plan's table, with each layer's cost on the target where the allocation weighed it."""
        return self.plan.table((self.allocation or {}).get("latency_unit"))

    def record(self) -> dict:
        """The plan plus how it was reached, as report.json's `decomposition`."""
        return {**self.plan.to_dict(), "allocation": self.allocation, "finetune": self.finetune,
                "steps_seconds": self.seconds, "torch": self.torch_device}


def _total(spec: ModelSpec, resource: str, layer_cost: LayerCost | None) -> float:
    """The dense model's whole cost in the budget's resource; cycles are the whole int8 model's on the board, the
    operators between the layers (adds, pools, requantization) included."""
    if resource == "cycles":
        return layer_cost.model(spec.module, spec.input_shape)
    macs, params = totals(spec.module, spec.input_shape)
    return macs if resource == "macs" else params


def timed(settings: Decomposition, layer_cost: LayerCost | None) -> LayerCost | None:
    """The cost the allocation weighs, or None: a budget on a board with its own estimate always weighs it (no
    option slower than its dense layer); elsewhere only a latency weight does. A cycle budget needs the board's
    estimate: an error says so, before any work."""
    budget = parse_budget(settings.budget) if settings.budget else None
    if budget is None:
        return None
    if budget.resource == "cycles" and (layer_cost is None or not layer_cost.board):
        about = "no per-layer cost was given" if layer_cost is None else f"its layer cost is {layer_cost.unit}"
        raise ConfigError(f"Budget {budget} counts the board's estimated cycles, but {about}; a cycle budget needs a "
                          "target with a [board] core (cortex-a72, cortex-m4, cortex-m7) and the cycle tools, or use "
                          f"BUDGET=macs:{budget.fraction:g}")
    if layer_cost is not None and (layer_cost.board or settings.latency_weight > 0):
        return layer_cost
    if settings.latency_weight > 0:
        raise ConfigError(f"Budget {budget} with latency weight {settings.latency_weight:g} needs the target's "
                          "layer cost, and none was given")
    return None


def scaled_samples(available: int, *, heldout: int, fit: int, sensitivity: int) -> tuple[int, int, int]:
    """The profile's sample counts, cut to what a small training split allows: at most a fifth of it held out
    (never trained on), at most half of the rest fitted to, the sensitivity images a part of the held-out ones."""
    heldout = min(heldout, available // 5)
    fit = min(fit, (available - heldout) // 2)
    return heldout, fit, min(sensitivity, heldout) if heldout else 0


@dataclass(frozen=True)
class Samples:
    """The training split cut once: index arrays by role, and the fit and sensitivity images preprocessed."""

    splits: dict
    fit: object  # preprocessed fit images, or None to fit the weights
    sensitivity: object  # preprocessed images the candidates are judged on


def samples_for(spec: ModelSpec, train_set: Dataset, *, settings: Decomposition, tuning: Finetune, seed: int) -> Samples:
    needs_heldout = bool(settings.budget or tuning.epochs)
    heldout, fit, judged = scaled_samples(len(train_set), heldout=tuning.heldout_samples if needs_heldout else 0,
                                          fit=settings.fit_samples, sensitivity=settings.sensitivity_samples)
    splits = split_training(train_set.y, heldout=heldout, fit=fit, sensitivity=judged, seed=seed)
    images = {k: preprocess(train_set.x[v], mean=spec.mean, std=spec.std) for k, v in splits.items()
              if k in ("fit", "sensitivity")}
    return Samples(splits, images["fit"] if fit else None, images["sensitivity"])


def sensitivity_table(spec: ModelSpec, samples: Samples, *, settings: Decomposition, layer_cost: LayerCost | None,
                      skeleton: list | None = None, seed: int = 0, use_cache: bool = True, progress: bool = True,
                      device: TorchDevice = CPU):
    """The measured candidates a budget is allocated from (cached; see `sensitivities`), and facts about them."""
    return sensitivities(spec.module, input_shape=spec.input_shape, fit_x=samples.fit, heldout_x=samples.sensitivity,
                         settings=settings, seed=seed, latency=timed(settings, layer_cost), skeleton=skeleton,
                         use_cache=use_cache, progress=progress, device=device)


def check_budget(spec: ModelSpec, settings: Decomposition, layer_cost: LayerCost | None = None) -> tuple[list, float]:
    """Every candidate's skeleton costs (with the target's cycles where they are weighed) and the dense model's
    total in the budget's resource; a budget below what they can reach fails here, before any sensitivity work."""
    budget = parse_budget(settings.budget)
    skeleton = skeleton_candidates(spec.module, input_shape=spec.input_shape, settings=settings)
    if budget.resource != "cycles":  # a MAC or parameter floor is known at once, before any layer is timed
        check_reachable(skeleton, budget=budget, total=_total(spec, budget.resource, None))
    cost = timed(settings, layer_cost)
    if cost is not None:
        skeleton = skeleton_candidates(spec.module, input_shape=spec.input_shape, settings=settings, latency=cost)
    total = _total(spec, budget.resource, cost)
    check_reachable(skeleton, budget=budget, total=total, never_slower=bool(cost and cost.board))
    return skeleton, total


def _factor(module: nn.Module, spec: ModelSpec, samples: Samples, budget: CostBudget | None, *,
            settings: Decomposition, layer_cost, skeleton, total, seed: int, use_cache: bool, progress: bool, log,
            device: TorchDevice = CPU):
    """`module` (the dense model, or a tuned student collapsed back to dense layers) factored once: to `budget`
    by measured sensitivity when there is one, else by `settings`' method and rank rule. Returns the factored
    model, its plan, the allocation's record (None without a budget) and the seconds of each part. `skeleton` and
    `total` are `check_budget`'s: a cycle budget stays a fraction of the dense model's cycles at every step."""
    seconds, choices, allocation = {}, None, None
    if budget is not None:
        started = time.perf_counter()
        model_spec = dataclasses.replace(spec, module=module)
        cost = timed(settings, layer_cost)
        candidates, facts = sensitivity_table(model_spec, samples, settings=settings, layer_cost=layer_cost,
                                              skeleton=skeleton, seed=seed, use_cache=use_cache, progress=progress,
                                              device=device)
        choices, allocation = allocate(candidates, budget=budget, total=total, latency_weight=settings.latency_weight,
                                       never_slower=bool(cost and cost.board))
        allocation.update(sensitivity=facts, candidates=len(candidates), sensitivity_samples=len(samples.splits["sensitivity"]),
                          latency_unit=cost.unit if cost else None, total=total)
        seconds["sensitivity"] = round(time.perf_counter() - started, 2)
        source = "from the cache" if facts["cached"] else f"measured in {facts['seconds']:.0f} s"
        log(f"budget {budget}: {len(candidates)} candidates ({source}); predicted KL {allocation['predicted_kl']:.4f}")
    factored, plan = decompose(module, input_shape=spec.input_shape, settings=settings, seed=seed, progress=progress,
                               calibration=samples.fit, choices=choices, device=device)
    seconds["decompose"] = round(plan.seconds, 2)
    return factored, plan, allocation, seconds


def compress(spec: ModelSpec, train_set: Dataset, *, settings: Decomposition, tuning: Finetune,
             layer_cost: LayerCost | None = None, seed: int = 0, use_cache: bool = True, progress: bool = True,
             log=print) -> Compressed:
    """Factor `spec`'s model as `settings` say and fine-tune it as `tuning` says. `layer_cost` is what single
    layers cost on the target (see `LayerCost`): a budget weighs it when it is the board's estimate or
    `settings.latency_weight` > 0, and a cycle budget is counted in it.

    With intermediate budgets (`settings.gradual`) and epochs, the model is factored to each in turn, tuned for
    `tuning.step_epochs`, and collapsed back to dense layers before the next: every allocation is measured on
    the partly compressed, tuned model, so errors that compound are seen rather than assumed to add. The
    teacher stays the dense model throughout; `one_shot` is the dense model factored straight to the budget."""
    budget = parse_budget(settings.budget) if settings.budget else None
    check_gradual(settings, tuning)
    skeleton, total = check_budget(spec, settings, layer_cost) if budget else (None, None)
    samples = samples_for(spec, train_set, settings=settings, tuning=tuning, seed=seed)
    splits = samples.splits
    device = torch_device(tuning.device, mixed_precision=tuning.mixed_precision)  # autocast only in fine-tuning
    common = dict(spec=spec, samples=samples, settings=settings, layer_cost=layer_cost, skeleton=skeleton,
                  total=total, seed=seed, use_cache=use_cache, progress=progress, log=log, device=device)
    one_shot, plan, allocation, seconds = _factor(spec.module, budget=budget, **common)
    one_shot_plan = plan
    model, history = one_shot, None
    if tuning.epochs:
        tune = functools.partial(finetune, teacher=spec.module, train_set=train_set.take(splits["train"]),
                                 heldout=train_set.take(splits["heldout"]), mean=spec.mean, std=spec.std, seed=seed,
                                 progress=progress)
        started, steps, student = time.perf_counter(), [], spec.module
        for fraction in settings.gradual:
            step_budget = dataclasses.replace(budget, fraction=fraction)
            factored, step_plan, _, spent = _factor(student, budget=step_budget, **common)
            # the step's last epoch, not its best held-out one: the held-out images are in the teacher's training
            # set, so a student nearer the teacher scores higher there (ResNet-20 factored to 0.6 of MACs: 97.5%
            # untuned, 97.0% after two epochs) and the step's tuning would be thrown away
            tuned, step_history = tune(factored, settings=dataclasses.replace(tuning, epochs=tuning.step_epochs),
                                       keep="last")
            steps.append({"budget": str(step_budget), "macs_after": step_plan.macs_after, "seconds": spent,
                          **{k: step_history[k] for k in ("start_heldout_top1", "best_heldout_top1", "best_epoch",
                                                          "epochs", "seconds_per_epoch")}})
            student = collapse(tuned, step_plan, student)
        factored = one_shot
        if steps:
            factored, plan, allocation, spent = _factor(student, budget=budget, **common)
            seconds["steps"] = [s["seconds"] for s in steps] + [spent]
        model, history = tune(factored, settings=dataclasses.replace(
            tuning, epochs=tuning.epochs - len(steps) * tuning.step_epochs))
        if steps:  # every epoch in one list, each saying at which budget it ran
            epochs = [{**e, "budget": s["budget"]} for s in steps for e in s["epochs"]]
            epochs += [{**e, "budget": str(budget)} for e in history["epochs"]]
            history.update(steps=steps, epochs=epochs,
                           seconds_per_epoch=round(sum(e["seconds"] for e in epochs) / len(epochs), 3))
        seconds["finetune"] = round(time.perf_counter() - started, 1)  # with the re-factoring between steps
    return Compressed(one_shot, model, plan, allocation, history, seconds, one_shot_plan, device.about())

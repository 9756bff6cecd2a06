"""Stage 1 as a whole: choose what to factor (a rank rule, or a budget met by measured sensitivity), fit the
factors to real activations, and optionally fine-tune by distillation. The training split is cut once by
`calib.split_training`, so nothing is judged on what it was fitted or trained on."""

import dataclasses
import functools
import time
from dataclasses import dataclass

from torch import nn

from calib import Dataset, preprocess, split_training
from pipeline.compress.budget.allocate import allocate, jointly_reachable
from pipeline.compress.budget.macs import count
from pipeline.compress.budget.sensitivity import LayerCost, sensitivities
from pipeline.compress.cuts import apply_cuts, split_choices, uniform_cuts, with_cuts
from pipeline.compress.decompose import collapse, decompose
from pipeline.compress.finetune import finetune
from pipeline.compress.methods import PRUNE
from pipeline.compress.options import Menu, check_budget, timed
from pipeline.compress.plan import Choice, DecompositionPlan
from pipeline.compress.restored_norms import fine_tune_with_norms
from pipeline.compress.teacher import as_teacher
from pipeline.compute import CPU, TorchDevice, torch_device
from pipeline.errors import BudgetOutOfReach
from pipeline.zoo import ModelSpec
from targets import Decomposition, Finetune, check_gradual
from targets.budget import Budget, Constraint, parse_budget


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


# Allocations tried at most, each a tightened cycles budget after the whole model missed the last one.
ATTEMPTS = 3
# How far inside a cycles budget the one-shot model is held, as a fraction of the dense model's cycles: the count of
# one plan moves with its weights, and fine-tuning changes them. ResNet-20 at cycles:0.5 on the A72 (cycle engine):
# the same plan counted 4,169,684 one-shot and after one fine-tuning, 4,172,129 after another (+0.03% of the dense
# 8,341,950, over the budget by 0.01%); earlier pairs moved by 0.01%. 0.05% holds the largest seen with room.
COUNT_SPREAD = 0.0005


def _factor(module: nn.Module, spec: ModelSpec, samples: Samples, menu: Menu | None, *, settings: Decomposition,
            layer_cost, seed: int, use_cache: bool, progress: bool, log, device: TorchDevice = CPU,
            step: Budget | None = None):
    """`module` (the dense model, or a tuned student collapsed back to dense layers) compressed once: to the menu's
    budget (or the gradual `step` of it) by measured sensitivity when there is one, else by `settings`' method and
    rank rule. Channel cuts are applied first, then the factorisations, fitted on the cut model. Returns the
    compressed model, its plan, the allocation's record (None without a budget) and the seconds of each part.

    A cycles budget is checked on the whole int8 model as the deploy counts it: the layers' prices miss what the
    operators between them do by a few parts in ten thousand, so a plan the layers put just inside the budget can
    measure just outside it, and fine-tuning moves the count a little (`COUNT_SPREAD`, which the one-shot model must
    leave unspent). Then the allocation runs again with the cycles constraint at the plan's predicted share
    lowered by the miss, which that plan no longer fits (the sensitivities and prices are reused), at most ATTEMPTS
    times; each count is in the allocation's record."""
    if menu is None:
        if settings.method == PRUNE:
            cuts = uniform_cuts(module, spec.input_shape, settings)
            choices = {n: Choice(None, (), f"METHOD=prune RANK={settings.rank}: channels cut, no factorisation")
                       for n in count(module, spec.input_shape)}
        else:
            cuts, choices = {}, None
        factored, plan = _built(module, spec, samples, cuts, choices, {}, settings=settings, seed=seed,
                                progress=progress, device=device)
        return factored, plan, None, {"decompose": round(plan.seconds, 2)}
    budget = step or menu.budget
    started = time.perf_counter()
    cost = timed(settings, layer_cost)
    candidates, facts = sensitivity_table(dataclasses.replace(spec, module=module), samples, settings=settings,
                                          layer_cost=layer_cost, skeleton=menu.skeleton, seed=seed,
                                          use_cache=use_cache, progress=progress, device=device)
    seconds = {"sensitivity": round(time.perf_counter() - started, 2)}
    target, checks = budget, []
    for _ in range(ATTEMPTS):
        try:
            chosen, allocation = _allocation(candidates, target, menu, settings=settings, cost=cost, facts=facts,
                                             samples=samples)
        except BudgetOutOfReach:
            if not checks:
                raise
            log(f"budget {budget}: {target} is below what the options reach; the plan at {checks[-1]['budget']} "
                "stays, and the report says whether it holds the budget")
            break
        source = "from the cache" if facts["cached"] else f"measured in {facts['seconds']:.0f} s"
        log(f"budget {target}: {len(candidates)} candidates ({source}); predicted KL {allocation['predicted_kl']:.4f}; "
            f"{_outline(chosen, allocation)}")
        cuts, choices, reasons = split_choices(chosen)
        factored, plan = _built(module, spec, samples, cuts, choices, reasons, settings=settings, seed=seed,
                                progress=progress, device=device)
        if menu.pricing is not None:
            plan = _priced(plan, menu.pricing, chosen)
        check = _whole_model_check(factored, spec, budget, target, menu, cost, allocation)
        if check is None:
            break
        checks.append(check)
        if check["measured"] <= check["held_to"] or len(checks) == ATTEMPTS:
            break
        # the plan's own predicted share lowered by the miss: the same plan no longer fits, the next is cheaper
        tighter = check["predicted_fraction"] * check["held_to"] / check["measured"]
        target = target.replacing(Constraint("cycles", fraction=round(tighter, 6)))
        log(f"budget {budget}: the whole int8 model counts {check['measured_fraction']:.4f} of the dense cycles "
            f"(its layers predicted {check['predicted_fraction']:.4f}); allocating again at {target}")
    if checks:  # the budget stays the one asked for (the report holds the model to it), the last one tried beside it
        allocation.update(whole_model_cycles=checks, budget=str(budget), allocated_at=checks[-1]["budget"])
    seconds["decompose"] = round(plan.seconds, 2)
    return factored, plan, allocation, seconds


def _allocation(candidates: list, budget: Budget, menu: Menu, *, settings: Decomposition, cost, facts: dict,
                samples: Samples) -> tuple[dict, dict]:
    """The knapsack's choice per unit for `budget`, and its record."""
    pricing = menu.pricing
    chosen, allocation = allocate(candidates, budget=budget, totals=menu.totals, latency_weight=settings.latency_weight,
                                  never_slower=bool(cost and cost.board), pricing=pricing,
                                  arena=pricing.arena if pricing and pricing.timeline else None)
    allocation.update(sensitivity=facts, candidates=len(candidates),
                      sensitivity_samples=len(samples.splits["sensitivity"]),
                      latency_unit=cost.unit if cost else None, total=menu.totals[budget.resource],
                      totals=menu.totals, floors={r: round(f, 6) for r, f in menu.floors.items()},
                      between_cycles_per_element=round(pricing.between_rate, 3) if pricing is not None else 0.0,
                      layer_edge_cycles_per_element=round(pricing.io_rate, 3) if pricing is not None else 0.0,
                      removal_extra_cycles={g: round(c) for g, c in pricing.removal_extra.items()}
                      if pricing is not None else {})
    return chosen, allocation


def _built(module: nn.Module, spec: ModelSpec, samples: Samples, cuts: dict, choices: dict | None, reasons: dict, *,
           settings: Decomposition, seed: int, progress: bool, device: TorchDevice):
    """The cuts applied, then the factorisations fitted on the cut model; the plan in the dense model's terms."""
    pruned, kept, touching = apply_cuts(module, spec.input_shape, cuts, settings=settings, calibration=samples.fit,
                                        seed=seed)
    factored, plan = decompose(pruned, input_shape=spec.input_shape, settings=settings, seed=seed, progress=progress,
                               calibration=samples.fit, choices=choices, device=device)
    return factored, with_cuts(plan, dense=module, pruned=pruned, input_shape=spec.input_shape, kept=kept,
                               touching=touching, reasons=reasons)


def _whole_model_check(factored: nn.Module, spec: ModelSpec, budget: Budget, target: Budget, menu: Menu, cost,
                       allocation: dict) -> dict | None:
    """The compressed model's whole int8 cycles on the board's estimate against the cycles budget, or None where
    there is none to check (no cycles constraint, or no board estimate)."""
    constraint = budget.get("cycles")
    if constraint is None or cost is None or not cost.board or "cycles" not in menu.totals:
        return None
    dense = menu.totals["cycles"]
    measured = cost.model(factored, spec.input_shape)
    allowed = round(constraint.limit(dense))
    return {"budget": str(target), "allowed": allowed, "held_to": round(allowed - COUNT_SPREAD * dense),
            "measured": round(measured),
            "measured_fraction": round(measured / dense, 6),
            "predicted_fraction": round(allocation["kept_by_resource"]["cycles"], 6)}


def _outline(choices: dict[str, Choice], allocation: dict) -> str:
    """The allocation in a line, said before any fine-tuning starts: what it removes, cuts and factors, and what it
    keeps of each constrained resource."""
    removed = sum(1 for c in choices.values() if c.method == PRUNE and c.ranks == (0,))
    cut = sum(1 for c in choices.values() if c.method == PRUNE and c.ranks != (0,))
    factored = sum(1 for c in choices.values() if c.method not in (None, PRUNE))
    parts = [f"{n} {what}" for n, what in ((removed, "groups removed"), (cut, "groups cut"), (factored, "layers factored"))
             if n]
    kept = ", ".join(f"{fraction:.3f} of the {resource}" for resource, fraction in allocation["kept_by_resource"].items())
    return f"{', '.join(parts) or 'every layer kept'}; keeps {kept} (estimated)"


def _priced(plan, pricing, chosen: dict) -> "DecompositionPlan":
    """The plan's rows with what the pricing knows of the chosen selection: a cut layer's cycles at its new shape
    (factored or not), and each layer's live activation bytes and share of the planned arena."""
    live, planned = pricing.live(chosen) if pricing.timeline is not None else ({}, 0)
    rows = []
    for p in plan.layers:
        change = {}
        if p.channels and p.channels != p.channels_before and p.name in pricing.layers:
            change.update(latency=pricing.cost(chosen, p.name)["cycles"], dense_latency=pricing.variant({}, p.name)["cycles"])
        if p.name in live and planned:
            change.update(live_bytes=live[p.name], arena_share=round(live[p.name] / planned, 4))
        rows.append(dataclasses.replace(p, **change))
    return dataclasses.replace(plan, layers=tuple(rows))


def compress(spec: ModelSpec, train_set: Dataset, *, settings: Decomposition, tuning: Finetune,
             layer_cost: LayerCost | None = None, teacher: ModelSpec | None = None, seed: int = 0,
             use_cache: bool = True, progress: bool = True, log=print) -> Compressed:
    """Factor `spec`'s model as `settings` say and fine-tune it as `tuning` says, distilled from `teacher` (default:
    the dense model; see `teacher.as_teacher`). `layer_cost` is what single layers cost on the target (see
    `LayerCost`): a budget weighs it when it is the board's estimate or `settings.latency_weight` > 0, and a cycle
    budget is counted in it.

    With intermediate budgets (`settings.gradual`) and epochs, the model is factored to each in turn, tuned for
    `tuning.step_epochs`, and collapsed back to dense layers before the next: every allocation is measured on
    the partly compressed, tuned model, so errors that compound are seen rather than assumed to add. The
    teacher stays the same throughout; `one_shot` is the dense model factored straight to the budget."""
    check_gradual(settings, tuning)
    judge = as_teacher(teacher, spec) if teacher is not None else spec.module  # refused before any work
    if teacher is not None and tuning.feature_weight:
        # the feature term matches each block to the same block of the dense model; another net's blocks of the same
        # name (ResNet-56's layer1.0 beside ResNet-20's) compute something else
        tuning = dataclasses.replace(tuning, feature_weight=0.0)
        log(f"teacher {teacher.name}: distilled from its outputs only (the feature term matches the dense model's "
            "blocks)")
    if settings.budget and parse_budget(settings.budget).get("arena") and PRUNE not in settings.candidates:
        # factorisations only add tensors: an arena the budget names can only be lowered by cutting channels
        settings = dataclasses.replace(settings, candidates=(*settings.candidates, PRUNE))
        log(f"budget {settings.budget} bounds the arena: channel cuts join the candidates")
    if settings.gradual and tuning.epochs and PRUNE in settings.candidates:
        # gradual steps collapse the factored chains back to dense layers between steps; a cut cannot be collapsed
        settings = dataclasses.replace(settings, candidates=tuple(c for c in settings.candidates if c != PRUNE))
        log("gradual steps: channel cuts are not candidates (a cut cannot be collapsed back between steps)")
    menu = check_budget(spec, settings, layer_cost) if settings.budget else None
    if menu and "arena" in menu.budget.resources and PRUNE not in settings.candidates and not jointly_reachable(
            menu.skeleton, budget=menu.budget, totals=menu.totals, pricing=menu.pricing, arena=menu.pricing.arena,
            never_slower=bool(layer_cost and layer_cost.board)):
        # the arena kept at the dense model's (arena_never_grows) and the budget cannot both hold with
        # factorisations alone, which only add tensors: channel cuts join the candidates
        settings = dataclasses.replace(settings, candidates=(*settings.candidates, PRUNE))
        log(f"budget {menu.budget}: factorisations alone cannot meet it without growing the arena; channel cuts "
            "join the candidates")
        menu = check_budget(spec, settings, layer_cost)
    budget = menu.budget if menu else None
    samples = samples_for(spec, train_set, settings=settings, tuning=tuning, seed=seed)
    splits = samples.splits
    device = torch_device(tuning.device, mixed_precision=tuning.mixed_precision)  # autocast only in fine-tuning
    common = dict(spec=spec, samples=samples, settings=settings, layer_cost=layer_cost, menu=menu, seed=seed,
                  use_cache=use_cache, progress=progress, log=log, device=device)
    one_shot, plan, allocation, seconds = _factor(spec.module, **common)
    one_shot_plan = plan
    model, history = one_shot, None
    if tuning.epochs:
        trained_on = train_set.take(splits["train"])
        distil = functools.partial(finetune, teacher=judge, train_set=trained_on,
                                   heldout=train_set.take(splits["heldout"]), mean=spec.mean, std=spec.std, seed=seed,
                                   progress=progress)

        def tune(student, plan_of_student, **arguments):  # a folded BatchNorm given back while training
            return fine_tune_with_norms(distil, student, names=[p.name for p in plan_of_student.layers],
                                        train_set=trained_on, mean=spec.mean, std=spec.std, bn=tuning.bn, seed=seed,
                                        **arguments)
        started, steps, student = time.perf_counter(), [], spec.module
        for fraction in settings.gradual:
            step_budget = budget.with_first(fraction)
            factored, step_plan, _, spent = _factor(student, step=step_budget, **common)
            # the step's last epoch, not its best held-out one: the held-out images are in the teacher's training
            # set, so a student nearer the teacher scores higher there (ResNet-20 factored to 0.6 of MACs: 97.5%
            # untuned, 97.0% after two epochs) and the step's tuning would be thrown away
            tuned, step_history = tune(factored, step_plan,
                                       settings=dataclasses.replace(tuning, epochs=tuning.step_epochs), keep="last")
            steps.append({"budget": str(step_budget), "macs_after": step_plan.macs_after, "seconds": spent,
                          **{k: step_history[k] for k in ("start_heldout_top1", "best_heldout_top1", "best_epoch",
                                                          "epochs", "seconds_per_epoch")}})
            student = collapse(tuned, step_plan, student)
        factored = one_shot
        if steps:
            factored, plan, allocation, spent = _factor(student, **common)
            seconds["steps"] = [s["seconds"] for s in steps] + [spent]
        model, history = tune(factored, plan, settings=dataclasses.replace(
            tuning, epochs=tuning.epochs - len(steps) * tuning.step_epochs))
        if steps:  # every epoch in one list, each saying at which budget it ran
            epochs = [{**e, "budget": s["budget"]} for s in steps for e in s["epochs"]]
            epochs += [{**e, "budget": str(budget)} for e in history["epochs"]]
            history.update(steps=steps, epochs=epochs,
                           seconds_per_epoch=round(sum(e["seconds"] for e in epochs) / len(epochs), 3))
        seconds["finetune"] = round(time.perf_counter() - started, 1)  # with the re-factoring between steps
        judged_by = teacher or spec
        history["teacher"] = {"model": judged_by.name, "weights_sha256": judged_by.weights_sha256,
                              "dense_model": teacher is None}
    return Compressed(one_shot, model, plan, allocation, history, seconds, one_shot_plan, device.about())

"""Stage 1 as a whole: choose what to factor (a rank rule, or a budget met by measured sensitivity), fit the
factors to real activations, and optionally fine-tune by distillation.

The training split is cut once, seeded, so nothing is judged on what it was fitted or trained on:
- `heldout`: `finetune.heldout_samples` balanced images, never trained on; the sensitivity images are a
  balanced part of them, and the fine-tuning picks its best epoch on all of them;
- `fit`: `fit_samples` balanced images of the rest, the activations the factors reproduce;
- the rest (fit images included) is what fine-tuning trains on.
"""

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
from torch import nn

from calib import Dataset, balanced_subset, preprocess
from pipeline.allocate import allocate, parse_budget
from pipeline.decompose import METHODS, decompose
from pipeline.errors import ConfigError, unknown
from pipeline.finetune import finetune
from pipeline.macs import totals
from pipeline.plan import DecompositionPlan
from pipeline.sensitivity import sensitivities
from pipeline.targets import Decomposition, Finetune, Quantization
from pipeline.zoo import ModelSpec


@dataclass(frozen=True)
class Compressed:
    one_shot: nn.Module  # factored and fitted, before any fine-tuning
    model: nn.Module  # what the pipeline goes on with: fine-tuned when epochs > 0, else one_shot
    plan: DecompositionPlan
    allocation: dict | None  # budget, lambda, predicted KL, sensitivity cache facts
    finetune: dict | None  # per-epoch loss, held-out top-1, seconds
    seconds: dict  # wall time of each step

    def record(self) -> dict:
        """The plan plus how it was reached, as report.json's `decomposition`."""
        return {**self.plan.to_dict(), "allocation": self.allocation, "finetune": self.finetune, "steps_seconds": self.seconds}


def check_settings(settings: Decomposition, tuning: Finetune) -> None:
    """Refuse bad compression settings before any work."""
    if settings.budget:
        parse_budget(settings.budget)
        for method in settings.candidates:
            if method not in METHODS:
                raise unknown("candidate method", method, METHODS)
        if not settings.rank_fractions or not all(0 < f <= 1 for f in settings.rank_fractions):
            raise ConfigError(f"rank_fractions {settings.rank_fractions}; expected fractions in (0, 1]")
    if settings.latency_weight < 0:
        raise ConfigError(f"latency_weight={settings.latency_weight}; expected 0 (off) or a positive weight")
    if settings.fit_samples < 0 or settings.sensitivity_samples < 1:
        raise ConfigError(f"fit_samples={settings.fit_samples}, sensitivity_samples={settings.sensitivity_samples}; "
                          "expected fit_samples >= 0 and sensitivity_samples >= 1")
    if tuning.epochs < 0:
        raise ConfigError(f"FINETUNE_EPOCHS={tuning.epochs}; expected 0 (no fine-tuning) or a positive count")


def split_training(labels: np.ndarray, *, heldout: int, fit: int, sensitivity: int, seed: int) -> dict[str, np.ndarray]:
    held = balanced_subset(labels, heldout, seed=seed) if heldout else np.arange(0)
    rest = np.setdiff1d(np.arange(len(labels)), held)
    if len(rest) == 0:
        raise ConfigError(f"{len(labels)} training images and heldout_samples={heldout}: nothing left to fit or train on")
    return {"heldout": held, "train": rest,
            "fit": rest[balanced_subset(labels[rest], fit, seed=seed)] if fit else rest[:0],
            "sensitivity": held[balanced_subset(labels[held], sensitivity, seed=seed)] if len(held) else held}


def compress(spec: ModelSpec, train_set: Dataset, *, settings: Decomposition, tuning: Finetune,
             quantization: Quantization | None = None, seed: int = 0, use_cache: bool = True, progress: bool = True,
             log=print) -> Compressed:
    """`quantization`: the target's int8 settings, needed when the allocation weighs host latency."""
    check_settings(settings, tuning)
    needs_heldout = bool(settings.budget or tuning.epochs)
    splits = split_training(train_set.y, heldout=tuning.heldout_samples if needs_heldout else 0, fit=settings.fit_samples,
                            sensitivity=settings.sensitivity_samples, seed=seed)
    images = {k: preprocess(train_set.x[v], mean=spec.mean, std=spec.std) for k, v in splits.items()
              if k in ("fit", "sensitivity")}
    calibration = images["fit"] if settings.fit_samples else None
    seconds, choices, allocation = {}, None, None
    if settings.budget:
        budget = parse_budget(settings.budget)
        started = time.perf_counter()
        candidates, facts = sensitivities(
            spec.module, input_shape=spec.input_shape, fit_x=calibration,
            heldout_x=images["sensitivity"], methods=settings.candidates, fractions=settings.rank_fractions,
            round_to=settings.round_to, layers=settings.layers, exclude=settings.exclude, seed=seed,
            quantization=quantization if settings.latency_weight else None, use_cache=use_cache, progress=progress)
        macs, params = totals(spec.module, spec.input_shape)
        choices, allocation = allocate(candidates, budget=budget, total=macs if budget.resource == "macs" else params,
                                       latency_weight=settings.latency_weight)
        allocation.update(sensitivity=facts, candidates=len(candidates))
        seconds["sensitivity"] = round(time.perf_counter() - started, 2)
        source = "from the cache" if facts["cached"] else f"measured in {facts['seconds']:.0f} s"
        log(f"budget {budget}: {len(candidates)} candidates ({source}); predicted KL {allocation['predicted_kl']:.4f}")
    factored, plan = decompose(spec.module, input_shape=spec.input_shape, method=settings.method, rank=settings.rank,
                               layers=settings.layers, exclude=settings.exclude, round_to=settings.round_to, seed=seed,
                               progress=progress, calibration=calibration, choices=choices)
    seconds["decompose"] = round(plan.seconds, 2)
    model, history = factored, None
    if tuning.epochs:
        started = time.perf_counter()
        model, history = finetune(factored, spec.module, train_set.take(splits["train"]),
                                  train_set.take(splits["heldout"]), mean=spec.mean, std=spec.std,
                                  epochs=tuning.epochs, lr=tuning.lr, batch_size=tuning.batch_size,
                                  weight_decay=tuning.weight_decay, temperature=tuning.temperature, alpha=tuning.alpha,
                                  bn=tuning.bn, seed=seed, progress=progress)
        seconds["finetune"] = round(time.perf_counter() - started, 1)
    return Compressed(factored, model, plan, allocation, history, seconds)


def with_overrides(settings: Decomposition, tuning: Finetune, *, budget: str | None = None,
                   finetune_epochs: int | None = None) -> tuple[Decomposition, Finetune]:
    if budget is not None:
        settings = dataclasses.replace(settings, budget=str(budget))
    if finetune_epochs is not None:
        tuning = dataclasses.replace(tuning, epochs=int(finetune_epochs))
    return settings, tuning

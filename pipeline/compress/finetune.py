"""Short fine-tuning of a factored model by knowledge distillation from the dense one (Hinton et al. 2015).

The dense model is the teacher: its softened outputs on the same augmented batch carry far more signal
per image than the label, which is what makes a few epochs on 2 CPU cores enough. BatchNorm is frozen
by default: its statistics stay those of the dense model (the data-aware fit keeps every layer's output
distribution), so training optimises exactly the folded function that is exported and quantized, and
small batches cannot skew the statistics. `bn="reestimate"` trains with batch statistics instead and
re-estimates the running ones at the end. With `ema_decay` the weights evaluated and kept are an exponential
moving average of the trained ones (torch's AveragedModel; Polyak & Juditsky 1992). With `mixup` each batch is
blended with itself in another order and the teacher judges the blends (function matching, Beyer et al. 2022,
"Knowledge distillation: A good teacher is patient and consistent"). The checkpoint with the best
held-out top-1 (images of the training split that are never trained on) is kept, the starting point included.
"""

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from calib import Dataset, preprocess
from pipeline.compress.removal import Removed
from pipeline.compute import TorchDevice, prefetch, torch_device
from pipeline.errors import unknown
from pipeline.metrics import top1, torch_logits
from pipeline.zoo.train import augment
from targets import Finetune

# AdamW by default, not SGD: with BatchNorm frozen the weights lose their scale invariance, and on ResNet-20 some
# gradients were 5x their weights' norm at the first step; SGD diverged within 2 steps even at lr 0.002.
# AdamW's per-parameter steps are bounded by lr whatever the gradient's scale. With batch statistics
# (bn="reestimate") the scale invariance is back and SGD is the optimiser the CIFAR ResNets were trained with.
OPTIMISERS = {
    "adamw": lambda params, *, lr, weight_decay: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
    "sgd": lambda params, *, lr, weight_decay: torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9,
                                                             nesterov=True),
}


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                      alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels); `labels` are class indices
    or, for mixed images, class probabilities."""
    soft = F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                    log_target=True, reduction="batchmean")
    return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(student, labels)


def mix(x: np.ndarray, rng: np.random.Generator, *, concentration: float) -> tuple[np.ndarray, np.ndarray, float]:
    """mixup (Zhang et al. 2018): the batch blended with itself in a random order by one weight drawn from
    Beta(concentration, concentration); returns the blends, each one's partner and the original's weight."""
    weight = float(rng.beta(concentration, concentration))
    order = rng.permutation(len(x))
    return (weight * x + (1 - weight) * x[order]).astype(x.dtype), order, weight


def feature_points(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Where the student's features are matched to the teacher's: the block around each factored layer (the
    parent whose output both nets share in shape), or the layer itself when it sits at the top level. A block
    whose branch was removed passes on its input plus a constant, so a run of such blocks (and the block before
    it) cannot give the teacher's features at each of their outputs: that run is matched at its end alone, and
    what comes before it is free to do the removed blocks' work (matching every output of the run asked the one
    block before it for several different functions at once)."""
    teacher_modules = dict(teacher.named_modules())
    points = []
    for name, module in student.named_modules():
        if not name or name not in teacher_modules or type(module) is type(teacher_modules[name]):
            continue
        parent = name.rpartition(".")[0] or name
        if not any(parent == p or parent.startswith(p + ".") for p in points):
            points.append(parent)
    return [p for p in points if not _removed(student, _next_sibling(student, p))]


def _next_sibling(model: nn.Module, name: str) -> str | None:
    """The submodule that follows `name` in its parent's order (what the parent runs next, for a Sequential)."""
    parent, _, own = name.rpartition(".")
    names = [child for child, _ in model.get_submodule(parent).named_children()]
    at = names.index(own)
    return f"{parent}.{names[at + 1]}".lstrip(".") if at + 1 < len(names) else None


def _removed(model: nn.Module, name: str | None) -> bool:
    """Whether the submodule `name` lost a layer to a removed channel group (`pipeline.compress.removal`)."""
    return name is not None and any(isinstance(m, Removed) for m in model.get_submodule(name).modules())


class _Features:
    """Outputs of the named submodules, captured by forward hooks on every call."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: self.outputs.__setitem__(n, out)) for n in names]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over matched points of ||s - t||^2 / ||t||^2: each block's relative error, so deep and shallow
    blocks weigh alike whatever their scale (the FitNets hint of Romero et al. 2015, without a regressor
    because the shapes already agree)."""
    # a block whose channels were cut no longer matches the teacher's shape: it is not matched (no regressor)
    terms = [(student[n].float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
             for n, t in teacher.items() if student[n].shape == t.shape]
    return torch.stack(terms).mean() if terms else next(iter(student.values())).new_zeros(())


def _reestimate(model: nn.Module, train_set: Dataset, *, mean, std, batches: int, batch_size: int, seed: int,
                device: TorchDevice) -> None:
    """Running BatchNorm statistics recomputed from scratch over augmented training batches."""
    rng = np.random.default_rng(seed + 1)
    for bn in _batchnorms(model):
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches, not an exponential one
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            idx = rng.choice(len(train_set), batch_size, replace=False)
            with device.autocast():
                model(device.tensor(preprocess(augment(train_set.x[idx], rng), mean=mean, std=std)))
    model.eval()


def _batches(train_set: Dataset, order: np.ndarray, rng: np.random.Generator, *, steps: int, batch_size: int, mean,
             std, mixup: float):
    """Each step's augmented (and, with `mixup`, blended) batch, its labels, and the blend's partners and weight;
    the random draws in the same order wherever the batches are made."""
    for step in range(steps):
        idx = order[step * batch_size:(step + 1) * batch_size]
        x = preprocess(augment(train_set.x[idx], rng), mean=mean, std=std)
        partner, weight = None, 1.0
        if mixup:
            x, partner, weight = mix(x, rng, concentration=mixup)
        yield x, train_set.y[idx], partner, weight


def finetune(student: nn.Module, teacher: nn.Module, train_set: Dataset, heldout: Dataset, *, mean, std,
             settings: Finetune, seed: int = 0, progress: bool = True, keep: str = "best") -> tuple[nn.Module, dict]:
    """Fine-tune `student` (a copy is returned) on `train_set` as `settings` say; returns it and a history with
    per-epoch loss, held-out top-1 and seconds. `heldout` must not overlap `train_set`. `keep`: "best" returns
    the epoch (or the start) with the best held-out top-1, "last" the last epoch. It runs on `settings.device`
    (see `pipeline.compute`) and returns the model on the CPU."""
    if keep not in ("best", "last"):
        raise unknown("keep", keep, ("best", "last"))
    epochs, lr, batch_size, bn = settings.epochs, settings.lr, settings.batch_size, settings.bn
    weight_decay, temperature, alpha = settings.weight_decay, settings.temperature, settings.alpha
    feature_weight, mixup = settings.feature_weight, settings.mixup
    seed += settings.seed
    device = torch_device(settings.device, mixed_precision=settings.mixed_precision)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = copy.deepcopy(student).to(device.device)
    teacher = teacher.eval() if device.is_cpu else copy.deepcopy(teacher).to(device.device).eval()
    held_x = preprocess(heldout.x, mean=mean, std=std)
    start_top1 = top1(torch_logits(model, held_x, device=device.device), heldout.y)
    teacher_top1 = top1(torch_logits(teacher, held_x, device=device.device), heldout.y)
    best = (start_top1, copy.deepcopy(model.state_dict()), 0)
    history = {"start_heldout_top1": start_top1, "teacher_heldout_top1": teacher_top1, "epochs": [], "bn": bn,
               "optimizer": settings.optimizer,
               "ema_decay": settings.ema_decay,
               "mixup": mixup, "seed": seed, **device.about(),
               "heldout_samples": len(heldout.y), "train_samples": len(train_set.y)}
    steps_per_epoch = len(train_set) // batch_size
    # Made before the feature hooks, which its copy of the model would otherwise carry. Buffers are not
    # averaged: frozen BatchNorm statistics stay the dense model's, re-estimated ones are recomputed for the
    # averaged weights at each epoch's end.
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay),
                             use_buffers=False) if settings.ema_decay else None
    if averaged:
        averaged.update_parameters(model)  # the average starts at the student, not after the first step
    evaluated = averaged.module if averaged else model
    points = feature_points(model, teacher) if feature_weight else []
    history["feature_points"] = points
    taps = (_Features(model, points), _Features(teacher, points)) if points else None
    optimiser = OPTIMISERS[settings.optimizer](model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, epochs * steps_per_epoch))
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        if bn == "frozen":
            for module in _batchnorms(model):
                module.eval()
        order = rng.permutation(len(train_set))
        losses = []
        batches = _batches(train_set, order, rng, steps=steps_per_epoch, batch_size=batch_size, mean=mean, std=std,
                           mixup=mixup)
        if not device.is_cpu:  # the next batch is augmented on a worker thread while the GPU computes this one
            batches = prefetch(batches)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"fine-tune {epoch + 1}/{epochs}", unit="batch",
                   disable=not progress, leave=False)
        for step, (x, labels, partner, weight) in enumerate(bar):
            x, labels = device.tensor(x), device.tensor(labels).long()
            with torch.no_grad(), device.autocast():
                target = teacher(x)
            if mixup:  # the label term follows the blend: class probabilities in the same proportions
                eye = torch.eye(target.shape[1], device=device.device)
                labels = weight * eye[labels] + (1 - weight) * eye[labels[device.tensor(partner)]]
            with device.autocast():
                loss = distillation_loss(model(x).float(), target.float(), labels, temperature=temperature,
                                         alpha=alpha)
                if taps:
                    loss = loss + feature_weight * feature_loss(taps[0].outputs, taps[1].outputs)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if averaged:
                averaged.update_parameters(model)
            losses.append(loss.item())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", heldout=f"{best[0]:.2%}")
        if bn == "reestimate":
            _reestimate(evaluated, train_set, mean=mean, std=std, batches=50, batch_size=batch_size, seed=seed + epoch,
                        device=device)
        evaluated.eval()
        held_top1 = top1(torch_logits(evaluated, held_x, device=device.device), heldout.y)
        seconds = time.perf_counter() - started
        history["epochs"].append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 5),
                                  "heldout_top1": held_top1, "seconds": round(seconds, 3)})
        tqdm.write(f"fine-tune epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}, held-out top-1 "
                   f"{held_top1:.2%} (start {start_top1:.2%}), {seconds:.0f} s")
        if held_top1 > best[0] or keep == "last":
            best = (held_top1, copy.deepcopy(evaluated.state_dict()), epoch + 1)
    if taps:
        for tap in taps:
            tap.close()
    model.load_state_dict(best[1])
    model.to("cpu")
    history.update(kept=keep, best_epoch=best[2], best_heldout_top1=best[0],
                   seconds_per_epoch=round(float(np.mean([e["seconds"] for e in history["epochs"]])), 3) if epochs else 0.0)
    return model.eval(), history

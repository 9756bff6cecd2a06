"""BatchNorm given back, for fine-tuning, to the layers a converter folded it into.

A model exported to ONNX or converted from TensorFlow has its BatchNorms folded into the convolutions before
them: what remains is a conv with a bias and nothing normalising its output. Fine-tuned as it is, such a model
trains in the folded parametrisation, where a weight's scale matters and there is no batch statistic to
re-estimate. MLPerf Tiny's ResNet-8, imported, lost 9.44 points int8 to int8 at `cycles:0.8` in 10 epochs where
the same architecture from the zoo, which keeps its BatchNorms, lost 0.97; with this, 0.90 (docs/BENCHMARKS.md).

`fine_tune_with_norms` gives each such layer (a dense, cut or factored conv whose last conv has a bias and whose
output no BatchNorm takes) a BatchNorm that computes the identity on the model's own data: running statistics
measured on training images, weight sqrt(var + eps) and bias mean. Fine-tuning with batch statistics
(`bn = "reestimate"`) then trains it as the zoo's models are trained (Ioffe & Szegedy 2015), and afterwards each
BatchNorm is folded back into its layer's last conv, so the model has the converter's shape again: the same
layers, names and chains, nothing added to the exported graph.
"""

import copy

import numpy as np
import torch
from torch import nn

from calib import Dataset, preprocess

NORM = "restored_norm"  # the BatchNorm's attribute name on a single conv (a chain appends it instead)


def _last_conv(unit: nn.Module) -> nn.Conv2d | None:
    """The conv whose output is the unit's: the layer itself, or a chain's last factor."""
    last = unit[-1] if isinstance(unit, nn.Sequential) and len(unit) else unit
    return last if isinstance(last, nn.Conv2d) else None


def unnormalised_layers(model: nn.Module, names: list[str], x: torch.Tensor) -> list[str]:
    """Those of `names` (convs or factored chains) whose last conv has a bias and whose output, on `x`, is not the
    input of a BatchNorm: the layers a BatchNorm was folded into, or that never had one."""
    units = {n: model.get_submodule(n) for n in names}
    units = {n: u for n, u in units.items() if (conv := _last_conv(u)) is not None and conv.bias is not None}
    outputs, normalised = {}, []  # both kept alive, so no id is reused by another tensor within the pass
    handles = [u.register_forward_hook(lambda _m, _i, out, n=n: outputs.__setitem__(n, out))
               for n, u in units.items()]
    handles += [m.register_forward_pre_hook(lambda _m, args: normalised.append(args[0]))
                for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    taken = {id(t) for t in normalised}
    return [n for n in units if n in outputs and id(outputs[n]) not in taken]


def _apply_norm(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
    # looks the BatchNorm up on the module it runs for, so that a deep copy of the model uses its own copy
    return getattr(module, NORM)(output)


def _statistics(model: nn.Module, names: list[str], x: np.ndarray, *, batch: int = 256) -> dict[str, tuple]:
    """Per output channel mean and variance of each named layer's output over the images `x`."""
    sums: dict[str, list] = {n: [0.0, 0.0, 0] for n in names}

    def record(name, out):
        values = out.detach().double().transpose(0, 1).reshape(out.shape[1], -1)
        sums[name][0] = sums[name][0] + values.sum(1)
        sums[name][1] = sums[name][1] + values.pow(2).sum(1)
        sums[name][2] += values.shape[1]

    handles = [model.get_submodule(n).register_forward_hook(lambda _m, _i, out, n=n: record(n, out)) for n in names]
    try:
        with torch.no_grad():
            model.eval()
            for start in range(0, len(x), batch):
                model(torch.from_numpy(x[start:start + batch]))
    finally:
        for handle in handles:
            handle.remove()
    stats = {}
    for name, (total, squares, count) in sums.items():
        mean = total / count
        stats[name] = (mean.float(), (squares / count - mean.pow(2)).clamp_min(0).float())
    return stats


def restore_norms(model: nn.Module, names: list[str], x: np.ndarray) -> None:
    """Give each named layer (in place) a BatchNorm that is the identity on the images `x` in eval mode."""
    stats = _statistics(model, names, x)
    for name in names:
        unit = model.get_submodule(name)
        mean, var = stats[name]
        norm = nn.BatchNorm2d(len(mean)).train(unit.training)
        with torch.no_grad():
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.weight.copy_((var + norm.eps).sqrt())
            norm.bias.copy_(mean)
        if isinstance(unit, nn.Sequential):  # a chain runs its modules in order
            unit.append(norm)
        else:
            unit.add_module(NORM, norm)
            unit.register_forward_hook(_apply_norm)


def fold_norms(model: nn.Module, names: list[str]) -> None:
    """Undo `restore_norms` (in place): each BatchNorm, as its running statistics and affine weights compute it in
    eval mode, folded into its layer's last conv (per output channel: weight * a, bias * a + b)."""
    for name in names:
        unit = model.get_submodule(name)
        if isinstance(unit, nn.Sequential):
            norm = unit[-1]
            del unit[-1]
        else:
            norm = getattr(unit, NORM)
            delattr(unit, NORM)
            for key, hook in list(unit._forward_hooks.items()):
                if hook is _apply_norm:
                    del unit._forward_hooks[key]
        conv = _last_conv(unit)
        with torch.no_grad():
            scale = norm.weight / (norm.running_var + norm.eps).sqrt()
            conv.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.dim() - 1)))
            conv.bias.copy_(conv.bias * scale + norm.bias - norm.running_mean * scale)


def fine_tune_with_norms(tune, student: nn.Module, *, names: list[str], train_set: Dataset, mean, std,
                         bn: str, samples: int = 1024, seed: int = 0, **arguments) -> tuple[nn.Module, dict]:
    """`tune(student, **arguments)` (fine-tuning, returning the model and its history) with restored BatchNorms on
    the `names` that have none, folded back in the model returned; with `bn = "frozen"` a restored BatchNorm would
    stay the identity, so none is added. The history says which layers had one."""
    images = None
    restored = []
    if bn == "reestimate" and names:
        order = np.random.default_rng(seed).permutation(len(train_set))[:samples]
        images = preprocess(train_set.x[order], mean=mean, std=std)
        restored = unnormalised_layers(student, names, torch.from_numpy(images[:8]))
    if not restored:
        model, history = tune(student, **arguments)
        return model, {**history, "restored_batchnorms": []}
    student = copy.deepcopy(student)
    restore_norms(student, restored, images)
    model, history = tune(student, **arguments)
    fold_norms(model, restored)
    return model.eval(), {**history, "restored_batchnorms": restored}

"""MACs and parameters of a torch model, per Conv2d/Linear layer, from one forward pass at batch 1."""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    params: int


def layer_macs(layer: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one sample: each output element of a conv costs (Cin/groups)*kh*kw."""
    per_sample = output[0].numel()
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return per_sample * (layer.in_channels // layer.groups) * kh * kw
    if isinstance(layer, nn.Linear):
        return per_sample * layer.in_features
    return 0


def count(module: nn.Module, input_shape: tuple[int, ...]) -> dict[str, LayerCost]:
    """Costs of every Conv2d and Linear, keyed by module name, in execution order."""
    costs: dict[str, LayerCost] = {}
    hooks = []
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            def hook(mod, inputs, output, name=name):
                costs[name] = LayerCost(
                    name, type(mod).__name__, tuple(inputs[0].shape[1:]), tuple(output.shape[1:]),
                    layer_macs(mod, output), sum(p.numel() for p in mod.parameters(recurse=False)))
            hooks.append(layer.register_forward_hook(hook))
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            module(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)
    return costs


def totals(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs of Conv2d/Linear layers, all parameters)."""
    macs = sum(c.macs for c in count(module, input_shape).values())
    return macs, sum(p.numel() for p in module.parameters())

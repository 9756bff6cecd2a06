"""A channel group cut to nothing: the layers that wrote it and read it leave the network.

A residual block's inner channels are such a group: one conv writes them, one reads them, and the block adds what
it computes to its shortcut. Keeping none of them leaves the block its shortcut plus a constant per channel (what the
reading layer, and the BatchNorm after it, output from no input), so the block costs one add instead of two convs;
ResNets lose little for most blocks dropped whole (Veit et al., "Residual Networks Behave Like Ensembles of
Relatively Shallow Networks", NeurIPS 2016). On an ONNX Runtime board each conv pays a fixed cost (its quantize and
dequantize steps) that no narrower cut removes: removal is the lever that does.

Torch-Pruning cannot cut a group to zero channels (a layer keeps at least one), so the surgery is ours: the writing
layer and the BatchNorms on the group become `Removed` (they pass on no channels; the exporter drops the dead path),
the reading layer becomes `ConstantOutput` with the BatchNorm after it folded in. With calibration images the
constant is the dense branch's mean output at each position of each channel (the least-squares constant, as every
other refit: near the borders a zero-padded conv's mean differs from the middle's), and it is trained with the rest
in fine-tuning.
"""

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.compress.decompose import set_submodule
from pipeline.errors import StageError

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class Removed(nn.Module):
    """A layer a removed channel group took away: it passes on no channels, and nothing reads what it returns."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :0]


class ConstantOutput(nn.Module):
    """A layer all of whose input channels were removed: its constant output (its bias, through the BatchNorm that
    followed it, folded in here), one value per channel and position of the dense layer's output for one image
    (`spatial`), so the exported graph adds a tensor of the same shape, for a constant of C x H x W bytes: ONNX
    Runtime's broadcast add of a per-channel constant is the slower one (ResNet-20's first-stage blocks on the A72,
    the cycle engine's estimate: 240,000 cycles each beyond the add it replaces, 40,000 at full size; not measured
    on a Cortex-M), and the full size lets each position hold its own mean. `value` trains like a bias; `scale` and
    `shift` (the folded BatchNorm, per channel) turn a mean of the dense layer's outputs into it."""

    def __init__(self, value: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, spatial: tuple[int, ...] = ()):
        super().__init__()
        self.spatial = tuple(spatial)
        self.value = nn.Parameter(value.expand(*value.shape[:2], *self.spatial).clone() if self.spatial else value)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "value"
        if key in state_dict and state_dict[key].dim() == self.value.dim() and state_dict[key].shape != self.value.shape:
            # a file written when the constant was one value per channel: the same function, spread over positions
            state_dict[key] = state_dict[key].expand_as(self.value).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit(self, dense_output: torch.Tensor) -> None:
        """The least-squares constant: the dense layer's mean output over the images at each channel and position,
        through the folded BatchNorm."""
        per_channel = (1, -1) + (1,) * (dense_output.dim() - 2)
        mean = dense_output.mean(0, keepdim=True)
        self.value.copy_(mean * self.scale.view(per_channel) + self.shift.view(per_channel))


def _following_norm(graph, layer: nn.Module) -> nn.Module | None:
    """The BatchNorm that alone reads `layer`'s output, if one does."""
    node = graph.module2node.get(layer)
    outputs = [] if node is None else node.outputs
    norms = [o.module for o in outputs if isinstance(o.module, NORMS)]
    if not norms:
        return None
    if len(outputs) != 1 or len(graph.module2node[norms[0]].inputs) != 1:
        raise StageError("a layer reading the removed channels feeds a BatchNorm that other tensors also reach: "
                         "its constant output cannot be folded")
    return norms[0]


@dataclass(frozen=True)
class RemovalPlan:
    """The modules (by name) a removed group takes away: the layer writing it, the BatchNorms on it, the layers
    reading it (each becomes a constant) and, per reader, the BatchNorm after it that the constant absorbs."""

    writer: str
    norms: tuple[str, ...]
    readers: tuple[str, ...]
    following: dict[str, str | None]


def plan_removal(graph, group, names: dict[nn.Module, str]) -> RemovalPlan:
    """What removing Torch-Pruning's `group` (a layer's output channels and everything coupled to them) takes away;
    `names` names every module of the model. Raises StageError naming why a group cannot be removed: it must have
    one writing layer, and every layer reading it must read nothing else."""
    writers, readers, norms = [], [], []
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.Conv2d | nn.Linear):
            if isinstance(module, nn.Conv2d) and module.groups > 1:
                raise StageError(f"{names[module]} is a grouped conv on the channels: its group cannot be removed")
            out = "out_channels" in getattr(item.dep.handler, "__name__", "")
            (writers if out else readers).append(module)
        elif isinstance(module, NORMS):
            norms.append(module)
    writers, readers, norms = (list(dict.fromkeys(m)) for m in (writers, readers, norms))
    if len(writers) != 1 or not readers:
        raise StageError(f"{len(writers)} layers write these channels and {len(readers)} read them: only a group with "
                         "one writer and some reader can be removed")
    width = writers[0].out_channels if isinstance(writers[0], nn.Conv2d) else writers[0].out_features
    for reader in readers:
        reads = reader.in_channels if isinstance(reader, nn.Conv2d) else reader.in_features
        if reads != width:
            raise StageError(f"{names[reader]} reads {reads} channels, {width} of them removed: it would go on "
                             "reading the others")
    following = {names[r]: (None if (n := _following_norm(graph, r)) is None else names[n]) for r in readers}
    return RemovalPlan(names[writers[0]], tuple(names[n] for n in norms), tuple(names[r] for r in readers), following)


def apply_removal(model: nn.Module, plan: RemovalPlan, spatial: dict[str, tuple[int, ...]]) -> None:
    """Carry out `plan` on `model`, in place; `spatial`: each reader's output size past its channels. Modules are looked
    up by name, so `model` may have been cut since the plan was made (a reader whose outputs another group cut gets a
    constant of the channels it kept)."""
    for reader in plan.readers:
        norm = plan.following[reader]
        set_submodule(model, reader, _fold(model.get_submodule(reader), None if norm is None else model.get_submodule(norm),
                                           spatial.get(reader, ())))
        if norm is not None:
            set_submodule(model, norm, nn.Identity())  # folded into the constant
    for name in (plan.writer, *plan.norms):
        set_submodule(model, name, Removed())


def _fold(layer: nn.Module, norm: nn.Module | None, spatial: tuple[int, ...]) -> ConstantOutput:
    channels = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(channels)
    if norm is None:
        scale, shift = torch.ones(channels), torch.zeros(channels)
    else:
        gamma = torch.ones(channels) if norm.weight is None else norm.weight.detach()
        beta = torch.zeros(channels) if norm.bias is None else norm.bias.detach()
        scale = gamma / torch.sqrt(norm.running_var + norm.eps)
        shift = beta - norm.running_mean * scale
    shape = (1, channels, 1, 1) if isinstance(layer, nn.Conv2d) else (1, channels)
    return ConstantOutput((bias * scale + shift).reshape(shape).clone(), scale.clone(), shift.clone(), spatial)

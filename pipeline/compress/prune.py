"""Structured channel pruning: whole channels removed from groups of layers that must shrink together.

The graph surgery is Torch-Pruning's (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023): its
dependency graph finds, for each conv or linear layer's output channels, every layer coupled to them (the
BatchNorm after it, the next layers' inputs, the other branches of a residual add, a depthwise conv's both sides,
a concat's slice) and removes the same channels from all of them. What to prune is ours: which groups, how many
channels each keeps (a multiple of the target's `round_to`), and which channels (the group's L2 magnitude, summed
over every coupled layer; the budget allocation measures each cut's effect on the logits).

A group with one writing layer whose readers read nothing else (a residual block's inner channels) may also keep
none: the block leaves the network (`removal`).

A group is offered only where Torch-Pruning maps it exactly: every layer whose output channels it cuts has as
many channels as the group. A zero-padding shortcut (the CIFAR ResNets' option A) couples stages of different
widths through channel offsets the dependency graph cannot follow; those groups are refused, with the reason.
"""

import copy
from dataclasses import dataclass
from fnmatch import fnmatch

import torch
import torch_pruning as tp
from torch import nn

from pipeline.compress import datafit
from pipeline.compress.budget.macs import count as layer_costs
from pipeline.compress.ranks import round_up
from pipeline.compress.removal import ConstantOutput, Removed, apply_removal, plan_removal
from pipeline.errors import ConfigError, StageError

PREFIX = "channels:"  # a channel group's budget unit is named after the layer that roots it


def unit_name(group: str) -> str:
    return PREFIX + group


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are pruned together, named after the first layer (in execution order) that writes them."""

    name: str
    channels: int  # how many the group has dense
    producers: tuple[str, ...]  # conv/linear layers whose output channels it cuts
    consumers: tuple[str, ...]  # conv/linear layers whose input channels it cuts
    depthwise: tuple[str, ...] = ()  # depthwise convs it cuts on both sides
    removable: bool = False  # may keep no channel at all (see `removal`)


def _compute_layers(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def _graph(model: nn.Module, input_shape: tuple[int, ...]) -> tp.DependencyGraph:
    was_training = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *input_shape), verbose=False)
    except Exception as exc:  # the pruner traces by autograd: an op it cannot follow is the model's, name it
        raise StageError(f"channel pruning could not trace the model ({type(exc).__name__}: {exc})") from exc
    finally:
        model.train(was_training)


def _is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels


def _describe(group, names: dict[nn.Module, str]) -> tuple[list, list, list]:
    producers, consumers, depthwise = [], [], []
    for item in group:
        module = item.dep.target.module
        name = names.get(module)
        if name is None:
            continue
        if _is_depthwise(module):
            depthwise.append(name)
        elif "out_channels" in getattr(item.dep.handler, "__name__", ""):
            producers.append(name)
        else:
            consumers.append(name)
    return producers, consumers, depthwise


def channel_groups(model: nn.Module, input_shape: tuple[int, ...], *, layers=("*",), exclude=(),
                   last_layer: str | None = None) -> tuple[list[ChannelGroup], dict[str, str]]:
    """The groups that can be pruned, in the model's layer order, and the groups refused with why. A group is
    refused when any of its layers is not selected by `layers`/`exclude`, when it would cut `last_layer`'s outputs
    (the classes), or when Torch-Pruning cannot map it exactly (see the module's docstring)."""
    names = _compute_layers(model)
    every = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    graph = _graph(model, input_shape)
    ignored = [m for m, n in names.items() if n == last_layer]
    found, refused = [], {}
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
        root = group[0].dep.target.module
        if root not in names:
            continue
        name, channels = names[root], len(group[0].idxs)
        producers, consumers, depthwise = _describe(group, names)
        members = producers + consumers + depthwise
        widths = {names[m]: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                  for m in names if names[m] in producers + depthwise}
        if any(w != channels for w in widths.values()):
            refused[name] = (f"its {channels} channels are coupled to layers of other widths "
                             f"({', '.join(f'{n}: {w}' for n, w in widths.items() if w != channels)}) through an "
                             "operator the pruner cannot map (e.g. a zero-padding shortcut): not pruned")
        elif not all(any(fnmatch(m, p) for p in layers) and not any(fnmatch(m, p) for p in exclude) for m in members):
            refused[name] = "a layer it couples is not selected by the layer patterns: not pruned"
        elif channels < 2:
            refused[name] = "a single channel: not pruned"
        else:  # named after its first writer in layer order, whichever layer the pruner's walk started from
            producers, depthwise = sorted(producers, key=order.get), sorted(depthwise, key=order.get)
            found.append(ChannelGroup((producers or depthwise)[0], channels, tuple(producers),
                                      tuple(sorted(consumers, key=order.get)), tuple(depthwise),
                                      _removable(graph, group, every)))
    found.sort(key=lambda g: order[g.name])
    return found, refused


def _removable(graph, group, names) -> bool:
    try:
        plan_removal(graph, group, names)
    except StageError:
        return False
    return True


def kept_counts(group: ChannelGroup, *, fractions, round_to: int) -> list[int]:
    """The channel counts a group may keep: each fraction of its channels rounded up to `round_to` (CMSIS-NN's
    fast 1x1 path needs input channels in fours, ORT's blocked kernels eights), below the dense count, distinct.
    A fraction of 0 offers none where the group can be removed."""
    found = [0] if group.removable and 0 in fractions else []
    for fraction in fractions:
        if fraction == 0:
            continue
        kept = round_up(max(1, round(fraction * group.channels)), round_to, group.channels)
        if kept < group.channels and kept not in found:
            found.append(kept)
    return sorted(found)


def _importance(group) -> torch.Tensor:
    """Each channel's L2 magnitude over every coupled layer's weights (Torch-Pruning's group magnitude)."""
    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)(group)


def prune(model: nn.Module, input_shape: tuple[int, ...], keep: dict[str, int],
          indices: dict[str, list[int]] | None = None) -> tuple[nn.Module, dict[str, list[int]]]:
    """A copy of `model` with each group named in `keep` (by its root layer) cut to that many channels, and the
    channels each kept (sorted): the largest by group magnitude, or `indices` when given (rebuilding a saved
    model). A group keeping 0 channels is removed (see `removal`) after the others are cut. At full width the copy
    computes exactly what `model` does."""
    pruned = copy.deepcopy(model).eval()
    names = _compute_layers(pruned)
    by_name = {n: m for m, n in names.items()}
    graph = _graph(pruned, input_shape)
    kept: dict[str, list[int]] = {}
    removals = []
    for name, count in keep.items():
        root = by_name.get(name)
        if root is None:
            raise ConfigError(f"channel group {name!r}: no such conv or linear layer; known: {', '.join(list(by_name)[:8])}")
        channels = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        if not 0 <= count <= channels:
            raise ConfigError(f"channel group {name!r} keeping {count} of {channels} channels; expected 0 to {channels}")
        handler = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        group = graph.get_pruning_group(root, handler, idxs=list(range(channels)))
        if count == 0:
            try:
                removals.append(plan_removal(graph, group, {m: n for n, m in pruned.named_modules()}))
            except StageError as exc:
                raise ConfigError(f"channel group {name!r} keeping no channels: {exc}") from exc
            kept[name] = []
            continue
        if indices is not None and name in indices:
            chosen = sorted(indices[name])
        else:
            scores = _importance(group)
            chosen = sorted(torch.argsort(scores, descending=True, stable=True)[:count].tolist())
        kept[name] = chosen
        if count < channels:
            dropped = sorted(set(range(channels)) - set(chosen))
            graph.get_pruning_group(root, handler, idxs=dropped).prune()
    if removals:
        spatial = {n: c.output_shape[1:] for n, c in layer_costs(pruned, input_shape).items()}
        for removal in removals:
            apply_removal(pruned, removal, spatial)
    x = torch.zeros(2, *input_shape)  # two images: a removed layer's constant must broadcast over the batch
    try:
        with torch.inference_mode():
            got = pruned(x).shape
    except Exception as exc:
        raise StageError(f"the model pruned to {keep} no longer runs ({type(exc).__name__}: {exc})") from exc
    expected = _output_shape(model, x) if removals else got
    if removals and got != expected:
        raise StageError(f"the model pruned to {keep} outputs {tuple(got)} for {tuple(expected)}: a removed layer's "
                         "constant does not reach a tensor of its own shape")
    return pruned, kept


def _output_shape(model: nn.Module, x: torch.Tensor) -> torch.Size:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return model(x).shape
    finally:
        model.train(was_training)


@torch.no_grad()
def refit_consumers(pruned: nn.Module, dense: nn.Module, names, x: torch.Tensor, *, seed: int = 0,
                    outputs_kept: dict[str, list[int]] | None = None) -> list[str]:
    """The reconstruction step of channel pruning (He et al., "Channel Pruning for Accelerating Very Deep Neural
    Networks", ICCV 2017): each layer in `names` that reads cut channels gets the least-squares weights (and bias)
    that best reproduce the dense layer's output from what the pruned network now feeds it, in execution order so
    each also absorbs what the refits before it changed. Layers of several groups (other than depthwise, which a
    cut keeps exact) are left as they are. `outputs_kept` names the output channels a layer kept where another
    cut also removed some of its outputs. Returns the names refitted."""
    done = []
    outputs = datafit.layer_io(dense, list(names), x)
    for name in names:
        layer = pruned.get_submodule(name)
        if isinstance(layer, Removed) or (isinstance(layer, nn.Conv2d) and layer.groups != 1):
            continue
        target = outputs[name][1]
        if outputs_kept and name in outputs_kept:
            target = target[:, outputs_kept[name]]
        if isinstance(layer, ConstantOutput):  # a removed group's reader: the constant nearest its dense outputs
            layer.fit(target)
            done.append(name)
            continue
        inputs = datafit.layer_inputs(pruned, name, x)
        datafit.least_squares(layer, inputs, datafit.outputs_2d(target), seed=seed)
        done.append(name)
    return done


def consumers_of(groups: list[ChannelGroup], cut: dict[str, int], order: list[str]) -> list[str]:
    """The layers reading channels that `cut` removes, in execution order."""
    reading = {n for g in groups if g.name in cut for n in g.consumers}
    return [n for n in order if n in reading]

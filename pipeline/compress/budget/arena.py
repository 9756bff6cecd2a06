"""The activation memory (RAM) a compressed model needs, estimated from its torch graph before anything is
exported, so the budget allocation can weigh it for every option.

The int8 graph TFLite Micro runs is replayed from the torch graph: a conv or linear layer is one operator (its
BatchNorm and ReLU fused), an add, a pool, a concat or a reshape another, a factored layer its chain's operators
one after another; a stride-2 conv with padding SAME cannot express gets the PAD tensor the converter adds. Every
tensor lives from the operator that writes it to the last that reads it, one byte per int8 element, and the
buffers are placed as the TFLite writer places them (`pipeline/memory_plan.py`: TFLM's own greedy rule, or an
offline plan the writer records where another order needs less). Pruned channels shrink the tensors their group owns; a factored
layer adds its chain's intermediate tensors.

What this leaves out is the arena's persistent part (TFLM's tensor and operator records, each conv's per-channel
requantization data, CMSIS-NN's scratch buffers): `persistent_bytes` estimates it, and the deploy compares the
whole estimate with the arena the interpreter and the firmware measure (both are reported).
"""

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from pipeline.compress.removal import ConstantOutput, Removed
from pipeline.errors import StageError
from pipeline.memory_plan import best_plan

ALIGN = 16  # TFLM aligns every planned buffer to 16 bytes
# operators TFLite fuses into the conv, linear or add before them: they write no tensor of their own
FUSED_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Dropout)
FUSED_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.hardtanh,
                   torch.nn.functional.batch_norm, torch.nn.functional.dropout}
# calls that move no data the planner sees (shapes, attribute reads)
NOT_TENSORS = {getattr, operator.getitem, "size", "dim"}


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


@dataclass
class Tensor:
    size: int  # bytes dense
    group: str | None = None  # the channel group whose channels it carries (shrinks with its cut)
    channels: int = 1  # the group's dense channel count


@dataclass
class Step:
    """One operator: the tensors it reads and the one it writes; `layer` when it is a conv or linear layer."""

    inputs: tuple[int, ...]
    output: int
    layer: str | None = None
    pad: int = 0  # bytes of an explicit PAD tensor the converter puts in front (dense)


@dataclass
class Timeline:
    """The model's operators in execution order and the tensors between them, dense; `arena` prices a selection."""

    tensors: list[Tensor]
    steps: list[Step]
    outputs: tuple[int, ...]
    out_group: dict[str, str | None] = field(default_factory=dict)

    def arena(self, keep: dict[str, int] | None = None, chains: dict[str, list[int]] | None = None) -> int:
        """The planned activation bytes with groups cut to `keep` (group -> channels kept) and layers factored
        into chains whose intermediate tensors have `chains[layer]` bytes (in order)."""
        buffers, _ = self._buffers(keep or {}, chains or {})
        return best_plan([(_aligned(s), a, b) for s, a, b in buffers if s])[2]

    def live(self, keep: dict[str, int] | None = None, chains: dict[str, list[int]] | None = None) -> dict[str, int]:
        """Per conv or linear layer, the most activation bytes alive at once while it runs (its input, output,
        chain intermediates and whatever else is kept for later, such as a residual's other branch)."""
        buffers, spans = self._buffers(keep or {}, chains or {})
        return {layer: max(sum(_aligned(s) for s, a, b in buffers if a <= t <= b) for t in range(first, last + 1))
                for layer, (first, last) in spans.items()}

    def moved(self, keep: dict[str, int] | None = None) -> int:
        """Elements the operators between the layers read and write (adds, pools, means, reshapes and the explicit
        pads before convs) with groups cut to `keep`: what their cost scales with, since no layer table prices them."""
        keep = keep or {}
        total = 0
        for step in self.steps:
            if step.layer is None:
                total += sum(_cut(self.tensors[i], keep) for i in step.inputs) + _cut(self.tensors[step.output], keep)
            elif step.pad:
                source = self.tensors[step.inputs[0]]
                total += _cut(source, keep) + _cut(Tensor(step.pad, source.group, source.channels), keep)
        return total

    def layer_io(self, keep: dict[str, int] | None = None) -> int:
        """Elements the conv and linear layers read and write with groups cut to `keep`: what a layer timed alone
        also pays for at its edges (on ONNX Runtime, quantizing its float input and dequantizing its output)."""
        keep = keep or {}
        edges = [(_cut(self.tensors[s.inputs[0]], keep), _cut(self.tensors[s.output], keep)) for s in self.steps
                 if s.layer is not None]
        return sum(i + o for i, o in edges if i and o)  # a layer a removed group took away has no edges

    def _buffers(self, keep: dict[str, int], chains: dict[str, list[int]]):
        """(size, first use, last use) of every buffer, and each layer's span of operator steps."""
        sizes = [_cut(t, keep) for t in self.tensors]
        buffers: dict[int, list[int]] = {}  # tensor -> [size, first step, last step]
        spans: dict[str, tuple[int, int]] = {}
        clock = 0
        written = {s.output for s in self.steps}
        for i in range(len(self.tensors)):
            if i not in written:
                buffers[i] = [sizes[i], 0, 0]  # model inputs live from the start
        extra = len(sizes)
        for step in self.steps:
            started = clock
            reads = step.inputs
            if step.pad:
                source = self.tensors[step.inputs[0]]
                buffers[extra] = [_cut(Tensor(step.pad, source.group, source.channels), keep), clock, clock + 1]
                for i in reads:
                    buffers[i][2] = max(buffers[i][2], clock)
                reads, clock, extra = (extra,), clock + 1, extra + 1
            for middle in chains.get(step.layer or "", []):  # each factor writes an intermediate the next one reads
                buffers[extra] = [middle, clock, clock]
                for i in reads:
                    buffers[i][2] = max(buffers[i][2], clock)
                reads, clock, extra = (extra,), clock + 1, extra + 1
            buffers[step.output] = [sizes[step.output], clock, clock]
            for i in reads:
                buffers[i][2] = max(buffers[i][2], clock)
            if step.layer:
                spans[step.layer] = (started, clock)
            clock += 1
        for i in self.outputs:
            buffers[i][2] = clock
        return list(buffers.values()), spans


def _cut(t: Tensor, keep: dict[str, int]) -> int:
    """Bytes of `t` once its group keeps `keep[group]` channels."""
    return -(-t.size * keep[t.group] // t.channels) if t.group in keep else t.size


def _numel(node: torch.fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return 0
    shape = tuple(meta.shape)
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return n


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
    return total // 2, total - total // 2


def _explicit_pad(conv: nn.Conv2d, shape: tuple[int, ...]) -> int:
    """Bytes of the PAD tensor the TFLite writer puts before `conv` when its padding is not SAME, else 0."""
    if isinstance(conv.padding, str) or not any(conv.padding):
        return 0
    c, h, w = shape
    (ph, pw), (kh, kw), (sh, sw), (dh, dw) = conv.padding, conv.kernel_size, conv.stride, conv.dilation
    if _same_pads(h, kh, sh, dh) == (ph, ph) and _same_pads(w, kw, sw, dw) == (pw, pw):
        return 0
    return c * (h + 2 * ph) * (w + 2 * pw)


def timeline(model: nn.Module, input_shape: tuple[int, ...], *, out_group: dict[str, str],
             channels: dict[str, int]) -> Timeline:
    """`model`'s operators and tensors as TFLite Micro will run them (see the module's docstring). `out_group`
    names, per conv or linear layer, the channel group its output carries; `channels` each group's dense width."""
    try:
        graph = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
        ShapeProp(graph).propagate(torch.zeros(1, *input_shape))
    except Exception as exc:
        raise StageError(f"arena budgets replay the model's graph, and torch.fx could not trace it "
                         f"({type(exc).__name__}: {exc})") from exc
    modules = dict(graph.named_modules())
    tensors: list[Tensor] = []
    steps: list[Step] = []
    of: dict[torch.fx.Node, int] = {}  # node -> tensor it writes (or aliases)
    fusable: set[int] = set()  # tensors written by a conv, linear or add: an activation after them is fused

    def tensor_inputs(node) -> list[int]:
        return [of[a] for a in node.all_input_nodes if a in of]

    for node in graph.graph.nodes:
        if node.op == "placeholder":
            of[node] = len(tensors)
            tensors.append(Tensor(_numel(node)))
            continue
        if node.op == "output":
            outputs = tuple(of[a] for a in node.all_input_nodes if a in of)
            continue
        if node.op == "get_attr" or (node.op == "call_function" and node.target in NOT_TENSORS) or \
                (node.op == "call_method" and node.target in NOT_TENSORS):
            continue
        inputs = tensor_inputs(node)
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, Removed | ConstantOutput):  # a removed group: no operator, a constant at most
            continue
        fused = isinstance(module, FUSED_MODULES) or (node.op == "call_function" and node.target in FUSED_FUNCTIONS) \
            or (node.op == "call_method" and node.target in ("relu", "relu_"))
        if inputs and (isinstance(module, nn.Identity | nn.Dropout) or (
                fused and inputs[0] in fusable and len(node.all_input_nodes[0].users) == 1)):
            of[node] = inputs[0]  # no operator of its own: an alias, or fused into the one that wrote its input
            continue
        if not inputs:
            continue
        if isinstance(module, nn.Conv2d | nn.Linear):
            group = out_group.get(node.target)
            of[node] = len(tensors)
            tensors.append(Tensor(_numel(node), group, channels.get(group, 1)))
            source = node.all_input_nodes[0].meta.get("tensor_meta")
            pad = _explicit_pad(module, tuple(source.shape[1:])) if isinstance(module, nn.Conv2d) and source else 0
            steps.append(Step((inputs[0],), of[node], node.target, pad))
            fusable.add(of[node])
            continue
        first = tensors[inputs[0]]
        same_channels = _numel(node) and first.group is not None
        of[node] = len(tensors)
        tensors.append(Tensor(_numel(node), first.group if same_channels else None, first.channels))
        steps.append(Step(tuple(inputs), of[node]))
        if node.op == "call_function" and node.target in (operator.add, torch.add):
            fusable.add(of[node])
    return Timeline(tensors, _breadth_first(steps), outputs, dict(out_group))


def _breadth_first(steps: list[Step]) -> list[Step]:
    """The operators in the order the `.tflite` runs them. ONNX Runtime's quantizer sorts the graph breadth-first
    (Kahn's algorithm with a queue: `ONNXModel.topological_sort`), and the TFLite writer keeps that order, so a
    residual block's projection shortcut runs right after its first conv, before the second (seen on ResNet-8)."""
    written = {s.output: i for i, s in enumerate(steps)}
    waiting = [len({t for t in s.inputs if t in written}) for s in steps]
    readers: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        for t in dict.fromkeys(s.inputs):
            readers.setdefault(t, []).append(i)
    queue = [i for i, n in enumerate(waiting) if n == 0]
    for i in queue:  # grows while it is walked: a FIFO
        for j in readers.get(steps[i].output, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                queue.append(j)
    return [steps[i] for i in queue] if len(queue) == len(steps) else steps


def chain_intermediates(chain: nn.Module, input_shape: tuple[int, ...]) -> list[int]:
    """Bytes of each tensor between a factored chain's layers (int8), in order."""
    sizes: list[int] = []
    x = torch.zeros(1, *input_shape)
    with torch.inference_mode():
        for part in list(chain)[:-1]:
            x = part(x)
            sizes.append(int(x[0].numel()))
    return sizes


def persistent_bytes(*, operators: int, conv_channels: int) -> int:
    """TFLite Micro's persistent arena part, estimated: per operator its node record and its tensors' runtime records
    (about 2.6 tensors an operator), per conv output channel its int32 multiplier and shift. Fitted to the recording
    allocator's tail on ResNet-8, ResNet-20, DS-CNN and MobileNetV1 0.25, dense and at half width (within 350 B)."""
    return 664 + 223 * operators + 8 * conv_channels

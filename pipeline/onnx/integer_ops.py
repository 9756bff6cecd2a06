"""Rewrites that let ONNX Runtime run in integers two operators its QDQ fusions leave in float.

ONNX Runtime turns DequantizeLinear -> op -> QuantizeLinear into one integer kernel for the operators it has one
for; a Pad and a ReduceMean it runs in float between the two, converting the whole tensor twice. On the Cortex-A72
those round trips cost ResNet-20's int8 model 150,000 of its 8.49 M estimated cycles (the two option-A shortcuts'
channel pads and the mean before the classifier; docs/BENCHMARKS.md). Both rewrites compute the same integers:
- a Pad between a DequantizeLinear and a QuantizeLinear of one scale and zero point pads the integers themselves
  with its pad value quantized (Q(DQ(x)) = x, and a padded position holds Q(value) either way);
- a ReduceMean over H and W of a 4-D tensor is a GlobalAveragePool (and a Flatten where it drops those axes),
  which ORT fuses into QLinearGlobalAveragePool.
Applied to uint8 graphs only: the TFLite writer reads int8 QDQ graphs (whose Pad and mean TFLite runs in int8
already) and expects each of their tensors behind a QuantizeLinear.
"""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.util import onnx_attributes as attrs


def _consumers(graph) -> dict[str, list]:
    found: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _constants(graph) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info, *graph.output]
            if v.type.tensor_type.HasField("shape")}


def spatial_means_as_pools(model: onnx.ModelProto) -> list[str]:
    """Each ReduceMean over axes 2 and 3 of a 4-D tensor becomes a GlobalAveragePool (followed by a Flatten where
    `keepdims` is 0); returns the nodes rewritten. Needs the graph's shapes (run shape inference first)."""
    graph, consts, ranks = model.graph, _constants(model.graph), _ranks(model)
    rewritten, axes_read = [], set()
    for node in list(graph.node):
        if node.op_type != "ReduceMean" or ranks.get(node.input[0]) != 4:
            continue
        a = attrs(node)
        axes = a.get("axes") or (consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None)
        if axes is None or sorted(int(x) % 4 for x in np.atleast_1d(axes)) != [2, 3]:
            continue
        keep = a.get("keepdims", 1)
        axes_read.update(node.input[1:])
        pooled = node.output[0] if keep else f"{node.output[0]}_pooled"
        position = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(position, helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=node.name))
        if not keep:
            graph.node.insert(position + 1, helper.make_node("Flatten", [pooled], [node.output[0]], axis=1,
                                                             name=f"{node.name}_flatten"))
        rewritten.append(node.name)
    used = {name for node in graph.node for name in node.input}
    unused = [i for i in graph.initializer if i.name in axes_read and i.name not in used]
    for initializer in unused:
        graph.initializer.remove(initializer)
    return rewritten


def pads_on_integers(model: onnx.ModelProto) -> list[str]:
    """Each DequantizeLinear -> Pad -> QuantizeLinear of one per-tensor scale and zero point becomes a Pad of the
    quantized tensor, its pad value quantized; returns the Pads rewritten. The same integers come out."""
    graph, consts = model.graph, _constants(model.graph)
    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    rewritten, dropped, gone = [], [], set()
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        dq, readers = producer.get(pad.input[0]), consumers.get(pad.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            continue
        q = readers[0]
        if list(dq.input[1:3]) != list(q.input[1:3]) or len(dq.input) < 3 or pad.output[0] in {o.name for o in graph.output}:
            continue
        scale, zero_point = consts.get(dq.input[1]), consts.get(dq.input[2])
        if scale is None or zero_point is None or scale.size != 1:
            continue
        given = pad.input[2] if len(pad.input) > 2 else ""
        if given and given not in consts:  # a value computed at run time (or behind its own DequantizeLinear)
            continue
        value = np.float32(consts[given].ravel()[0]) if given else np.float32(0)
        info = np.iinfo(zero_point.dtype)
        # as QuantizeLinear computes it: float32 division, rounding half to even, saturation
        step = np.round(value / np.float32(scale.ravel()[0])) + int(zero_point.ravel()[0])
        quantized = np.clip(step, info.min, info.max).astype(zero_point.dtype)
        value_name = f"{pad.name or pad.output[0]}_quantized_value"
        graph.initializer.append(numpy_helper.from_array(np.array(quantized), value_name))
        inputs = [dq.input[0], pad.input[1], value_name, *pad.input[3:]]
        del pad.input[:]
        pad.input.extend(inputs)
        gone.add(pad.output[0])  # the float tensor no longer exists; the integer one keeps the Q's name
        pad.output[0] = q.output[0]
        dropped.append(q)
        if len(consumers.get(dq.output[0], [])) == 1:
            dropped.append(dq)
            gone.add(dq.output[0])
        rewritten.append(pad.name)
    for node in dropped:
        graph.node.remove(node)
    kept = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return rewritten

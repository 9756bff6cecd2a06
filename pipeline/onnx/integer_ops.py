"""Rewrites that let the int8 runtimes run pads and spatial means with their fast integer kernels.

ONNX Runtime turns DequantizeLinear -> op -> QuantizeLinear into one integer kernel for the operators it has one
for; a Pad and a ReduceMean it runs in float between the two, converting the whole tensor twice. On the Cortex-A72
those round trips cost ResNet-20's int8 model 150,000 of its 8.49 M estimated cycles (the two option-A shortcuts'
channel pads and the mean before the classifier). TFLite Micro runs a MEAN with its reference kernel: 0.56 M of
ResNet-8's 33 M estimated Cortex-M4 cycles, where CMSIS-NN's average pool takes a few thousand (docs/BENCHMARKS.md).
- A Pad between a DequantizeLinear and a QuantizeLinear of one scale and zero point pads the integers themselves
  with its pad value quantized (Q(DQ(x)) = x, and a padded position holds Q(value) either way): the same integers.
  uint8 graphs only: the TFLite writer reads a pad from its QDQ form (TFLite's PAD is int8 already).
- A mean over H and W of a 4-D tensor becomes a pool before quantization: for ONNX Runtime (uint8) a
  GlobalAveragePool, calibrated as the mean was, which ORT fuses into QLinearGlobalAveragePool; for TFLite (int8) an
  AveragePool over the whole map, which ORT's quantizer gives its input's scale and zero point, as TFLite's
  AVERAGE_POOL_2D needs (MLPerf Tiny's own ResNet-8 ends so).
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


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    graph = model.graph
    return {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
            for v in [*graph.input, *graph.value_info, *graph.output] if v.type.tensor_type.HasField("shape")}


def spatial_means_as_pools(model: onnx.ModelProto, *, shared_scale: bool) -> list[str]:
    """Each mean over H and W of a 4-D tensor (a ReduceMean over axes 2 and 3; with `shared_scale` a
    GlobalAveragePool too) becomes a pool, followed by a Flatten where the mean dropped those axes; returns the nodes
    rewritten. Without `shared_scale` the pool is a GlobalAveragePool, calibrated on its own, which ONNX Runtime
    fuses into QLinearGlobalAveragePool. With it, an AveragePool over the whole map, to which ORT's quantizer gives
    its input's scale and zero point: what TFLite's AVERAGE_POOL_2D needs, and CMSIS-NN runs it in a fraction of
    the reference MEAN kernel's cycles. Needs the graph's shapes (run shape inference first)."""
    graph, consts, shapes = model.graph, _constants(model.graph), _shapes(model)
    rewritten, axes_read = [], set()
    for node in list(graph.node):
        shape = shapes.get(node.input[0]) if node.input else None
        if node.op_type not in ("ReduceMean", "GlobalAveragePool") or shape is None or len(shape) != 4:
            continue
        if node.op_type == "GlobalAveragePool" and not shared_scale:
            continue
        a = attrs(node)
        if node.op_type == "ReduceMean":
            axes = a.get("axes") or (consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None)
            if axes is None or sorted(int(x) % 4 for x in np.atleast_1d(axes)) != [2, 3]:
                continue
        keep = a.get("keepdims", 1)
        if shared_scale and not all(shape[2:]):  # the pool's kernel is the map: its size must be known
            continue
        axes_read.update(node.input[1:])
        pooled = node.output[0] if keep else f"{node.output[0]}_pooled"
        pool = (helper.make_node("AveragePool", [node.input[0]], [pooled], kernel_shape=list(shape[2:]),
                                 strides=list(shape[2:]), name=node.name) if shared_scale else
                helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=node.name))
        position = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(position, pool)
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

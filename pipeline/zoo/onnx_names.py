"""Readable layer names for an imported ONNX graph: what the plan table, the report and EXCLUDE= show.

Exporters name nodes by their own scopes. torch writes '/blocks/blocks.0/se/up/Conv'; tf2onnx writes a Keras
layer's TensorFlow scope ('functional_1/conv2d_1/BiasAdd'), a name of its own ('Conv__37') where it made the node,
and, from a .tflite, the ';'-joined scopes of every op the converter fused into one
('model/activation/Relu;model/batch_normalization/FusedBatchNormV3;model/conv2d/BiasAdd;...', 183 characters on
MLPerf Tiny's ResNet-8). The Keras layer name is the scope's second part ('conv2d_1').
"""

MAX_CHARS = 48  # a plan-table column, an EXCLUDE= pattern: longer names only repeat scopes

# TensorFlow ops a Keras conv or dense layer is made of: the scope among a fused name's parts that names the layer
_TF_COMPUTE = ("BiasAdd", "Conv2D", "convolution", "depthwise", "MatMul", "Tensordot")


def torch_name(node) -> str:
    """torch's '/blocks/blocks.0/se/up/Conv' -> 'blocks.0/se/up' (the op type and the scope a child repeats
    dropped), which the builder makes the Python name 'blocks_0_se_up'."""
    parts = [p for p in (node.name or node.output[0]).split("/") if p]
    if len(parts) > 1 and parts[-1].split("_")[0] == node.op_type:
        parts.pop()
    kept = []
    for part in parts:
        if kept and part.startswith(kept[-1] + "."):
            kept.pop()
        kept.append(part)
    return "/".join(kept) or node.op_type


def _keras_layer(scope: str) -> str | None:
    parts = [p for p in scope.split(":")[0].split("/") if p]
    return parts[1] if len(parts) >= 3 else None  # model / layer / op (a shorter path is not a layer's)


def keras_name(node) -> str | None:
    """The Keras layer a tf2onnx node computes, from its name, else its weight's or output's scope (a node tf2onnx
    made, 'Conv__37', carries its layer in its weight or bias names); None where no scope names one."""
    for name in (node.name, *node.input[1:], *node.output[:1]):
        scopes = [s for s in (name or "").split(";") if s]
        compute = [s for s in scopes if s.split(":")[0].rsplit("/", 1)[-1].startswith(_TF_COMPUTE)]
        for scope in compute + scopes:
            layer = _keras_layer(scope)
            if layer:
                return layer
    return None


def keras_names(model) -> dict[str, str] | None:
    """Node name -> Keras layer for a tf2onnx file, read before simplification renames the constants that carry a
    generated node's scope; None for any other exporter's file."""
    if model.producer_name != "tf2onnx":
        return None
    return {n.name: layer for n in model.graph.node if n.name and (layer := keras_name(n))}


def layer_name(node, keras: dict[str, str] | None) -> str:
    """The readable name of the layer `node` computes (the builder shortens it to `MAX_CHARS` and makes it unique).
    `keras`: the file's `keras_names`; a node simplification made (a MatMul and Add fused into 'Gemm_0') is named
    from its own weights' scopes."""
    name = (keras.get(node.name) or keras_name(node)) if keras is not None else None
    return name or torch_name(node)

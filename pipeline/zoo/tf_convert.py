"""Run inside the TensorFlow environment (`make setup-tf`, `.venv-tf`), never imported by the pipeline: TensorFlow
stays out of the main install. Two commands, each writing files and printing nothing the caller parses:

    python tf_convert.py convert MODEL --onnx OUT.onnx --info OUT.json [--signature NAME]
    python tf_convert.py run MODEL --inputs X.npy --outputs Y.npy [--signature NAME]

MODEL is a Keras file (.keras, .h5), a SavedModel folder or a float .tflite. `convert` writes the model as ONNX by
tf2onnx with its input made channels-first, and what it found (format, versions, input) as JSON;
`run` runs the original model on channels-last float inputs, for the caller to check the conversion and the
input normalisation against. A bad input exits 2 with one line on stderr that the caller shows as it is.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up banner is not the user's business
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

OPSET = 17  # what tf2onnx 1.17 writes best and the importer reads (13..22)
BATCH = 256


class BadInput(Exception):
    """What the user gave is not something this converter can read; the message is the user's."""


def model_format(path: Path) -> str:
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "saved_model"
        raise BadInput(f"Model {str(path)!r} is a folder without saved_model.pb; expected a SavedModel folder")
    formats = {".keras": "keras", ".h5": "h5", ".hdf5": "h5", ".tflite": "tflite"}
    if path.suffix.lower() not in formats:
        raise BadInput(f"Model {str(path)!r}: expected .keras, .h5, a SavedModel folder or .tflite")
    return formats[path.suffix.lower()]


# ---- Keras ------------------------------------------------------------------------------------------------

class _DepthwiseConv2D(tf.keras.layers.DepthwiseConv2D):
    """Keras 2 wrote `groups` into a DepthwiseConv2D's config, which Keras 3 refuses (MLPerf Tiny's vww_96.h5)."""

    @classmethod
    def from_config(cls, config):
        config.pop("groups", None)
        return super().from_config(config)


def load_keras(path: Path):
    try:
        return tf.keras.models.load_model(str(path), compile=False,
                                          custom_objects={"DepthwiseConv2D": _DepthwiseConv2D})
    except Exception as exc:
        text = str(exc)
        custom = re.search(r"(?:Unknown layer|Could not locate class|Unknown object)[^'\"]*['\"]([\w.]+)['\"]", text)
        if custom:
            raise BadInput(f"Keras model {str(path)!r} uses the custom class {custom[1]!r}, which only its own code "
                           f"can rebuild: export it as a SavedModel (model.export(folder)) or to ONNX with "
                           f"that code loaded") from exc
        raise BadInput(f"Keras model {str(path)!r} does not load: {type(exc).__name__}: "
                       f"{text.splitlines()[0] if text else ''}") from exc


def keras_input(model) -> tuple[str, list]:
    if len(model.inputs) != 1:
        raise BadInput(f"Keras model has {len(model.inputs)} inputs; expected one image-like input")
    tensor = model.inputs[0]
    shape = list(tensor.shape)
    if len(shape) != 4:
        raise BadInput(f"Keras model's input has shape {shape}; expected (batch, height, width, channels)")
    return tensor.name.split(":")[0], shape[1:]


def _layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _layers(layer)  # a nested model's own layers


def _rows(kernel: np.ndarray, kind: str) -> np.ndarray:
    """A kernel as one row per output channel, the elements of each row in (H, W, I) order."""
    if kind == "depthwise":  # Keras H x W x C x M, output channel c * M + m
        return kernel.transpose(2, 3, 0, 1).reshape(-1, kernel.shape[0] * kernel.shape[1])
    if kernel.ndim == 2:  # Dense: in x out
        return kernel.T
    return np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1)  # Conv2D: H x W x I x O


def keras_kernels(model) -> list[tuple[str, np.ndarray, bool | None]]:
    """(layer name, kernel, is it depthwise) of each conv and dense layer of a Keras model."""
    found = []
    for layer in _layers(model):
        depthwise = isinstance(layer, tf.keras.layers.DepthwiseConv2D)  # its kernel: Keras 2 and 3 name it apart
        weight = getattr(layer, "depthwise_kernel", None) if depthwise else None
        weight = weight if weight is not None else getattr(layer, "kernel", None)
        if weight is not None and len(weight.shape) in (2, 4):
            found.append((layer.name, np.asarray(weight), depthwise))
    return found


def saved_kernels(function) -> list[tuple[str, np.ndarray, bool | None]]:
    """The same from a SavedModel's variables, named '<layer>/kernel:0' by Keras; depthwise or not unknown."""
    return [(v.name.split("/")[-2], v.numpy(), "depthwise" in v.name.split("/")[-1] or None) for v in function.variables
            if "/" in v.name and v.name.split("/")[-1].split(":")[0] in ("kernel", "depthwise_kernel")
            and len(v.shape) in (2, 4)]


def name_keras_layers(kernels: list[tuple[str, np.ndarray, bool | None]], onnx_model) -> int:
    """Name each ONNX Conv / MatMul / Gemm node 'keras/<layer>/<op>' after the Keras layer whose kernel it holds.

    tf2onnx names nodes by TensorFlow's scopes, which TensorFlow makes unique per trace ('conv2d_1' for the layer
    'conv2d'; 'StatefulPartitionedCall' in a SavedModel), so the scope is not the layer's name. The kernels match,
    up to a per-channel scale where the converter folded a BatchNorm into the conv: each output channel's
    direction is compared."""
    from onnx import numpy_helper

    candidates = []
    for name, kernel, depthwise in kernels:
        layouts = ["depthwise"] if depthwise else ["dense_or_conv"] + (["depthwise"] if depthwise is None and
                                                                      kernel.ndim == 4 else [])
        for layout in layouts:
            rows = _rows(kernel, layout)
            candidates.append((name, rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-12)))
    weights = {i.name: i for i in onnx_model.graph.initializer}
    named = 0
    for node in onnx_model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        rows = (np.moveaxis(w, 1, -1).reshape(w.shape[0], -1) if w.ndim == 4 else (w if transposed else w.T))
        rows = rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-12)
        # the median channel: a channel training left at zero has no direction to compare
        scores = [(float(np.median(np.abs((rows * k).sum(1)))), name) for name, k in candidates if k.shape == rows.shape]
        if scores and max(scores)[0] > 0.999:
            layer = max(scores)[1]
            node.name = f"keras/{layer}/{'MatMul' if w.ndim == 2 else 'Conv2D'}"
            users = [n for n in onnx_model.graph.node if node.input[1] in n.input]
            if len(users) == 1:  # the kernel's name too: a MatMul that simplification fuses into a Gemm keeps it
                weights[node.input[1]].name = node.input[1] = f"keras/{layer}/kernel"
            named += 1
    return named


# ---- SavedModel -------------------------------------------------------------------------------------------

def saved_signature(path: Path, signature: str | None):
    loaded = tf.saved_model.load(str(path))
    names = sorted(loaded.signatures.keys())
    if not names:
        raise BadInput(f"SavedModel {str(path)!r} has no signatures; expected one serving function")
    default = "serving_default"  # what TensorFlow Serving calls when not told (Keras's export writes it)
    if signature is None and len(names) > 1 and default not in names:
        raise BadInput(f"SavedModel {str(path)!r} has {len(names)} signatures ({', '.join(names)}): "
                       f"name one with SIGNATURE=")
    name = signature or (default if default in names else names[0])
    if name not in loaded.signatures:
        raise BadInput(f"SavedModel {str(path)!r} has no signature {name!r}; it has {', '.join(names)}")
    function = loaded.signatures[name]
    inputs = function.structured_input_signature[1]
    if len(inputs) != 1:
        raise BadInput(f"Signature {name!r} takes {len(inputs)} inputs ({', '.join(sorted(inputs))}); expected one")
    (key, spec), = inputs.items()
    outputs = sorted(function.structured_outputs)
    if len(outputs) != 1:
        raise BadInput(f"Signature {name!r} has {len(outputs)} outputs ({', '.join(outputs)}); expected one")
    if len(spec.shape) != 4:
        raise BadInput(f"Signature {name!r}'s input has shape {list(spec.shape)}; expected (batch, H, W, C)")
    return loaded, name, function, key, spec, outputs[0]


# ---- TFLite -----------------------------------------------------------------------------------------------

def tflite_input(path: Path) -> dict:
    """A float .tflite's input (the caller has checked it is float: `pipeline.zoo.tflite_file`)."""
    detail = tf.lite.Interpreter(model_path=str(path)).get_input_details()[0]
    return {"input": detail["name"], "shape": [int(d) for d in detail["shape"][1:]]}


def tflite_run(path: Path, x: np.ndarray) -> np.ndarray:
    interpreter = tf.lite.Interpreter(model_path=str(path))
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    batch = min(BATCH, len(x))
    interpreter.resize_tensor_input(source["index"], [batch, *x.shape[1:]])
    interpreter.allocate_tensors()
    outputs = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)]) if len(chunk) < batch else chunk
        interpreter.set_tensor(source["index"], padded.astype(np.float32))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(target["index"])[:len(chunk)].copy())
    return np.concatenate(outputs)


# ---- the commands -----------------------------------------------------------------------------------------

def convert(path: Path, onnx_path: Path, info_path: Path, signature: str | None) -> None:
    import tf2onnx  # only here: `run` does not need it

    kind = model_format(path)
    info = {"format": kind, "tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "opset": OPSET}
    if kind in ("keras", "h5"):
        model = load_keras(path)
        name, shape = keras_input(model)
        spec = (tf.TensorSpec((None, *shape), tf.float32, name=name),)
        onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET, inputs_as_nchw=[name])
        info["layers_named"] = name_keras_layers(keras_kernels(model), onnx_model)
        _save(onnx_model, onnx_path)
    elif kind == "saved_model":
        loaded, chosen, function, key, spec, output = saved_signature(path, signature)  # loaded: keeps the variables

        @tf.function(input_signature=[tf.TensorSpec((None, *spec.shape[1:]), tf.float32, name=key)])
        def serve(x):
            return function(**{key: x})[output]

        onnx_model, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=OPSET,
                                                      inputs_as_nchw=[key])
        info["layers_named"] = name_keras_layers(saved_kernels(function), onnx_model)
        _save(onnx_model, onnx_path)
        name, shape = key, [int(d) for d in spec.shape[1:]]
        info["signature"] = chosen
    else:
        found = tflite_input(path)
        name, shape = found["input"], found["shape"]
        tf2onnx.convert.from_tflite(str(path), inputs_as_nchw=[name], opset=OPSET, output_path=str(onnx_path))
    info.update(input=name, input_shape_hwc=[int(d) for d in shape])
    info_path.write_text(json.dumps(info, indent=1))


def _save(onnx_model, path: Path) -> None:
    import onnx

    onnx.save(onnx_model, str(path))


def run(path: Path, inputs: Path, outputs: Path, signature: str | None) -> None:
    x = np.load(inputs).astype(np.float32)
    kind = model_format(path)
    if kind in ("keras", "h5"):
        y = load_keras(path).predict(x, batch_size=BATCH, verbose=0)
    elif kind == "saved_model":
        loaded, _, function, key, _, output = saved_signature(path, signature)  # noqa: F841 (keeps the variables)
        y = np.concatenate([function(**{key: tf.constant(x[s:s + BATCH])})[output].numpy()
                            for s in range(0, len(x), BATCH)])
    else:
        y = tflite_run(path, x)
    np.save(outputs, np.asarray(y, dtype=np.float32).reshape(len(x), -1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    first = commands.add_parser("convert")
    first.add_argument("model", type=Path)
    first.add_argument("--onnx", type=Path, required=True)
    first.add_argument("--info", type=Path, required=True)
    first.add_argument("--signature")
    second = commands.add_parser("run")
    second.add_argument("model", type=Path)
    second.add_argument("--inputs", type=Path, required=True)
    second.add_argument("--outputs", type=Path, required=True)
    second.add_argument("--signature")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            convert(args.model, args.onnx, args.info, args.signature)
        else:
            run(args.model, args.inputs, args.outputs, args.signature)
    except BadInput as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A model that arrives as an ONNX file: read into torch (convs as nn.Conv2d), checked against ONNX Runtime on the
file, refused with one clear message when it cannot be read, and deployed from the file to both kinds of target."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import firmware_missing
from onnx_nets import KERAS, NETS, keras_onnx, make_onnx
from test_tflite import CASES
from torch import nn

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.onnx.run import run, session
from pipeline.zoo import load_model, onnx_ops
from pipeline.zoo.onnx_model import import_onnx

pytestmark = pytest.mark.runtime


def export(module: nn.Module, path, shape=(4, 16, 16), *, dynamic_spatial=False, opset=18):
    """The way a user exports: TorchScript's exporter, named input, batch dynamic."""
    torch.manual_seed(0)
    axes = {0: "n", 2: "h", 3: "w"} if dynamic_spatial else {0: "n"}
    torch.onnx.export(module.eval(), (torch.randn(1, *shape),), str(path), dynamo=False, opset_version=opset,
                      input_names=["image"], output_names=["scores"], dynamic_axes={"image": axes})
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_operator_case_reads_back_to_the_same_function_with_its_convs_as_conv2d(case, tmp_path):
    module = CASES[case][0]
    imported = import_onnx(export(module, tmp_path / "m.onnx"))
    assert imported.input_shape == (4, 16, 16) and imported.max_abs_diff < 1e-4
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(6, 4, 16, 16)).astype(np.float32))
    with torch.no_grad():
        assert torch.allclose(imported.module(x), module(x), atol=1e-4)  # any batch size, not only the check's
    expected = sum(isinstance(m, nn.Conv2d) for m in module.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in imported.module.modules()) == expected


def test_in_graph_normalisation_means_mean_0_std_1_and_a_graph_without_it_asks_for_them(tmp_path):
    inside = load_model(str(export(CASES["normalise_batchnorm"][0], tmp_path / "norm.onnx")))
    assert inside.mean == (0.0,) * 4 and inside.std == (1.0,) * 4 and inside.source["normalised_inside"]
    assert inside.weights == str(tmp_path / "norm.onnx") and len(inside.weights_sha256) == 64
    assert any(isinstance(m, nn.BatchNorm2d) for m in inside.module.modules())
    plain = export(CASES["global_mean"][0], tmp_path / "plain.onnx")
    with pytest.raises(InputError, match="does not say how its input is normalised: give MEAN= and STD="):
        load_model(str(plain))
    spec = load_model(str(plain), mean=0.5, std=0.25)
    assert spec.mean == (0.5,) * 4 and spec.num_classes == 3
    with pytest.raises(InputError, match="holds its own weights; WEIGHTS=other.pt is for PyTorch models"):
        load_model(str(plain), "other.pt", mean=0.5, std=0.25)


def test_a_file_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "notes.onnx").write_text("these are my notes, not a model\n")
    with pytest.raises(InputError, match=r"notes.onnx' is not a valid ONNX model"):
        load_model(str(tmp_path / "notes.onnx"), mean=0, std=1)
    with pytest.raises(InputError, match=r"missing.onnx' does not exist \(expected an ONNX file\)"):
        load_model(str(tmp_path / "missing.onnx"), mean=0, std=1)


def test_an_unsupported_operator_is_named_with_its_node_and_what_is_supported(tmp_path):
    path = export(nn.Sequential(nn.Conv2d(4, 4, 1), nn.Tanh(), nn.Conv2d(4, 4, 1), nn.ELU()), tmp_path / "m.onnx")
    with pytest.raises(InputError) as error:
        load_model(str(path), mean=0, std=1)
    message = str(error.value)
    assert "node '/1/Tanh' (Tanh) has an operator this importer does not convert (2 such nodes: Elu, Tanh)" in message
    assert "supported: Add, AveragePool, BatchNormalization, Clip, Concat, Conv," in message


def test_dynamic_height_and_width_need_input_shape(tmp_path):
    path = export(CASES["global_mean"][0], tmp_path / "m.onnx", dynamic_spatial=True)
    with pytest.raises(InputError, match=r"has dynamic input axes \(4x\?x\?\); give the shape of one sample with "
                                         r"INPUT_SHAPE=CxHxW"):
        load_model(str(path), mean=0, std=1)
    assert load_model(str(path), input_shape=(4, 24, 20), mean=0, std=1).input_shape == (4, 24, 20)
    with pytest.raises(InputError, match=r"takes C x H x W = \(4, None, None\); INPUT_SHAPE= gave \(3, 24, 20\)"):
        load_model(str(path), input_shape=(3, 24, 20), mean=0, std=1)


def test_a_channels_last_input_is_refused_with_the_tf2onnx_flag_that_fixes_it(tmp_path):
    """What tf2onnx writes without --inputs-as-nchw: NHWC in, a Transpose to NCHW first."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
                               helper.make_node("Conv", ["nchw", "w"], ["scores"])], "keras",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 8, 8, 3])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 4, 8, 8])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "nhwc.onnx"))
    with pytest.raises(InputError, match=r"takes its input channels-last .* convert it with tf2onnx's --inputs-as-nchw image"):
        load_model(str(tmp_path / "nhwc.onnx"), mean=0, std=1)


@pytest.mark.parametrize("opset", [9, 30])
def test_an_opset_the_importer_does_not_read_is_refused_naming_the_range(opset, tmp_path):
    model = onnx.load(str(export(CASES["conv_same"][0], tmp_path / "m.onnx")))
    model.opset_import[0].version = opset  # too old for its Pad/Clip inputs, or newer than this onnx knows
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(InputError, match=rf"uses ONNX opset {opset}; this importer reads opsets 11-22 \(re-export it"):
        load_model(str(tmp_path / "old.onnx"), mean=0, std=1)


def test_a_module_that_does_not_match_the_file_names_the_first_node_that_differs(tmp_path, monkeypatch):
    # an importer bug stood in for by a wrong table entry: a Sigmoid read as a ReLU
    monkeypatch.setitem(onnx_ops.IMPORTERS, "Sigmoid", lambda b, node: b.fn(torch.relu, b.value(node.input[0])))
    path = export(CASES["squeeze_excite"][0], tmp_path / "m.onnx")
    with pytest.raises(InputError, match=r"differs from ONNX Runtime on the file by .*; first differing node: "
                                         r"'/Sigmoid' \(Sigmoid\), output '/Sigmoid_output_0' differs by"):
        import_onnx(path)


def test_a_module_that_cannot_run_names_the_node_where_it_parts_from_the_file(tmp_path, monkeypatch):
    # an importer bug stood in for by a wrong table entry: a Flatten from the wrong axis, so the linear layer after
    # it raises in torch; the message names the node where the two part, the Flatten
    monkeypatch.setitem(onnx_ops.IMPORTERS, "Flatten", lambda b, node: b.fn(torch.flatten, b.value(node.input[0]), 2))
    path = export(CASES["maxpool_flatten_linear"][0], tmp_path / "m.onnx")
    with pytest.raises(InputError, match=r"converted, but the module does not run .*first differing node: "
                                         r"'/Flatten' \(Flatten\), output '/Flatten_output_0' differs by shape"):
        import_onnx(path)


def test_weights_listed_as_graph_inputs_are_not_taken_for_the_data(tmp_path):
    """Files from before IR version 4 list every initializer among the inputs, and not always after the data."""
    model = onnx.load(str(export(CASES["global_mean"][0], tmp_path / "m.onnx")))
    weights = [onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in model.graph.initializer]
    data = list(model.graph.input)
    del model.graph.input[:]
    model.graph.input.extend([*weights, *data])
    onnx.save(model, str(tmp_path / "old.onnx"))
    spec = load_model(str(tmp_path / "old.onnx"), mean=0, std=1)
    assert spec.input_shape == (4, 16, 16) and spec.source["max_abs_diff"] < 1e-4


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx_user")
    return {**{name: make_onnx(name, folder) for name in NETS}, "keras": keras_onnx(folder)}


# MobileNet and the Keras net normalise inside their graphs; the others take the data as (x - 0.5) / 0.25. On both cores most of these
# small layers cost more cycles factored than dense, so 0.9 of the MACs is what the allocation can reach.
NORMALISE = {"mobilenetv3": [], "keras": [], "squeezenet": ["--mean", "0.5", "--std", "0.25"],
             "shufflenet": ["--mean", "0.5", "--std", "0.25"]}
OPS = {"mobilenetv3": {"HARD_SWISH", "LOGISTIC", "MUL", "SUB"}, "squeezenet": {"CONCATENATION", "SOFTMAX"},
       "shufflenet": {"CONCATENATION", "TRANSPOSE", "STRIDED_SLICE"}, "keras": {"MUL", "ADD", "SOFTMAX"}}


# each net on one target, both targets covered twice: the import and the baseline are the same on either, and every
# operator of these nets is also tested alone on both runtimes (test_tflite.py, test_firmware.py)
@pytest.mark.slow
# (MobileNetV3 on the M7 took 620 s of CI with cold caches, timing each of its layers' candidates in the firmware)
@pytest.mark.parametrize("name,target", [("mobilenetv3", "rpi4"), ("squeezenet", "cortex-m7"), ("shufflenet", "rpi4"),
                                         ("keras", "cortex-m7")])
def test_a_user_onnx_file_deploys_with_a_budget_and_its_own_file_is_the_baseline(user_files, name, target, tmp_path):
    if target != "rpi4" and firmware_missing():
        pytest.skip(firmware_missing())
    path, data = user_files[name]
    before = path.read_bytes()
    out = tmp_path / "build"
    # factorisations only: these graphs' many channel groups would each be timed at every cut shape on the board
    # (MobileNetV3 on the M7: 25 minutes on 2 busy cores), and what is tested here is the import, not the cuts
    from targets import load_target

    board = load_target(target).name  # cortex-m7 names nucleo-h743zi
    text = (Path(__file__).resolve().parents[1] / "targets" / f"{board}.toml").read_text()
    text = text.replace(f'name = "{board}"', f'name = "{board}-factor"')
    factor_only = 'candidates = ["tucker2", "svd"]\n'
    text = text.replace("[decomposition]\n", "[decomposition]\n" + factor_only) if "[decomposition]" in text \
        else text + "\n[decomposition]\n" + factor_only
    profile = tmp_path / f"{board}-factor.toml"
    profile.write_text(text)
    code = main(["deploy", "--target", str(profile), "--model", str(path), "--data", str(data), "--eval-samples", "0",
                 "--budget", "0.9", *NORMALISE[name], "--out", str(out), "--quiet"])
    report = json.loads((out / "report.json").read_text())
    assert code == 0, report["failures"]
    assert path.read_bytes() == before
    source = report["model_source"]
    assert source["onnx"] == str(path) and source["max_abs_diff"] < 1e-4 and source["opset"] == (17 if name == "keras" else 18)
    variants = report["variants"]
    # the dense baseline is the user's own file in ONNX Runtime: its top-1 is the file's
    x, y = np.load(data)["x_test"], np.load(data)["y_test"]
    mean, std = (0.0, 1.0) if name in ("mobilenetv3", "keras") else (0.5, 0.25)
    file_top1 = float((run(session(path), ((x - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)).argmax(1) == y).mean())
    assert variants["dense_fp32"]["top1"] == pytest.approx(file_top1) and file_top1 > 0.9
    assert variants["factored_int8"]["macs"] <= 0.9 * variants["dense_fp32"]["macs"]
    assert variants["factored_int8"]["top1"] >= file_top1 - 0.05
    assert any("matches ONNX Runtime on the file" in note for note in report["notes"])
    if target == "cortex-m7":
        from pipeline.tflm.firmware import model_ops

        assert OPS[name] <= set(model_ops((out / "model.tflite").read_bytes()))
        assert report["device"]["passed"] and variants["factored_int8"]["board"]["cycles"] > 0


def test_converted_keras_layers_keep_their_keras_names_short_and_unique(tmp_path):
    def layers(module):
        return [n for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    # tf2onnx on a Keras model: the layer's scope, also for the depthwise conv tf2onnx named 'Conv__37' itself
    keras = import_onnx(KERAS)
    assert layers(keras.module) == ["conv2d_1", "depthwise_conv2d_1", "conv2d_1_2", "conv2d_2_1", "scores_1"]
    # tf2onnx on a .tflite: every op the converter fused into the conv, ';'-joined (183 characters on MLPerf
    # Tiny's ResNet-8); two convs of one scope and one of none
    model = onnx.load(str(export(nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)),
                                 tmp_path / "m.onnx")))
    model.producer_name = "tf2onnx"
    fused = ("model/activation_{i}/Relu;model/batch_normalization_{i}/FusedBatchNormV3;model/conv2d_{i}/BiasAdd;"
             "model/conv2d_{i}/Conv2D;model/batch_normalization_{i}/FusedBatchNormV3/ReadVariableOp")
    names = [fused.format(i=1), fused.format(i=1) + "1", "StatefulPartitionedCall_" * 4]  # node names are unique
    for node, name in zip([n for n in model.graph.node if n.op_type == "Conv"], names, strict=True):
        node.name = name
    onnx.save(model, str(tmp_path / "tflite.onnx"))
    got = layers(import_onnx(tmp_path / "tflite.onnx").module)
    assert got == ["conv2d_1", "conv2d_1_1", "StatefulPartitionedCall_StatefulPartitionedCall_"[:44]]
    assert all(len(n) <= 48 for n in got)


@pytest.mark.parametrize("per_channel", [False, True])
def test_weights_stored_int8_and_dequantized_when_run_import_as_their_float_values(per_channel, tmp_path):
    """A float .tflite with compressed weights (MLPerf Tiny's DS-CNN) converts to DequantizeLinear of constants."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (8, 3, 3, 3), dtype=np.int8)
    scale = rng.uniform(0.001, 0.01, 8 if per_channel else ()).astype(np.float32)
    zero = np.zeros(8 if per_channel else (), np.int8)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["w"], axis=0),
         helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["y"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])],
        "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zero, "zero")])
    path = tmp_path / "dq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    imported = import_onnx(path)
    conv = next(m for m in imported.module.modules() if isinstance(m, nn.Conv2d))
    expected = q.astype(np.float32) * (scale.reshape(-1, 1, 1, 1) if per_channel else scale)
    assert np.allclose(conv.weight.detach().numpy(), expected) and imported.max_abs_diff < 1e-5


def test_a_per_channel_add_after_a_conv_folds_into_its_bias_and_its_channels_can_be_cut(tmp_path):
    """tf2onnx leaves a Keras BatchNorm's shift as an Add of a (1, C, 1, 1) constant after the conv (MLPerf Tiny's
    ResNet-8): folded into the conv's bias, so a channel cut can follow it; a constant that is not one value per
    channel, or a conv output something else also reads, stays an Add."""
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.compress.prune import channel_groups, prune

    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(size=(8, 3, 3, 3)), "b1": rng.normal(size=8), "shift": rng.normal(size=(1, 8, 1, 1)),
               "w2": rng.normal(size=(8, 8, 3, 3)), "across": rng.normal(size=(1, 1, 1, 8))}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
         helper.make_node("Add", ["shift", "c1"], ["a1"]), helper.make_node("Relu", ["a1"], ["r1"]),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
         helper.make_node("Add", ["c2", "across"], ["a2"]), helper.make_node("Add", ["a2", "c2"], ["a3"]),
         helper.make_node("GlobalAveragePool", ["a3"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])],
        "shift", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    path = tmp_path / "shift.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    imported = import_onnx(path)  # checked against ONNX Runtime on the file as it imports
    first, second = (m for m in imported.module.modules() if isinstance(m, nn.Conv2d))
    assert np.allclose(first.bias.detach().numpy(), weights["b1"] + weights["shift"].reshape(8), atol=1e-6)
    assert second.bias is None  # its output is read twice, and the constant runs along the width
    adds = [n for n in imported.module.graph.nodes if n.target is torch.add]
    assert len(adds) == 2 and imported.max_abs_diff < 1e-4
    groups, _ = channel_groups(imported.module, (3, 8, 8), layers=("*",), exclude=(), last_layer=None)
    cut = next(g.name for g in groups if g.producers == (g.name,) and first is imported.module.get_submodule(g.name))
    pruned, _ = prune(imported.module, (3, 8, 8), {cut: 4})
    assert next(m for m in pruned.modules() if isinstance(m, nn.Conv2d)).out_channels == 4

"""Keras, SavedModel and TFLite files in: converted in the TensorFlow environment, checked against TensorFlow.

The models are built and trained in the test by tests/tf_models.py, run in `.venv-tf` (`make setup-tf`); without
that environment these tests skip, saying so."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from calib import preprocess
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.zoo import load_model
from pipeline.zoo.tensorflow_model import check_original, run_original, tf_python

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
KERAS_LAYERS = ["stem_conv", "b1_depthwise", "b1_expand", "b2_conv", "logits"]


def _tf_missing() -> str | None:
    try:
        tf_python()
    except InputError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    if _tf_missing():
        pytest.skip(_tf_missing())
    folder = tmp_path_factory.mktemp("tf_models")
    subprocess.run([str(tf_python()), str(HERE / "tf_models.py"), str(folder)], check=True, capture_output=True)
    return folder


def _layers(module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


@pytest.mark.parametrize("name", ["cnn.keras", "cnn.h5", "saved", "cnn.tflite"])
def test_every_tensorflow_format_reads_with_its_layer_names_and_computes_what_tensorflow_does(files, name):
    spec = load_model(str(files / name), mean=0, std=1)
    source = spec.source
    assert source["file"] == str(files / name) and source["format"] == {"cnn.keras": "keras", "cnn.h5": "h5",
                                                                         "saved": "saved_model", "cnn.tflite": "tflite"}[name]
    assert source["tensorflow"] == "2.21.0" and source["tf2onnx"] == "1.17.0" and len(source["sha256"]) == 64
    assert spec.weights_sha256 == source["sha256"] and Path(source["onnx"]).is_file()
    assert spec.input_shape == (3, 32, 32) and not source["normalised_inside"]
    if name != "cnn.tflite":  # a .tflite's converter fused every op into its conv: the scope of the conv names it
        assert _layers(spec.module) == KERAS_LAYERS
    x = preprocess(np.load(files / "stripes.npz")["x_test"][:32], mean=(0,) * 3, std=(1,) * 3)
    with torch.no_grad():
        ours = spec.module(torch.from_numpy(x)).numpy()
    theirs = run_original(_converted(source), x)
    assert np.abs(ours - theirs).max() < 1e-4 * np.abs(theirs).max()


def _converted(source):
    from pipeline.zoo.tensorflow_model import Converted

    return Converted(Path(source["file"]), None, {k: source[k] for k in ("format", "signature") if k in source},
                     source["sha256"])


def test_a_keras_file_deploys_its_dense_top1_the_files_own_and_the_build_keeps_the_conversion(files, tmp_path):
    out = tmp_path / "build"
    code = main(["deploy", "--target", "rpi4", "--model", str(files / "cnn.h5"), "--data", str(files / "stripes.npz"),
                 "--mean", "0", "--std", "1", "--budget", "none", "--method", "svd", "--rank", "0.9",
                 "--eval-samples", "0", "--out", str(out), "--quiet"])
    report = json.loads((out / "report.json").read_text())
    assert code == 0, report["failures"]
    source = report["model_source"]
    assert source["file"] == str(files / "cnn.h5") and source["format"] == "h5" and source["tensorflow"] == "2.21.0"
    assert (out / "baseline/converted.onnx").is_file()
    data = np.load(files / "stripes.npz")
    x = preprocess(data["x_test"], mean=(0,) * 3, std=(1,) * 3)
    file_top1 = float((run_original(_converted(source), x).argmax(1) == data["y_test"]).mean())
    assert report["variants"]["dense_fp32"]["top1"] == pytest.approx(file_top1) and file_top1 > 0.9
    note = next(n for n in report["notes"] if "the original h5 file in TensorFlow 2.21.0" in n)
    assert f"scores {file_top1:.2%} on the same 256 images" in note and "0 predictions differ" in note
    assert "b1_expand" in (out / "report.md").read_text()  # the plan names the Keras layers


def test_a_file_that_scales_inside_fed_the_wrong_range_fails_naming_the_normalisation(files):
    data = np.load(files / "stripes.npz")
    spec = load_model(str(files / "raw255.keras"))  # its Rescaling(1/255) is found: mean 0, std 1 by default
    assert spec.source["normalised_inside"] and spec.mean == (0.0,) * 3 and spec.std == (1.0,) * 3

    def check(std):
        x = preprocess(data["x_test"], mean=(0,) * 3, std=(std,) * 3)
        with torch.no_grad():
            logits = spec.module(torch.from_numpy(x)).numpy()
        return check_original(spec.source, x, data["y_test"], dense_logits=logits, mean=(0,) * 3, std=(std,) * 3,
                              normalised_inside=True)

    note, failure = check(1.0)  # 0..1 into a model that divides by 255 itself
    assert "0 predictions differ" in note
    assert failure and "about chance for 4 classes" in failure and "MEAN=0 STD=1 (the graph normalises" in failure
    note, failure = check(1 / 255)  # raw 0..255 pixels, as it was trained
    assert failure is None and "0 predictions differ" in note


def test_bad_tensorflow_inputs_are_one_line_each(files, monkeypatch, tmp_path):
    with pytest.raises(InputError, match=r"uses the custom class 'Swish2', which only its own code can rebuild"):
        load_model(str(files / "custom.keras"), mean=0, std=1)
    with pytest.raises(InputError, match=r"has 2 signatures \(logits, scores\): name one with SIGNATURE="):
        load_model(str(files / "two_signatures"), mean=0, std=1)
    assert load_model(str(files / "two_signatures"), mean=0, std=1, signature="scores").source["signature"] == "scores"
    with pytest.raises(InputError, match=r"has no signature 'serve'; it has logits, scores"):
        load_model(str(files / "two_signatures"), mean=0, std=1, signature="serve")
    with pytest.raises(InputError, match=r"mixes float operators \(1: FLOOR\) and integer ones \(3: CONV_2D, "
                                         r"FULLY_CONNECTED, MEAN\)"):
        load_model(str(files / "mixed.tflite"), mean=0, std=1)
    with pytest.raises(InputError, match=r"is a full-int8 TFLite file: it is measured as it is on a microcontroller target, not compressed"):
        load_model(str(files / "cnn_int8.tflite"), mean=0, std=1)
    with pytest.raises(InputError, match=r"does not exist \(expected .keras, .h5, a SavedModel folder or .tflite\)"):
        load_model(str(files / "absent.h5"), mean=0, std=1)
    monkeypatch.setenv("CNN_DEPLOY_TF_PYTHON", str(files / "no-python"))
    monkeypatch.setenv("CNN_DEPLOY_CACHE", str(tmp_path))  # not converted before: TensorFlow is needed
    with pytest.raises(InputError, match=r"TensorFlow in its own environment, and there is none at "
                                         r"CNN_DEPLOY_TF_PYTHON=.*no-python: run `make setup-tf`"):
        load_model(str(files / "cnn.keras"), mean=0, std=1)


def test_mlperf_tinys_float_files_read_with_their_layer_names():
    """Two things real files carry: Keras 2's `groups` in a DepthwiseConv2D's config (vww_96.h5), and weights stored
    int8 in a float .tflite (kws_ref_model_float32.tflite)."""
    from pipeline.bench.mlperf import mlperf_dir

    if _tf_missing() or not (mlperf_dir() / "vww_96.h5").is_file():
        pytest.skip(_tf_missing() or f"MLPerf Tiny's files are not in {mlperf_dir()}")
    vww = load_model(str(mlperf_dir() / "vww_96.h5"), mean=0, std=1)
    kws = load_model(str(mlperf_dir() / "kws_ref_model_float32.tflite"), mean=0, std=1)
    assert vww.input_shape == (3, 96, 96) and _layers(vww.module)[:3] == ["conv2d", "depthwise_conv2d", "conv2d_1"]
    assert kws.input_shape == (1, 49, 10) and _layers(kws.module)[-1] == "dense" and len(_layers(kws.module)) == 10

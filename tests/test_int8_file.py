"""A full-int8 .tflite measured as it is: `deploy --model model_int8.tflite` on a microcontroller target, and
`regress` on the build it writes. The file is one this tool wrote (seednet's), so every figure has a value to
equal; and MLPerf Tiny's own reference file where ../shared has it."""

import json
from pathlib import Path

import flatbuffers
import pytest
from ai_edge_litert import schema_py_generated as tfl
from helpers import NO_BUDGET, SEEDNET, firmware_missing

from pipeline.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.firmware]
SEEDNET_NORMALISATION = ["--mean", "0.5", "--std", "0.5"]
MLPERF = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "mlperf-tiny"


@pytest.fixture(scope="module")
def written(tmp_path_factory, cifar_dir):
    """seednet deployed to the Cortex-M4 without compression: its model.tflite and report."""
    if firmware_missing():
        pytest.skip(firmware_missing())
    out = tmp_path_factory.mktemp("int8_source") / "build"
    assert main(["deploy", *SEEDNET, *NO_BUDGET, "--target", "cortex-m4", "--data", str(cifar_dir),
                 "--eval-samples", "100", "--out", str(out), "--quiet"]) in (0, 1)
    return out / "model.tflite", json.loads((out / "report.json").read_text())


def test_an_int8_file_is_measured_as_it_is_with_the_figures_its_own_deploy_gave_and_regresses(written, tmp_path,
                                                                                              cifar_dir):
    tflite, source = written
    out = tmp_path / "given"
    assert main(["deploy", "--target", "cortex-m4", "--model", str(tflite), *SEEDNET_NORMALISATION, "--data",
                 str(cifar_dir), "--eval-samples", "100", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["variants"]) == ["given_int8"] and report["passed"]
    given, factored = report["variants"]["given_int8"], source["variants"]["factored_int8"]
    # the same file on the same images: TFLM's top-1, flash and arena as the deploy that wrote it measured them
    assert given["top1"] == factored["top1"]
    for key in ("flash_bytes", "arena_bytes", "litert_top1"):
        assert given["details"][key] == factored["details"][key], key
    firmware = given["details"]["firmware"]
    assert firmware["bit_exact"] and firmware["benchmark"]["protocol"]["bit_exact"]
    assert firmware["instructions"] == factored["details"]["firmware"]["instructions"]
    assert given["latency_source"] == "estimated" and given["board"]["cycles"] > 0
    assert "its float weights, which factorisation and channel cuts work on, are gone" in report["decomposition"]["why"]
    assert report["model_source"] == {"file": str(tflite), "sha256": report["model_source"]["sha256"],
                                      "format": "tflite", "precision": "int8"}
    assert (out / "model.tflite").read_bytes() == tflite.read_bytes()
    assert "PASSED: given_int8 measured as it is on 100 images" in (out / "report.md").read_text()
    assert main(["regress", "--target", "cortex-m4", "--out", str(out), "--device", "qemu", "--eval-samples",
                 "10"]) == 0
    regress = json.loads((out / "regress.json").read_text())
    assert regress["reference"] == "model.tflite (host TFLM)" and regress["agreement"] == 1.0
    assert regress["board"]["host_tflm_outputs_differing"] == 0


def _with_operator(data: bytes, builtin: int) -> bytes:
    """The file with its first operator code replaced: an operator the firmware does not register."""
    model = tfl.ModelT.InitFromPackedBuf(data, 0)
    model.operatorCodes[0].builtinCode, model.operatorCodes[0].deprecatedBuiltinCode = builtin, 127
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_an_int8_file_is_refused_where_it_cannot_run_or_says_too_little(written, tmp_path, cifar_dir, capsys):
    tflite, _ = written
    cases = [
        (["--target", "rpi4", "--model", str(tflite), *SEEDNET_NORMALISATION],
         "is a full-int8 TFLite file, which runs on microcontroller targets (TFLite Micro); rpi4 runs ONNX Runtime: "
         "give the float model instead"),
        (["--target", "cortex-m4", "--model", str(tflite)], "does not say how its input is normalised: give MEAN= and "
                                                             "STD= (a file taking raw 0..255 pixels: MEAN=0 STD=0.0039"),
    ]
    patched = tmp_path / "cumsum.tflite"
    patched.write_bytes(_with_operator(tflite.read_bytes(), tfl.BuiltinOperator.CUMSUM))
    cases.append((["--target", "cortex-m4", "--model", str(patched), *SEEDNET_NORMALISATION],
                  "uses operators the firmware does not register: CUMSUM; it knows"))
    for argv, words in cases:
        out = tmp_path / "refused"
        assert main(["deploy", *argv, "--data", str(cifar_dir), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1 and not out.exists(), err


def test_mlperf_tinys_own_int8_resnet8_is_measured_on_its_reference_board(tmp_path, cifar_dir):
    """The benchmark's submitted file (old opcodes: `deprecated_builtin_code`), raw 0..255 pixels as it takes them."""
    path = MLPERF / "pretrainedResnet_quant.tflite"
    if firmware_missing() or not path.is_file():
        pytest.skip(firmware_missing() or f"{path} is not here")
    out = tmp_path / "mlperf"
    assert main(["deploy", "--target", "nucleo-l4r5zi", "--model", str(path), "--mean", "0", "--std",
                 "0.00392156862745098", "--data", str(cifar_dir), "--eval-samples", "100", "--out", str(out),
                 "--quiet"]) == 0
    given = json.loads((out / "report.json").read_text())["variants"]["given_int8"]
    assert (given["macs"], given["details"]["flash_bytes"], given["details"]["arena_bytes"]) == (12_501_632, 98_496,
                                                                                                 55_984)
    assert given["top1"] >= 0.8 and given["details"]["firmware"]["bit_exact"]
    assert 265 < given["board"]["ms"] < 275  # the cycle engine's estimate at 120 MHz (TFLM reference: 704 ms, v0.5)
    assert (out / "firmware" / "board.hex").is_file()  # the reference board's image, to flash


def test_the_models_own_int8_file_is_the_dense_baseline_of_a_deploy(written, tmp_path, cifar_dir, capsys):
    tflite, source = written
    given = tflite.parent / "baseline" / "dense.int8.tflite"  # seednet's dense int8, as a user's own file would be
    out = tmp_path / "with-baseline"
    assert main(["deploy", *SEEDNET, *NO_BUDGET, "--target", "cortex-m4", "--data", str(cifar_dir), "--eval-samples",
                 "100", "--baseline", str(given), "--out", str(out), "--quiet"]) in (0, 1)
    report = json.loads((out / "report.json").read_text())
    dense = report["variants"]["dense_int8"]
    assert dense["top1"] == source["variants"]["dense_int8"]["top1"] and "ort_int8_top1" not in dense["details"]
    assert dense["details"]["firmware"]["bit_exact"]
    assert (out / "baseline" / "dense.int8.tflite").read_bytes() == given.read_bytes()
    assert any(n.startswith(f"dense_int8: the given int8 file {given}") for n in report["notes"])
    for argv, words in ((["--target", "rpi4", "--baseline", str(given)], "runs ONNX Runtime"),
                        (["--target", "cortex-m4", "--baseline", str(tflite.parent / "report.json")],
                         "expected the model's own full-int8 .tflite")):
        assert main(["deploy", *SEEDNET, *argv, "--data", str(cifar_dir), "--out", str(tmp_path / "no"), "--quiet"]) == 2
        assert words in capsys.readouterr().err

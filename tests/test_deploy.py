"""A whole deploy of seednet to rpi4 on a small evaluation subset, and what it leaves behind."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from helpers import NO_BUDGET, SEEDNET

from pipeline.cli import main
from pipeline.onnx.run import run, session

pytestmark = pytest.mark.slow
VARIANT_KEYS = {"macs", "params", "bytes", "peak_activation_bytes", "top1", "agreement", "latency_ms", "runtime"}


@pytest.fixture(scope="module")
def build(tmp_path_factory, cifar_dir):
    out = tmp_path_factory.mktemp("deploy") / "rpi4"
    code = main(["deploy", *SEEDNET, *NO_BUDGET, "--target", "rpi4", "--data", str(cifar_dir), "--eval-samples", "200", "--out", str(out),
                 "--quiet"])
    return out, code


def test_deploy_writes_the_contracted_report(build):
    out, code = build
    report = json.loads((out / "report.json").read_text())
    assert code == (0 if report["passed"] else 1)
    assert {"target", "model", "variants", "decomposition", "eval_samples", "thresholds", "passed"} <= set(report)
    assert report["target"] == "rpi4" and report["model"] == "seednet" and report["eval_samples"] == 200
    assert set(report["variants"]) == {"dense_fp32", "dense_int8", "factored_fp32", "factored_int8"}
    for variant in report["variants"].values():
        assert VARIANT_KEYS <= set(variant)
        assert 0 <= variant["top1"] <= 1 and 0 <= variant["agreement"] <= 1
    dense = report["variants"]["dense_fp32"]
    assert dense["macs"] == 651_720 and dense["params"] == 62_006 and dense["agreement"] == 1.0
    assert report["variants"]["dense_int8"]["bytes"] < dense["bytes"] / 3
    assert "## Per-class accuracy" in (out / "report.md").read_text()
    assert (out / "top1_vs_macs.png").read_bytes()[:4] == b"\x89PNG"


def test_manifest_hashes_match_the_files(build):
    out, _ = build
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"model.int8.onnx", "model.int8.ort", "model.fp32.onnx", "required_operators_and_types.config",
            "baseline/dense.int8.onnx"} <= set(manifest["artefacts"])
    assert {"report.json", "report.md", "top1_vs_macs.png"} == set(manifest["reports"])
    for name, entry in {**manifest["artefacts"], **manifest["reports"]}.items():
        data = (out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    assert len(manifest["checkpoint"]["sha256"]) == 64
    assert manifest["target_profile"]["quantization"]["reduce_range"] is False
    assert manifest["packages"]["onnxruntime"]
    assert not list(out.parent.glob(".rpi4.*")), "staging folders left behind"


def test_emitted_ort_model_agrees_with_the_int8_onnx(build):
    out, _ = build
    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    assert np.array_equal(run(session(out / "model.int8.ort"), x), run(session(out / "model.int8.onnx"), x))


def test_missed_threshold_exits_nonzero_marks_failed_and_keeps_artefacts(tmp_path, cifar_dir, capsys):
    out = tmp_path / "bad"
    code = main(["deploy", *SEEDNET, "--data", str(cifar_dir), "--eval-samples", "100", "--out", str(out), "--quiet",
                 "--method", "svd", "--rank", "1"])
    assert code == 1
    assert "FAILED" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert (out / "model.int8.onnx").is_file()


def test_the_rpi4_report_gives_the_boards_estimated_cycles_and_names_host_time(build):
    from pipeline.cycles.tools import missing

    if missing("qemu-aarch64", "llvm-mca", "gcc"):
        pytest.skip(missing("qemu-aarch64", "llvm-mca", "gcc"))
    out, _ = build
    report = json.loads((out / "report.json").read_text())
    for variant in report["variants"].values():
        board = variant["board"]
        assert board["core"] == "cortex-a72" and board["clock_mhz"] == 1500 and board["cycles"] > 100_000
        assert variant["latency_ms"] == board["ms"] == round(board["cycles"] / 1.5e6, 4)
        assert variant["latency_source"] == "estimated" and variant["latency_on"] == "estimated for the cortex-a72 at 1500 MHz"
        assert variant["host_latency_ms"] > 0 and board["unmodelled_share"] < 0.01
        assert board["instructions"] > board["cycles"] / 2  # the A72 retires up to three a cycle
    text = (out / "report.md").read_text()
    assert "on the board: cortex-a72 at 1500 MHz" in text and "| host ms |" in text and "llvm-mca" in text


def test_without_the_cycle_tools_a_deploy_completes_and_says_what_is_missing(tmp_path, cifar_dir, monkeypatch):
    real = shutil.which
    monkeypatch.setattr("pipeline.cycles.tools.shutil.which", lambda tool: None if tool.startswith("llvm") else real(tool))
    out = tmp_path / "rpi4"
    assert main(["deploy", *SEEDNET, *NO_BUDGET, "--target", "rpi4", "--data", str(cifar_dir), "--eval-samples", "50", "--out", str(out),
                 "--quiet"]) in (0, 1)
    report = json.loads((out / "report.json").read_text())
    assert any("board cycles not estimated" in n and "apt-get install -y llvm" in n for n in report["notes"])
    for variant in report["variants"].values():
        assert variant["board"] is None and variant["latency_source"] == "host"
        assert variant["latency_on"].startswith("this host")
        assert variant["latency_ms"] == variant["host_latency_ms"]
    assert "(host)" in (out / "report.md").read_text()

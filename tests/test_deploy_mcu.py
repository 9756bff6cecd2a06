"""A whole deploy of seednet to a microcontroller target, and a budget it cannot meet."""

import json

import pytest
from helpers import NO_BUDGET, SEEDNET

from pipeline.cli import main
from targets import TARGETS_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def build(tmp_path_factory, cifar_dir):
    out = tmp_path_factory.mktemp("mcu") / "cortex-m4"
    code = main(["deploy", *SEEDNET, *NO_BUDGET, "--target", "cortex-m4", "--data", str(cifar_dir), "--eval-samples", "200",
                 "--out", str(out), "--quiet"])
    return out, code


def test_cortex_m4_deploy_writes_firmware_files_and_the_same_report_keys(build):
    out, code = build
    report = json.loads((out / "report.json").read_text())
    assert code == (0 if report["passed"] else 1)
    for name in ("model.tflite", "model_data.cc", "model_data.h", "model_settings.h", "manifest.json", "report.md"):
        assert (out / name).is_file(), name
    assert report["target"] == "nucleo-l4r5zi" and report["eval_samples"] == 200  # what the old name stands for
    int8 = report["variants"]["factored_int8"]
    assert int8["runtime"].startswith("tflite-micro") and report["variants"]["factored_fp32"]["runtime"].startswith("onnxruntime")
    assert int8["bytes"] == (out / "model.tflite").stat().st_size
    details = int8["details"]
    assert details["ort_agreement"] >= 0.97 and details["max_output_diff_steps"] <= 16
    assert abs(details["litert_top1"] - int8["top1"]) <= 0.02
    assert details["arena_bytes"] - 16 <= details["smallest_arena_bytes"] <= details["arena_bytes"] + 16
    settings = (out / "model_settings.h").read_text()
    assert f"kTensorArenaSize = {-(-int(details['arena_bytes'] * 1.1) // 16) * 16}" in settings
    manifest = json.loads((out / "manifest.json").read_text())
    assert "model.tflite" in manifest["artefacts"] and manifest["target_profile"]["runtime"] == "tflite-micro"
    device = report["device"]  # the profile runs the TFLM device check as the deploy's last stage
    # on EVAL_SAMPLES's images, so `make regress EVAL_SAMPLES=200` compares with the baseline it recorded
    assert device["device"] == "tflm" and device["eval_samples"] == 200
    assert manifest["settings"]["device_samples"] == 200
    assert device["baseline"]["status"].startswith("recorded") and (out / "device_baseline" / "tflm.npz").is_file()


def test_the_mcu_report_gives_board_cycles_per_variant_and_operator(build):
    from pipeline.cycles.tools import missing

    if missing("llvm-mca", "gcc", "qemu-system-arm"):
        pytest.skip(missing("llvm-mca", "gcc", "qemu-system-arm"))
    out, _ = build
    report = json.loads((out / "report.json").read_text())
    for name in ("dense_int8", "factored_int8"):
        variant = report["variants"][name]
        board, firmware = variant["board"], variant["details"]["firmware"]
        assert board["core"] == "cortex-m4" and board["clock_mhz"] == 120 and board["unmodelled_share"] < 0.01
        # the plugin counts what the firmware's own clock counts, give or take the marks around it
        assert abs(board["instructions"] - firmware["instructions"]) <= 100
        assert board["cycles_range"][0] == board["cycles"] == board["cycles_range"][1]
        assert variant["latency_ms"] == board["ms"] == round(board["cycles"] / 120e3, 4)
        ops = board["operators"]
        assert [op["op"] for op in ops] == [layer["op"] for layer in firmware["layers"]]
        convs = [op for op in ops if op["op"] == "CONV_2D"]
        assert convs and all(op["macs"] > 0 and op["kernel"] for op in convs)
        assert sum(op["macs"] for op in ops) == variant["macs"]  # the graph's MACs, operator by operator
        assert 0.9 * board["cycles"] <= sum(op["cycles"] for op in ops) <= board["cycles"]
    for name in ("dense_fp32", "factored_fp32"):  # TFLM runs int8 only: the fp32 figures are the host's, and say so
        variant = report["variants"][name]
        assert variant["board"] is None and variant["latency_source"] == "host"
        assert variant["latency_on"].startswith("this host")
    text = (out / "report.md").read_text()
    assert "on the board: cortex-m4 at 120 MHz" in text and "| est. cycles | cycles/MAC | share |" in text
    assert "| CONV_2D 5x5 " in text  # seednet's convolutions, by kernel


def test_a_failed_device_check_fails_the_deploy(tmp_path, cifar_dir, capsys):
    strict = tmp_path / "strict-board.toml"
    text = (TARGETS_DIR / "nrf52840.toml").read_text().replace('name = "nrf52840"', 'name = "strict-board"')
    strict.write_text(text + "\n[thresholds]\nmin_agreement = 0.999\n\n[device]\nsamples = 100\n")
    out = tmp_path / "out"
    assert main(["deploy", *SEEDNET, *NO_BUDGET, "--target", str(strict), "--data", str(cifar_dir), "--eval-samples", "100",
                 "--out", str(out), "--quiet"]) == 1
    assert "device check on tflm: agreement with dense_fp32" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert not report["passed"] and not report["device"]["passed"]


def test_a_budget_the_model_cannot_meet_fails_with_the_figures(tmp_path, cifar_dir, capsys):
    text = (TARGETS_DIR / "nrf52840.toml").read_text()
    tiny = tmp_path / "tiny-board.toml"
    tiny.write_text(text.replace("ram_bytes = 262144", "ram_bytes = 70000").replace('name = "nrf52840"', 'name = "tiny-board"'))
    out = tmp_path / "out"
    assert main(["deploy", *SEEDNET, *NO_BUDGET, "--target", str(tiny), "--data", str(cifar_dir), "--eval-samples", "50",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "does not fit target 'tiny-board'" in err and "are free (70,000 RAM - 65,536 reserved)" in err
    assert "biggest tensors:" in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))

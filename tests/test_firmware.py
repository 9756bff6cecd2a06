"""Firmware: TFLM + CMSIS-NN built by arm-none-eabi and run on the emulated Cortex-M must compute exactly
what the host TFLM interpreter computes, and report deterministic instruction counts."""

import json
import subprocess
import threading

import numpy as np
import pytest
from helpers import NO_BUDGET, SEEDNET
from test_tflite import CASES, quantized

from pipeline.cli import main
from pipeline.errors import DeviceError
from pipeline.tflm import interpreter as tflm
from pipeline.tflm.build import check_toolchain, sources_root
from pipeline.tflm.convert import convert_to_tflite
from pipeline.tflm.emulator import free_port, run_firmware
from pipeline.tflm.firmware import arena_with_margin, model_sources
from pipeline.tflm.on_board import measure_on_board
from pipeline.util import sha256_file

pytestmark = pytest.mark.firmware


@pytest.fixture(scope="module")
def sources():
    try:
        check_toolchain()
        return sources_root()
    except DeviceError as exc:
        pytest.skip(str(exc))


def firmware_model(case, tmp_path):
    q_onnx, x = quantized(CASES[case][0], tmp_path)
    tflite = convert_to_tflite(q_onnx, tmp_path / "m.tflite")
    data = tflite.read_bytes()
    q = tflm.io_quant(data)
    model_sources(tmp_path, data, arena_bytes=arena_with_margin(tflm.arena_bytes(data), 0.1),
                  io={"input_scale": q.input_scale, "input_zero_point": q.input_zero_point,
                      "output_scale": q.output_scale, "output_zero_point": q.output_zero_point})
    return tflite, x


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_operator_on_the_emulated_m4_equals_the_host_interpreter_bit_for_bit(case, sources, tmp_path):
    tflite, x = firmware_model(case, tmp_path)
    figures = measure_on_board(tflite, tmp_path, tmp_path / "fw.elf", cpu="cortex-m4", root=sources, x_nchw=x[:4],
                               log=lambda *_: None)
    assert figures["bit_exact"] and figures["outputs_differing"] == 0 and figures["samples"] == 4
    assert figures["instructions"] > 0 and len(figures["layers"]) >= len(CASES[case][1]) - 1
    assert figures["flash_model_bytes"] == tflite.stat().st_size
    assert figures["flash_runtime_bytes"] + figures["flash_model_bytes"] == figures["flash_bytes"]
    assert 0 < figures["arena_used_bytes"] <= figures["ram_bytes"] and 0 < figures["stack_used_bytes"] < 65536


def test_instruction_counts_are_deterministic_and_the_layers_add_up(sources, tmp_path):
    tflite, x = firmware_model("global_mean", tmp_path)
    measure_on_board(tflite, tmp_path, tmp_path / "fw.elf", cpu="cortex-m7", root=sources, x_nchw=x[:2],
                     log=lambda *_: None)
    x_int8 = tflm.quantize_input(x[:3], tflm.io_quant(tflite.read_bytes()))
    first, second = (run_firmware(tmp_path / "fw.elf", x_int8, cpu="cortex-m7") for _ in range(2))
    assert first.instructions == second.instructions and np.array_equal(first.outputs, second.outputs)
    steady = first.instructions[1]
    assert 0.95 * steady <= sum(n for _, n in first.layers) <= first.instructions[0]  # the rest: interpreter overhead
    assert [op for op, _ in first.layers] == ["CONV_2D", "AVERAGE_POOL_2D", "RESHAPE", "FULLY_CONNECTED"]


def test_board_cycles_are_deterministic_and_differ_between_the_m4_and_m7_models(sources, tmp_path):
    tflite, x = firmware_model("conv_same", tmp_path)
    figures = {cpu: [measure_on_board(tflite, tmp_path, tmp_path / f"{cpu}.elf", cpu=cpu, root=sources, x_nchw=x[:3],
                                      clock_mhz=100.0, log=lambda *_: None)["board"] for _ in range(2)]
               for cpu in ("cortex-m4", "cortex-m7")}
    for cpu, (first, second) in figures.items():
        assert first == second and first["core"] == cpu and first["cycles"] > 0
        assert first["ms"] == round(first["cycles"] / 1e5, 4) and first["operators"][0]["op"] == "CONV_2D"
    assert figures["cortex-m4"][0]["cycles"] != figures["cortex-m7"][0]["cycles"]


def test_the_same_model_links_to_the_same_bytes(sources, tmp_path):
    tflite, _ = firmware_model("conv_same", tmp_path)
    from pipeline.tflm.build import build_library, link_firmware

    library = build_library("cortex-m4", sources, log=lambda *_: None)
    a = link_firmware(tmp_path, tmp_path / "a.elf", cpu_name="cortex-m4", root=sources, library=library)
    b = link_firmware(tmp_path, tmp_path / "b.elf", cpu_name="cortex-m4", root=sources, library=library)
    assert a.elf.read_bytes() == b.elf.read_bytes()
    assert a.map.read_text().replace("a.elf", "b.elf") == b.map.read_text()


@pytest.mark.slow
def test_a_microcontroller_deploy_runs_its_firmware_and_regress_runs_it_on_the_board(sources, tmp_path, cifar_dir,
                                                                                     capsys):
    out = tmp_path / "m4"
    assert main(["deploy", *SEEDNET, *NO_BUDGET, "--target", "cortex-m4", "--data", str(cifar_dir), "--eval-samples", "100",
                 "--out", str(out), "--quiet"]) in (0, 1)
    report = json.loads((out / "report.json").read_text())
    for name in ("dense_int8", "factored_int8"):
        figures = report["variants"][name]["details"]["firmware"]
        assert figures["bit_exact"] and figures["cpu"] == "cortex-m4" and figures["instructions"] > 100_000
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("firmware/measure.elf", "firmware/measure.map", "firmware/build.sh", "firmware/main.cc",
                 "firmware/model_data.cc", "baseline/dense.measure.elf", "firmware/firmware.elf",
                 "firmware/run-emulated.sh", "firmware/board.elf", "firmware/board.bin", "firmware/board.hex"):
        assert name in manifest["artefacts"], name
    benchmark = report["variants"]["factored_int8"]["details"]["firmware"]["benchmark"]
    assert benchmark["protocol"]["bit_exact"] and benchmark["protocol"]["samples"] == 20
    assert benchmark["board"]["name"] == "nucleo-l4r5zi" and benchmark["board"]["vector_table"] == "0x8000000"
    assert benchmark["board"]["ram_bytes"] <= benchmark["board"]["ram_capacity_bytes"] == 655360
    text = (out / "report.md").read_text()
    assert "on the board: cortex-m4 at 120 MHz" in text and "Cycles are estimated" in text
    capsys.readouterr()
    assert main(["regress", "--target", "cortex-m4", "--device", "qemu", "--eval-samples", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "instructions per inference" in printed and "bit for bit with the host TFLM interpreter: 30 of 30" in printed
    assert "MLPerf Tiny serial protocol" in printed
    assert (out / "device_baseline" / "qemu-cortex-m4.npz").is_file()
    # the emulated board as a user starts it by hand, killed mid-run: a clear error, and no baseline is written
    port = free_port()
    emulator = subprocess.Popen([str(out / "firmware" / "run-emulated.sh"), str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    threading.Timer(3.0, emulator.kill).start()
    assert main(["regress", "--target", "cortex-m4", "--device", f"socket://127.0.0.1:{port}", "--eval-samples", "30",
                 "--out", str(out)]) != 0
    assert "socket://127.0.0.1" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "device_baseline").iterdir()) == ["qemu-cortex-m4.npz", "tflm.npz"]
    assert main(["regress", "--target", "cortex-m4", "--device", "qemu", "--eval-samples", "30", "--out", str(out)]) == 0
    # a perturbed weight, relinked: the board's outputs no longer match the accepted baseline
    model = bytearray((out / "model.tflite").read_bytes())
    model[len(model) // 2] ^= 0x40
    (out / "model.tflite").write_bytes(bytes(model))
    details = report["variants"]["factored_int8"]["details"]
    model_sources(out, bytes(model), arena_bytes=arena_with_margin(details["arena_bytes"], 0.1),
                  io={f"{side}_{key}": details[f"{side}_quantization"][key] for side in ("input", "output")
                      for key in ("scale", "zero_point")})
    assert main(["firmware", "--target", "cortex-m4", "--out", str(out), "--samples", "5"]) in (0, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m4"]  # assembled beside the build, swapped in whole
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artefacts"]["model_data.cc"]["sha256"] == sha256_file(out / "model_data.cc")
    capsys.readouterr()
    assert main(["regress", "--target", "cortex-m4", "--device", "qemu", "--eval-samples", "30", "--out", str(out)]) == 1
    assert "artefact changed" in capsys.readouterr().out
    # the heavier dense model relinked in its place: the gate on estimated cycles fails before anything else
    dense = report["variants"]["dense_int8"]
    assert dense["board"]["cycles"] > report["variants"]["factored_int8"]["board"]["cycles"] * 1.005
    data = (out / "baseline" / "dense.int8.tflite").read_bytes()
    (out / "model.tflite").write_bytes(data)
    model_sources(out, data, arena_bytes=dense["details"]["firmware"]["arena_bytes"],
                  io={f"{side}_{key}": dense["details"][f"{side}_quantization"][key] for side in ("input", "output")
                      for key in ("scale", "zero_point")})
    assert main(["firmware", "--target", "cortex-m4", "--out", str(out), "--samples", "5"]) in (0, 1)
    capsys.readouterr()
    assert main(["regress", "--target", "cortex-m4", "--device", "qemu", "--eval-samples", "30", "--out", str(out)]) == 1
    regress = json.loads((out / "regress.json").read_text())
    assert regress["baseline"]["status"].startswith(f"SLOWER: {regress['board']['cycles']:,} estimated cycles per inference")


@pytest.mark.cycles
def test_a_cycle_budget_on_a_microcontroller_counts_estimated_cycles_on_the_board(sources, tmp_path, monkeypatch):
    import torch
    from torch import nn

    from calib import Dataset
    from pipeline.compress.stage import compress
    from pipeline.tflm.layer_cost import FirmwareLayerCycles
    from pipeline.zoo import ModelSpec
    from targets import load_target

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(32, 10)).eval()
    spec = ModelSpec("tiny", net, (3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    rng = np.random.default_rng(0)
    data = Dataset(rng.integers(0, 256, (400, 16, 16, 3), dtype=np.uint8), np.arange(400) % 10, "random")
    profile = load_target("cortex-m4").override(
        decomposition={"budget": "cycles:0.7", "fit_samples": 64, "sensitivity_samples": 32},
        finetune={"heldout_samples": 100})
    cost = FirmwareLayerCycles(profile.quantization, cpu="cortex-m4", root=sources, log=lambda *_: None)
    result = compress(spec, data, settings=profile.decomposition, tuning=profile.finetune, layer_cost=cost,
                      progress=False, log=lambda *_: None)
    allocation = result.allocation
    # a microcontroller keeps the arena at most the dense model's unless the budget bounds it (arena_never_grows)
    assert allocation["budget"] == "cycles:0.7,arena:1" and allocation["kept"] <= 0.7
    assert allocation["kept_by_resource"]["arena"] <= 1.0
    assert allocation["latency_unit"] == "estimated cortex-m4 cycles" and allocation["never_slower"]
    # the total is the whole int8 model's cycles as firmware, the operators between its layers included
    assert allocation["total"] == cost.model(net, (3, 16, 16))
    chosen = [layer for layer in result.plan.layers if layer.method or layer.channels != layer.channels_before]
    assert chosen and all(layer.latency < layer.dense_latency for layer in chosen)  # factored or cut, never slower
    assert "| cycles before | cycles after |" in result.plan_table()


def test_more_instructions_than_the_accepted_baseline_is_a_regression(tmp_path):
    from pipeline.device.regress import _compare_with_baseline

    outputs = np.arange(20, dtype=np.float32).reshape(2, 10)
    path, same = tmp_path / "qemu-cortex-m4.npz", dict(artefact_sha="a", inputs_sha="i", max_rise=0.01)
    assert _compare_with_baseline(path, outputs, accept=False, instructions=1000, **same)["status"].startswith("recorded")
    assert _compare_with_baseline(path, outputs, accept=False, instructions=1010, **same)["ok"]
    slower = _compare_with_baseline(path, outputs, accept=False, instructions=1020, **same)
    assert not slower["ok"] and slower["status"].startswith("SLOWER: 1,020 instructions per inference against 1,000")
    cycles = tmp_path / "cycles.npz"
    _compare_with_baseline(cycles, outputs, accept=True, cycles=50_000, **same)
    assert _compare_with_baseline(cycles, outputs, accept=False, cycles=50_025, max_cycle_rise=0.0005, **same)["ok"]
    heavier = _compare_with_baseline(cycles, outputs, accept=False, cycles=50_030, max_cycle_rise=0.0005, **same)
    assert not heavier["ok"] and heavier["status"] == ("SLOWER: 50,030 estimated cycles per inference against 50,000 "
                                                       "accepted (+0.06%, 0.05% allowed)")


@pytest.mark.slow
def test_bench_on_a_microcontroller_counts_each_int8_models_instructions_on_the_board(sources, tmp_path, cifar_dir):
    from pipeline.bench.run import bench
    from pipeline.tflm.on_board import instructions_per_inference

    path = bench(models=("seednet",), budgets=(0.8,), epochs=0, targets=("cortex-m4",), data=str(cifar_dir),
                 eval_samples=100, out=str(tmp_path / "bench"), latency_rounds=1, log=lambda *_: None)
    rows = {r["variant"]: r for r in json.loads(path.read_text())["models"][0]["rows"]}
    assert {name: r["instructions"] for name, r in rows.items() if r["precision"] == "fp32"} == \
        {"dense_fp32": None, "b0.8_oneshot_fp32": None}
    dense, factored = rows["dense_int8"], rows["b0.8_oneshot_int8"]
    assert dense["instruction_reduction"] == 1.0 and dense["instructions"] > 100_000
    assert factored["instructions"] < dense["instructions"]  # 20% fewer MACs, fewer instructions on the board
    assert factored["instruction_reduction"] == round(dense["instructions"] / factored["instructions"], 3)
    # the count is the model's, not the image's: other test images give the same figure
    tflite = next((tmp_path / "bench" / "work").glob("seednet-nucleo-l4r5zi-dense.int8.tflite"))  # cortex-m4 is its alias
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    assert instructions_per_inference(tflite.read_bytes(), cpu="cortex-m4", root=sources, x_nchw=x) == dense["instructions"]
    assert "| instructions | instr. reduction |" in (tmp_path / "bench" / "report.md").read_text()

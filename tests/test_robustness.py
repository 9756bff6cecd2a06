"""Bad input gets one readable error and leaves nothing behind; an interrupted deploy keeps the previous
build; two deploys with the same inputs give byte-identical artefacts."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import NO_BUDGET, SEEDNET

import pipeline.deploy as deploy_module
from pipeline.cli import main
from pipeline.zoo.nets import CifarResNet, SeedNet

pytestmark = pytest.mark.slow


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def npz(tmp_path, name, x, y):
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=x, y=y)
    return str(path)


def bad_inputs(tmp_path):
    """(argv, words the one-line error must contain) per case; files made here."""
    torch.save(SeedNet().state_dict(), tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:500])
    torch.save({"state_dict": Payload()}, tmp_path / "evil.pt")
    torch.save(CifarResNet(20).state_dict(), tmp_path / "resnet.pt")
    (tmp_path / "a_file").write_text("not a folder")
    img = np.zeros((20, 32, 32, 3), np.uint8)
    labels = np.arange(20) % 10
    return [
        (["--weights", str(tmp_path / "missing.pt")], "does not exist"),
        (["--weights", str(tmp_path / "cut.pt")], "could not be read"),
        (["--weights", str(tmp_path / "evil.pt")], "would run code"),
        (["--weights", str(tmp_path / "resnet.pt")], "missing keys conv1.bias"),
        (["--model", "vgg16"], "Unknown model 'vgg16'; known:"),
        (["--target", "rpi5"], "Unknown target 'rpi5'; known: cortex-m4, cortex-m7, nrf52840, nucleo-h743zi, nucleo-l4r5zi, rpi4"),
        (["--method", "pca"], "Unknown method 'pca'; known: channel-svd, cp, prune, slice-svd, svd, tucker2"),
        (["--rank", "0"], "expected a positive integer rank"),
        (["--rank", "-3"], "expected a positive integer rank"),
        (["--rank", "2.5"], "expected a positive integer rank"),
        (["--rank", "99"], "Rank 99 for layer 'conv2' (tucker2); expected at most 16x6"),
        (["--eval-samples", "-1"], "expected 0 (the full test set) or a positive count"),
        (["--budget", "0"], "Budget '0'; expected the fraction of the dense model's macs to keep, in (0, 1]"),
        (["--budget", "1.5"], "Budget '1.5'; expected the fraction"),
        (["--budget", "-0.2"], "Budget '-0.2'; expected the fraction"),
        (["--budget", "half"], "Budget 'half'; expected the fraction"),
        (["--budget", "flops:0.5"], "unknown resource 'flops'; known: macs, params, cycles, arena, latency"),
        (["--budget", "0.01"], "Budget macs:0.01 is out of reach"),
        (["--finetune-epochs", "-1"], "FINETUNE_EPOCHS=-1; expected 0 (no fine-tuning) or a positive count"),
        (["--data", str(tmp_path / "nowhere")], "does not exist; expected one of: cifar-10 ("),
        (["--data", npz(tmp_path, "nchw", np.zeros((20, 3, 32, 32), np.uint8), labels)], "look channels-first"),
        (["--data", npz(tmp_path, "gray", np.zeros((20, 32, 32, 1), np.uint8), labels)],
         "samples of 32x32 with 1 channel(s) (H x W x C); model 'seednet' takes 32x32 with 3"),
        (["--data", npz(tmp_path, "int32", img.astype(np.int32), labels)], "expected uint8 (0..255) or float"),
        (["--data", npz(tmp_path, "nan", np.full((20, 32, 32, 3), np.nan, np.float32), labels)], "NaN or inf"),
        (["--data", npz(tmp_path, "inf", np.full((20, 32, 32, 3), np.inf, np.float32), labels)], "NaN or inf"),
        (["--data", npz(tmp_path, "empty", img[:0], labels[:0])], "zero samples"),
        (["--data", npz(tmp_path, "labels", img, labels + 5)], "expected 0..9"),
        (["--data", npz(tmp_path, "small", np.zeros((20, 16, 16, 3), np.uint8), labels)], "model 'seednet' takes 32x32 with 3"),
        (["--out", str(tmp_path / "a_file" / "build")], "is not writable"),
    ]


def test_every_bad_input_is_one_readable_line_with_exit_2_and_nothing_written(tmp_path, capsys):
    for argv, words in bad_inputs(tmp_path):
        out = tmp_path / "out"
        code = main(["deploy", *SEEDNET, *NO_BUDGET, "--out", str(out), "--eval-samples", "10", "--quiet", *argv])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not out.exists() and not list(tmp_path.glob(".out.*")), argv


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="Unknown target"):
        main(["--debug", "deploy", *SEEDNET, "--target", "rpi5", "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("victim,words", [("baseline/dense.fp32.onnx", "could not be loaded"),
                                          ("model.tflite", "not a readable TFLite model")])
def test_a_corrupt_model_handed_to_a_later_stage_is_refused(victim, words, tmp_path, cifar_dir, capsys):
    out = tmp_path / "m4"
    assert main(["deploy", *SEEDNET, *NO_BUDGET, "--target", "cortex-m4", "--data", str(cifar_dir), "--eval-samples", "50",
                 "--out", str(out), "--quiet"]) in (0, 1)
    path = out / victim
    path.write_bytes(path.read_bytes()[:2000])
    capsys.readouterr()
    assert main(["regress", "--target", "cortex-m4", "--out", str(out), "--eval-samples", "10"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err




@pytest.fixture(scope="module")
def builds(tmp_path_factory, cifar_dir):
    root = tmp_path_factory.mktemp("interrupt")
    for target in ("rpi4", "cortex-m4"):
        assert main(["deploy", *SEEDNET, *NO_BUDGET, "--target", target, "--data", str(cifar_dir), "--eval-samples", "50",
                     "--out", str(root / target), "--quiet"]) in (0, 1)
    return root


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("target", ["rpi4", "cortex-m4"])
@pytest.mark.parametrize("last", ["compress_model", "write_build_manifest"])
def test_ctrl_c_after_any_stage_keeps_the_previous_build(builds, target, last, monkeypatch, cifar_dir):
    """Every stage runs, the earlier build untouched after each (they write only into the staging folder); Ctrl-C
    after `last` (the first or the last stage: the cleanup is one `finally` for all) leaves it as it was, and no
    staging folder or temporary file behind."""
    out = builds / target
    before = _files(out)
    ran = []

    def checked(real):
        def stage_then_check(build):
            real(build)
            ran.append(real.__name__)
            assert _files(out) == before, f"{real.__name__} wrote into the previous build"
            if real.__name__ == last:
                raise KeyboardInterrupt  # the user presses Ctrl-C
        return stage_then_check

    stages = [s.__name__ for s in deploy_module.STAGES]
    monkeypatch.setattr(deploy_module, "STAGES", tuple(checked(s) for s in deploy_module.STAGES))
    assert main(["deploy", *SEEDNET, *NO_BUDGET, "--target", target, "--data", str(cifar_dir), "--eval-samples", "50",
                 "--out", str(out), "--quiet"]) == 130
    assert ran == stages[:stages.index(last) + 1]
    assert _files(out) == before
    assert sorted(p.name for p in builds.iterdir()) == ["cortex-m4", "rpi4"]  # no staging or old folders
    assert not [p for p in builds.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("target", ["rpi4", "cortex-m4"])
def test_two_deploys_give_byte_identical_artefacts(target, tmp_path, cifar_dir):
    manifests = []
    for run in ("a", "b"):
        assert main(["deploy", *SEEDNET, *NO_BUDGET, "--target", target, "--data", str(cifar_dir), "--eval-samples", "50",
                     "--out", str(tmp_path / run), "--quiet"]) in (0, 1)
        manifests.append(json.loads((tmp_path / run / "manifest.json").read_text()))
    assert manifests[0]["artefacts"] == manifests[1]["artefacts"]
    assert len(manifests[0]["artefacts"]) >= 6
    shutil.rmtree(tmp_path / "a")

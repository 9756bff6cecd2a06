"""A user's own model (a file.py:callable, 1x49x10 inputs, 12 classes) and data (one .npz of x and y) through
deploy and regress on both kinds of target, from another working directory; the MLPerf Tiny zoo nets on
their shapes."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import NO_BUDGET

from calib import load_data
from pipeline.cli import main
from pipeline.report.compare import worse_than_dense
from pipeline.zoo import load_model

MODEL_FILE = '''
import torch
from torch import nn


class KeywordNet(nn.Module):
    """A small keyword spotter: 1x49x10 MFCCs, 12 classes; it says its own input, not its class names."""

    input_shape = (1, 49, 10)
    mean, std = (0.0,), (1.0,)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 32, (10, 4), stride=2, padding=(5, 1))
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pointwise = nn.Conv2d(32, 48, 1)
        self.fc = nn.Linear(48, 12)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pointwise(torch.relu(self.depthwise(x))))
        return self.fc(x.mean((2, 3)))


def build():
    return KeywordNet()
'''
WORDS = ["down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes", "silence", "unknown"]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's folder: model file, trained checkpoint, one x/y file of 960 separable samples."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "kws_model.py").write_text(MODEL_FILE)
    rng = np.random.default_rng(0)
    templates = rng.normal(0, 1, (12, 49, 10)).astype(np.float32)
    y = np.arange(960) % 12
    x = (templates[y] + rng.normal(0, 0.5, (960, 49, 10))).astype(np.float32)[..., None]
    np.savez(folder / "kws.npz", x=x, y=y, classes=np.array(WORDS))
    torch.manual_seed(0)  # before the model is built: its initial weights are part of what the test expects
    spec = load_model(f"{folder / 'kws_model.py'}:build", pretrained=False)
    data = load_data(folder / "kws.npz")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order, so the same weights every run
    optimiser = torch.optim.Adam(spec.module.parameters(), 3e-3)
    xs, ys = torch.from_numpy(data.train.x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(data.train.y)
    spec.module.train()
    for _ in range(120):
        loss = torch.nn.functional.cross_entropy(spec.module(xs), ys)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    torch.set_num_threads(threads)
    torch.save(spec.module.state_dict(), folder / "kws.pt")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rpi4", "cortex-m4"])
def test_a_one_channel_twelve_class_model_deploys_and_regresses_from_anywhere(user, target, tmp_path, monkeypatch):
    monkeypatch.chdir(user)  # the model given relative to the user's folder, as users type it
    out = tmp_path / "build"
    # on the A72 every factorisation of this small net costs more cycles than its dense layer, so no budget below 1
    # is reachable there (the allocation never takes a slower layer): rpi4 factors by the profile's rank rule
    budget = ["--budget", "0.8"] if target != "rpi4" else list(NO_BUDGET)
    code = main(["deploy", "--target", target, "--model", "kws_model.py:build", "--weights", "kws.pt",
                 "--data", "kws.npz", "--eval-samples", "96", *budget, "--out", str(out), "--quiet"])
    report = json.loads((out / "report.json").read_text())
    assert code == 0, report["failures"]
    assert report["data"]["name"] == "kws" and report["data"]["classes"] == WORDS
    assert "class-stratified 20%" in report["data"]["split"] and report["data"]["test_samples"] == 192
    assert report["class_names"] == WORDS and len(report["variants"]["dense_fp32"]["per_class"]) == 12
    assert report["variants"]["dense_fp32"]["top1"] > 0.9
    kept = 0.8 if target != "rpi4" else 1
    assert report["variants"]["factored_int8"]["macs"] <= kept * report["variants"]["dense_fp32"]["macs"]
    assert isinstance(report["warnings"], list)
    text = (out / "report.md").read_text()
    assert "test samples of kws" in text and "nan" not in text and "CIFAR" not in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert os.path.isabs(manifest["settings"]["data"]) and os.path.isabs(manifest["checkpoint"]["path"])
    if target == "cortex-m4":
        settings = (out / "model_settings.h").read_text()
        assert "kInputHeight = 49;" in settings and "kInputChannels = 1;" in settings
        assert 'kNumClasses = 12;' in settings and '"silence", "unknown"}' in settings
        tflite = report["variants"]["factored_int8"]["details"]
        assert report["variants"]["factored_int8"]["peak_activation_bytes"] <= tflite["smallest_arena_bytes"]
    # regress from another folder, with no EVAL_SAMPLES: the images the deploy's device check ran (rpi4's deploy
    # runs none, so its first regression records the baseline and the second must match it)
    monkeypatch.chdir(tmp_path)
    for _ in range(1 if report["device"] else 2):
        assert main(["regress", "--target", target, "--out", str(out)]) == 0
    regress = json.loads((out / "regress.json").read_text())
    assert regress["baseline"]["status"].startswith("matched exactly") and regress["eval_samples"] == 96
    assert regress["host_max_diff_steps"] is not None


def test_zoo_tiny_nets_take_their_shapes_and_factor_their_pointwise_and_depthwise_convs():
    from pipeline.compress.decompose import decompose
    from tests.helpers import plain

    # the MLPerf Tiny references: ResNet-8 12.5M MACs and 78k parameters, MobileNetV1-0.25 at 96x96 7.5M MACs
    expected = {"resnet8": ((3, 32, 32), 10, 12_501_632), "dscnn": ((1, 49, 10), 12, 2_656_768),
                "mobilenetv1_025": ((3, 96, 96), 2, 7_489_664), "fashionnet": ((1, 28, 28), 10, 1_919_872)}
    for name, (shape, classes, macs) in expected.items():
        spec = load_model(name, pretrained=False)
        assert spec.input_shape == shape and spec.num_classes == classes and len(spec.class_names) == classes
        _, plan = decompose(spec.module, input_shape=shape, settings=plain(method="tucker2", rank="0.25",
                                                                          keep_first_and_last=True), progress=False)
        assert plan.macs_before == macs, name
        methods = {p.method for p in plan.layers if p.method}
        if name in ("dscnn", "mobilenetv1_025"):
            assert {"pointwise-svd", "depthwise-split"} <= methods, (name, methods)
        assert plan.macs_after < plan.macs_before


def test_warnings_name_each_cost_made_worse_and_the_layers_responsible():
    from pipeline.compress.plan import DecompositionPlan, LayerPlan
    from pipeline.metrics import VariantReport

    def variant(bytes_, peak, latency, arena):
        return VariantReport(macs=1, params=1, bytes=bytes_, peak_activation_bytes=peak, top1=0.9, agreement=1.0,
                             latency_ms=latency, runtime="rt", machine="host",
                             details={"arena_bytes": arena, "flash_bytes": bytes_, "largest_tensors": [("t", 9)]})

    plan = DecompositionPlan("budget", "allocated", 8, (
        LayerPlan("a", "Conv2d", "pointwise-svd", (8,), "r", 100, 50, 64, 80, 0.1, latency=2.0, dense_latency=1.0),
        LayerPlan("b", "Conv2d", "svd", (8,), "r", 100, 50, 64, 32, 0.1, latency=0.5, dense_latency=1.0)), 0.0)
    same = worse_than_dense({"dense_int8": variant(100, 10, 1.0, 50), "factored_int8": variant(100, 10, 1.04, 50)},
                            plan, intermediate_bytes={"a": 8}, latency_tolerance=0.05)
    assert same == []  # 4% slower is within the tolerance
    worse = worse_than_dense({"dense_int8": variant(100, 10, 1.0, 50), "factored_int8": variant(120, 20, 1.2, 60)},
                             plan, intermediate_bytes={"a": 8, "b": 4}, latency_tolerance=0.05)
    assert len(worse) == 4
    assert worse[0].startswith("flash size: the factored int8 model is 120 B against 100 B") and "grew: a;" in worse[0]
    assert "a (8 B), b (4 B)" in worse[1] and worse[2].startswith("arena: TFLM needs 60 B against 50 B")
    assert worse[3].startswith("latency: 1.2 ms") and "slower than their dense layer: a (2 vs 1)" in worse[3]

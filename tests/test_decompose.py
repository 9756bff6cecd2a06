import json

import numpy as np
import pytest
import torch
from helpers import plain
from torch import nn

from calib import balanced_subset, load_dataset, preprocess
from pipeline.cli import main
from pipeline.compress.decompose import collapse, decompose
from pipeline.compress.store import load_factored, save_factored
from pipeline.errors import ConfigError
from pipeline.metrics import top1, torch_logits
from pipeline.zoo import load_model
from pipeline.zoo.nets import CifarResNet, SeedNet


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.body = nn.Conv2d(16, 32, 3, padding="same", bias=False)
        self.tiny = nn.Conv2d(32, 2, 1)
        self.up = nn.ConvTranspose2d(2, 2, 2, stride=2)
        self.line = nn.Conv1d(1, 1, 3)
        self.head = nn.Linear(2 * 16 * 16, 10)

    def forward(self, x):
        x = self.tiny(self.body(self.reflect(self.depthwise(self.stem(x)))))
        x = torch.nn.functional.avg_pool2d(self.up(x), 2)
        return self.head(x.flatten(1))


def test_unhandled_layers_stay_dense_with_the_reason():
    model, plan = decompose(Mixed(), settings=plain(method="tucker2", rank="0.5"), input_shape=(3, 16, 16), progress=False)
    notes = {p.name: p for p in plan.layers}
    # a depthwise 3x3 splits into 3x1 and 1x3 depthwise convs at rank 1: 6 multiplies a pixel against 9
    assert notes["depthwise"].method == "depthwise-split" and notes["depthwise"].ranks == (1,)
    assert notes["depthwise"].macs_after * 3 == notes["depthwise"].macs_before * 2
    assert "padding_mode='reflect'" in notes["reflect"].note
    assert "ConvTranspose2d is not handled" in notes["up"].note
    assert "Conv1d is not handled" in notes["line"].note
    assert notes["tiny"].method == "pointwise-svd" and notes["tiny"].ranks == (1,)
    assert notes["body"].method == "tucker2" and notes["body"].ranks == (16, 8)
    assert notes["head"].method == "linear-svd"
    assert plan.macs_after < plan.macs_before
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 10)


def test_conv3d_and_models_without_convs_are_left_dense_with_the_reason():
    class Volumetric(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 4, 3)

        def forward(self, x):
            return self.conv(x.unsqueeze(1))

    _, plan = decompose(Volumetric(), settings=plain(method="cp", rank="0.5"), input_shape=(8, 8, 8), progress=False)
    assert plan.layers[0].method is None and "Conv3d is not handled" in plan.layers[0].note
    _, plan = decompose(nn.Sequential(nn.ReLU()), settings=plain(method="tucker2"), input_shape=(4,), progress=False)
    assert plan.layers == () and "nothing to factor" in plan.table()


def test_a_factorisation_that_saves_no_macs_is_not_applied():
    _, plan = decompose(nn.Sequential(nn.Conv2d(4, 4, 1)), settings=plain(method="tucker2", rank=4), input_shape=(4, 8, 8), progress=False)
    assert plan.layers[0].method is None
    # a 1x1 conv takes the pointwise SVD whatever conv method is asked for; at full rank it saves nothing
    assert plan.layers[0].note == "pointwise-svd at rank 4 would not reduce MACs (2,048 >= 1,024): left dense"


def test_layer_patterns_choose_what_is_factored():
    _, plan = decompose(CifarResNet(20), settings=plain(method="svd", rank="0.25", layers=("layer3.*",), exclude=("*.conv2",)), input_shape=(3, 32, 32), progress=False)
    factored = [p.name for p in plan.layers if p.method]
    assert factored == ["layer3.0.conv1", "layer3.1.conv1", "layer3.2.conv1"]


def test_full_rank_decomposition_of_a_whole_network_changes_nothing():
    torch.manual_seed(0)
    net = SeedNet().eval()
    x = torch.randn(4, 3, 32, 32)
    # energy 1.0 keeps every singular value; layers that would not save MACs at that rank stay dense
    for method in ("svd", "channel-svd", "tucker2", "slice-svd"):
        model, plan = decompose(net, settings=plain(method=method, rank="energy:1.0"), input_shape=(3, 32, 32), progress=False)
        with torch.no_grad():
            assert torch.allclose(model(x), net(x), atol=1e-4), method


def test_rank_above_a_layers_maximum_is_an_error_naming_the_layer():
    with pytest.raises(ConfigError, match=r"Rank 7 for layer 'conv1' \(slice-svd\); expected at most 5"):
        decompose(SeedNet(), settings=plain(method="slice-svd", rank=7), input_shape=(3, 32, 32), progress=False)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="Unknown method 'pca'; known: channel-svd, cp, prune, slice-svd, svd, tucker2"):
        decompose(SeedNet(), settings=plain(method="pca"), input_shape=(3, 32, 32))


def test_failed_cp_falls_back_to_tucker2_and_says_so(monkeypatch):
    def diverge(tensor, rank, **kwargs):
        return np.ones(rank), [np.full((d, rank), np.nan) for d in tensor.shape]

    monkeypatch.setattr("pipeline.compress.methods.parafac", diverge)
    model, plan = decompose(CifarResNet(20), settings=plain(method="cp", rank="0.25", layers=("layer3.0.conv2",)), input_shape=(3, 32, 32), progress=False)
    layer = next(p for p in plan.layers if p.name == "layer3.0.conv2")
    assert layer.method == "tucker2" and "fell back to tucker2" in layer.note and "NaN/inf" in layer.note
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


def test_factored_model_round_trips_through_a_weights_only_file(tmp_path):
    net = CifarResNet(20).eval()
    model, plan = decompose(net, settings=plain(method="cp", rank="0.25", layers=("layer2.*",)), input_shape=(3, 32, 32), progress=False)
    save_factored(tmp_path / "f.pt", model, plan, model_name="resnet20")
    loaded, loaded_plan, name = load_factored(tmp_path / "f.pt", CifarResNet(20))
    x = torch.randn(2, 3, 32, 32)
    assert name == "resnet20" and loaded_plan.layers == plan.layers
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.slow
def test_seednet_and_resnet20_decompose_run_and_are_measured(cifar_dir, resnet20_weights, tmp_path, capsys):
    test = load_dataset("test", cifar_dir)
    idx = balanced_subset(test.y, 1000)
    results = {}
    for name, weights, method, rank in (("seednet", None, "svd", "energy:0.9"),
                                        ("resnet20", resnet20_weights, "tucker2", "energy:0.97")):
        spec = load_model(name, weights)
        x = preprocess(test.x[idx], mean=spec.mean, std=spec.std)
        dense = top1(torch_logits(spec.module, x), test.y[idx])
        model, plan = decompose(spec.module, settings=plain(method=method, rank=rank, exclude=("conv1",)), input_shape=spec.input_shape, progress=False)
        results[name] = (dense, top1(torch_logits(model, x), test.y[idx]), plan.macs_after / plan.macs_before)
    assert results["resnet20"][0] == pytest.approx(0.92, abs=0.02)
    for dense, factored, kept in results.values():
        assert kept < 0.95  # MACs went down
        assert factored > 0.5 and factored > dense - 0.25
    # the command line route prints the plan and writes a loadable model
    out = tmp_path / "r20.pt"
    assert main(["decompose", "--model", "resnet20", "--weights", str(resnet20_weights), "--method", "tucker2",
                 "--exclude", "conv1", "linear", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layer3.2.conv2" in printed and "of MACs kept" in printed
    assert json.loads(out.with_suffix(".plan.json").read_text())["requested_method"] == "tucker2"


@pytest.mark.slow
@pytest.mark.parametrize("name,weights,expected", [("resnet20", "resnet20_weights", 0.9173),
                                                   ("resnet56", "resnet56_weights", 0.9339)])
def test_pretrained_resnets_reproduce_their_published_accuracy(cifar_dir, name, weights, expected, request):
    spec = load_model(name, request.getfixturevalue(weights))
    test = load_dataset("test", cifar_dir)
    assert top1(torch_logits(spec.module, preprocess(test.x, mean=spec.mean, std=spec.std)), test.y) == expected


@pytest.mark.slow
def test_shipped_seednet_weights_reach_the_accuracy_in_the_readme(cifar_dir):
    spec = load_model("seednet")
    test = load_dataset("test", cifar_dir)
    assert top1(torch_logits(spec.module, preprocess(test.x, mean=spec.mean, std=spec.std)), test.y) == 0.7342


class EveryKind(nn.Module):
    """One layer of each kind a method takes: a full 5x5 conv, a 1x1 conv, a depthwise conv and a linear."""

    def __init__(self):
        super().__init__()
        self.full = nn.Conv2d(3, 12, 5, padding=2, stride=(2, 1))  # strides and padding split across factors too
        self.pointwise = nn.Conv2d(12, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.head = nn.Linear(32 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.full(x))
        return self.head(self.depthwise(torch.relu(self.pointwise(x))).mean(1).flatten(1))


@pytest.mark.parametrize("method,rank", [("svd", "0.5"), ("channel-svd", "0.5"), ("tucker2", "0.5"), ("slice-svd", "2"),
                                         ("cp", "4")])
def test_collapse_puts_back_exactly_what_a_trained_chain_computes(method, rank):
    torch.manual_seed(0)
    net = EveryKind().eval()
    model, plan = decompose(net, settings=plain(method=method, rank=rank), input_shape=(3, 32, 32), progress=False)
    assert sorted(p.method for p in plan.layers) == sorted(["depthwise-split", "linear-svd", "pointwise-svd", method])
    with torch.no_grad():  # what training does: every factor moves on its own, away from any decomposition
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    collapsed = collapse(model, plan, net)
    assert [type(m) for m in collapsed.modules()] == [type(m) for m in net.modules()]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(collapsed(x), model(x), atol=1e-5)
        assert not torch.allclose(collapsed(x), net(x), atol=1e-2)  # the dense model's weights were not reused

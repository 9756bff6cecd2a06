"""A channel group cut to nothing: a residual block leaves the network, its shortcut and a constant stay."""

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from helpers import plain, tflm_steps_from_onnxruntime, with_trained_norms
from torch import nn

from pipeline.compress.budget.arena import timeline
from pipeline.compress.budget.macs import count, totals
from pipeline.compress.budget.menu import pricing_for
from pipeline.compress.budget.sensitivity import Candidate
from pipeline.compress.prune import channel_groups, kept_counts, prune, refit_consumers, unit_name
from pipeline.compress.removal import ConstantOutput, Removed
from pipeline.errors import ConfigError

SHAPE = (3, 8, 8)


class TwoBlocks(nn.Module):
    """A stem, two residual blocks, and a branch whose reader also reads the stem (a concat): not removable."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.abn1, self.abn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.b1, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bbn1, self.bbn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.side = nn.Conv2d(8, 4, 1)
        self.mix = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.abn2(self.a2(F.relu(self.abn1(self.a1(x))))))
        x = F.relu(x + self.bbn2(self.b2(F.relu(self.bbn1(self.b1(x))))))
        x = F.relu(self.mix(torch.cat([x, F.relu(self.side(x))], 1)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def two_blocks() -> TwoBlocks:
    torch.manual_seed(0)
    return with_trained_norms(TwoBlocks(), bias_std=0.2)


def test_only_a_group_with_one_writer_whose_readers_read_nothing_else_may_keep_none():
    groups = {g.name: g for g in channel_groups(two_blocks(), SHAPE, last_layer="fc")[0]}
    assert groups["a1"].removable and groups["b1"].removable
    assert not groups["side"].removable  # mix reads the stem's trunk too
    assert not groups["stem"].removable  # the trunk: written by the stem and both blocks' second convs
    assert kept_counts(groups["a1"], fractions=(0, 0.5), round_to=4) == [0, 4]
    assert kept_counts(groups["side"], fractions=(0, 0.5), round_to=2) == [2]
    assert kept_counts(groups["a1"], fractions=(0.5,), round_to=4) == [4]  # no 0 unless asked for
    with pytest.raises(ConfigError, match="'side' keeping no channels"):
        prune(two_blocks(), SHAPE, {"side": 0})


def test_a_removed_block_is_its_shortcut_plus_the_folded_constant():
    net = two_blocks()
    removed, kept = prune(net, SHAPE, {"a1": 0})
    assert kept == {"a1": []}
    assert isinstance(removed.a1, Removed) and isinstance(removed.abn1, Removed)
    assert isinstance(removed.a2, ConstantOutput) and isinstance(removed.abn2, nn.Identity)
    bn = net.abn2  # a2 has no bias: from no input it outputs 0, which its BatchNorm maps to this
    expected = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    # without images, the same value at every position of a channel: a tensor the size of the layer's output
    assert removed.a2.value.shape == (1, 8, 8, 8)
    assert torch.allclose(removed.a2.value, expected.view(1, -1, 1, 1).expand(1, 8, 8, 8))
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        stem = F.relu(net.bn0(net.stem(x)))
        after = F.relu(stem + expected.view(1, -1, 1, 1))
        rest = F.relu(after + net.bbn2(net.b2(F.relu(net.bbn1(net.b1(after))))))
        want = net.fc(F.adaptive_avg_pool2d(F.relu(net.mix(torch.cat([rest, F.relu(net.side(rest))], 1))), 1).flatten(1))
        assert torch.allclose(removed(x), want, atol=1e-6)
    macs = {n: c.macs for n, c in count(net, SHAPE).items()}
    assert totals(removed, SHAPE)[0] == sum(macs.values()) - macs["a1"] - macs["a2"]


def test_with_images_the_constant_is_the_dense_branchs_mean_output():
    net = two_blocks()
    removed, _ = prune(net, SHAPE, {"b1": 0})
    x = torch.randn(32, *SHAPE)
    assert refit_consumers(removed, net, ["b2"], x) == ["b2"]
    with torch.no_grad():
        stem = F.relu(net.bn0(net.stem(x)))
        trunk = F.relu(stem + net.abn2(net.a2(F.relu(net.abn1(net.a1(stem))))))
        branch = net.bbn2(net.b2(F.relu(net.bbn1(net.b1(trunk)))))
    # the least-squares constant at each position: the branch's mean over the images, which the zero padding of
    # its 3x3 convs makes differ between the border and the middle
    assert torch.allclose(removed.b2.value, branch.mean(0, keepdim=True), atol=1e-5)
    assert not torch.allclose(removed.b2.value[..., 0, 0], removed.b2.value[..., 4, 4], atol=1e-3)


def test_a_file_from_when_the_constant_was_per_channel_loads_as_the_same_function():
    removed, _ = prune(two_blocks(), SHAPE, {"a1": 0})
    old = {k: v for k, v in removed.state_dict().items()}
    old["a2.value"] = torch.arange(8.0).view(1, 8, 1, 1)  # the shape such files hold
    removed.load_state_dict(old)
    assert removed.a2.value.shape == (1, 8, 8, 8) and torch.equal(removed.a2.value[0, :, 5, 2], torch.arange(8.0))


def test_a_removed_block_exports_without_its_convs_and_is_rebuilt_from_its_file(tmp_path):
    from pipeline.compress.cuts import apply_cuts, with_cuts
    from pipeline.compress.decompose import decompose
    from pipeline.compress.store import load_factored, save_factored
    from pipeline.onnx.export import export_onnx

    net = two_blocks()
    settings = plain(candidates=("prune",))
    calibration = np.random.default_rng(0).normal(size=(16, *SHAPE)).astype(np.float32)
    removed, kept, touching = apply_cuts(net, SHAPE, {"a1": 0, "b1": 4}, settings=settings, calibration=calibration)
    factored, plan = decompose(removed, input_shape=SHAPE, settings=settings, progress=False, choices={})
    plan = with_cuts(plan, dense=net, pruned=removed, input_shape=SHAPE, kept=kept, touching=touching)
    rows = {p.name: p for p in plan.layers}
    assert [p.name for p in plan.layers][:4] == ["stem", "a1", "a2", "b1"]  # in the dense model's order
    assert rows["a1"].channels == (8, 0) and rows["a2"].channels == (0, 8) and rows["a2"].macs_after == 0
    assert "| a1 | removed |" in plan.table().replace("  ", " ").replace("  ", " ")
    path, diff = export_onnx(factored, tmp_path / "m.onnx", check_inputs=calibration[:4])
    convs = [n for n in onnx.load(path).graph.node if n.op_type == "Conv"]
    assert len(convs) == len(count(net, SHAPE)) - 1 - 2  # the classifier is a Gemm; a1 and a2 are gone
    save_factored(tmp_path / "p.pt", factored, plan, model_name="two", input_shape=SHAPE)
    loaded, loaded_plan, _ = load_factored(tmp_path / "p.pt", two_blocks())
    x = torch.randn(2, *SHAPE)
    assert loaded_plan.cuts == kept and torch.equal(loaded(x), factored(x))


def test_the_pricing_of_a_removal_equals_the_removed_models_own_count():
    net = two_blocks()
    groups, _ = channel_groups(net, SHAPE, last_layer="fc")
    line = timeline(net, SHAPE, out_group={n: g.name for g in groups for n in g.producers + g.depthwise},
                    channels={g.name: g.channels for g in groups})
    macs, params = totals(net, SHAPE)
    cut = Candidate(unit_name("a1"), "prune", (0,), 0, 0, 0.1, 0.9)
    pricing = pricing_for(net, SHAPE, groups=groups, candidates=[cut], totals={"macs": macs, "params": params},
                          timeline=line, arena_records=True)
    removed = prune(net, SHAPE, {"a1": 0})[0]
    assert pricing({cut.layer: cut})["macs"] == totals(removed, SHAPE)[0]
    # the two convs' 2 x 576 weights go, the constant's 8 x 8 x 8 come; the BatchNorms' 2 x 16 are not priced (as for
    # every cut: params budgets err on the safe side by them)
    assert pricing({cut.layer: cut})["params"] == params - 2 * 576 + 512 == totals(removed, SHAPE)[1] + 2 * 16
    # the block's intermediate tensor is gone, and two operators' records with it
    assert pricing.arena({cut.layer: cut}) < pricing.arena({}) - 2 * 223
    assert math.isclose(pricing({})["macs"], macs)
    assert np.isfinite(pricing.arena({}))


@pytest.mark.runtime
def test_tflite_micro_runs_a_removed_block_as_onnx_runtime_does(tmp_path):
    """The constant joins the trunk as a broadcast ADD: TFLM within one output step of the QDQ file's arithmetic."""
    net = prune(two_blocks(), SHAPE, {"a1": 0})[0]
    x = np.random.default_rng(1).normal(size=(48, *SHAPE)).astype(np.float32)
    assert tflm_steps_from_onnxruntime(net, x, tmp_path) <= 1.0 + 1e-4


def test_a_removal_whose_constant_would_stand_for_a_whole_batch_is_not_offered():
    """SeedNet's first conv writes channels only conv2 reads, but conv2's constant then meets a max-pool: the model
    would no longer compute per image, so that cut is refused and the group's other cuts stay on the menu."""
    from pipeline.compress.budget.sensitivity import cut_candidates
    from pipeline.errors import StageError
    from pipeline.zoo.nets import SeedNet

    net = SeedNet().eval()
    with pytest.raises(StageError, match="no longer runs|does not reach"):
        prune(net, (3, 32, 32), {"fc1": 0})
    offered, _ = cut_candidates(net, input_shape=(3, 32, 32), last_layer="fc3",
                                settings=plain(candidates=("prune",), channel_fractions=(0, 0.5), round_to=4))
    assert (unit_name("fc1"), (60,)) in [(c.layer, c.ranks) for c in offered]
    assert all(c.ranks != (0,) for c in offered)


class BroadcastAddCycles:
    """A board's layer cost (MACs plus a fixed cost per layer) whose whole model also pays 7,000 cycles for each
    removed block's constant, as ONNX Runtime's broadcast add costs more than the same-shape add it replaces."""

    fingerprint = {"fake": "broadcast"}
    unit = "estimated fake cycles"
    board = True

    def layers(self, items):
        return [float(sum(c.macs + 5_000 for c in count(m, s).values())) for m, s in items]

    def model(self, module, input_shape):
        constants = sum(isinstance(m, ConstantOutput) for m in module.modules())
        return self.layers([(module, input_shape)])[0] + 100_000 + 7_000 * constants


def test_each_removal_is_priced_from_the_model_measured_without_it():
    from pipeline.compress.options import check_budget
    from pipeline.zoo import ModelSpec
    from targets import load_target

    spec = ModelSpec("two", two_blocks(), SHAPE, (0.5,) * 3, (0.25,) * 3, ("a", "b", "c"))
    profile = load_target("rpi4").override(decomposition={"budget": "cycles:0.9", "round_to": 4, "candidates": ["prune"],
                                                          "channel_fractions": [0, 0.5]})
    cost = BroadcastAddCycles()
    menu = check_budget(spec, profile.decomposition, cost)
    pricing = menu.pricing
    assert pricing.removal_extra == pytest.approx({"a1": 7_000, "b1": 7_000})
    both = {c.layer: c for c in menu.skeleton if c.method == "prune" and c.ranks == (0,)}
    assert set(both) == {unit_name("a1"), unit_name("b1")}
    measured = cost.model(prune(spec.module, SHAPE, {"a1": 0, "b1": 0})[0], SHAPE)
    assert pricing(both)["cycles"] == pytest.approx(measured)


def test_a_removed_layer_has_no_edges_to_price():
    net = two_blocks()
    groups, _ = channel_groups(net, SHAPE, last_layer="fc")
    line = timeline(net, SHAPE, out_group={n: g.name for g in groups for n in g.producers + g.depthwise},
                    channels={g.name: g.channels for g in groups})
    plane = 8 * 8 * 8  # every tensor of the blocks is 8 channels of 8x8
    assert line.layer_io({"a1": 4}) == line.layer_io() - 2 * plane // 2  # a1's output and a2's input halve
    assert line.layer_io({"a1": 0}) == line.layer_io() - 4 * plane  # a1 and a2 gone, each with its input and output

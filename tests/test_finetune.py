"""Distillation fine-tuning: the loss is the textbook one, BatchNorm is handled as asked, the best epoch is kept;
gradual compression steps through its budgets."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from calib import Dataset
from pipeline.compress.budget.macs import count
from pipeline.compress.finetune import (
    OPTIMISERS,
    distillation_loss,
    feature_loss,
    feature_points,
    finetune,
    mix,
)
from pipeline.compress.removal import ConstantOutput, Removed
from pipeline.compress.stage import compress
from pipeline.errors import ConfigError
from pipeline.zoo import ModelSpec
from targets import Decomposition, Finetune, load_target


def test_distillation_loss_by_hand():
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax: 0.75, 0.25
    student = torch.zeros(1, 2)  # softmax: 0.5, 0.5
    label = torch.tensor([0])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert distillation_loss(student, teacher, label, temperature=1.0, alpha=1.0).item() == pytest.approx(kl, rel=1e-6)
    # identical logits: only the label term is left, weighted 1 - alpha
    assert distillation_loss(teacher, teacher, label, temperature=4.0, alpha=0.9).item() == pytest.approx(
        0.1 * -math.log(0.75), rel=1e-6)


def colour_data(n: int, seed: int) -> Dataset:
    """Class c (0..2) is the image whose channel c is brightest: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 100, (n, 8, 8, 3)).astype(np.uint8)
    x[np.arange(n), :, :, y] += 120
    return Dataset(x, y.astype(np.int64), "colours")


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def trained(net: nn.Module, data: Dataset, *, steps: int, lr: float) -> nn.Module:
    """`net` trained full-batch on `data` (preprocessed with mean 0.5, std 1), in eval mode."""
    x = torch.from_numpy((data.x / 255.0 - 0.5).transpose(0, 3, 1, 2).astype(np.float32))
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x), torch.from_numpy(data.y))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval()


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return trained(tiny_net(), colour_data(512, 1), steps=60, lr=0.05)


@pytest.mark.parametrize("bn", ["frozen", "reestimate"])
def test_finetune_improves_a_damaged_student_and_handles_batchnorm(teacher, bn):
    torch.manual_seed(1)
    student = tiny_net()
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        student[0].weight.add_(0.5 * torch.randn_like(student[0].weight))  # what a harsh factorisation does
        student[5].bias[0] += 3 * student[5].weight.norm()  # and a classifier biased to class 0
    before = {k: v.clone() for k, v in student.state_dict().items()}
    tuned, history = finetune(student, teacher, colour_data(512, 2), colour_data(300, 3), mean=(0.5,) * 3,
                              std=(1.0,) * 3, settings=Finetune(epochs=2, lr=1e-2, batch_size=32, bn=bn), progress=False)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items()), "the student was modified in place"
    assert history["best_heldout_top1"] >= history["start_heldout_top1"]
    assert history["best_heldout_top1"] > 0.9 and len(history["epochs"]) == 2
    assert history["seconds_per_epoch"] > 0 and not tuned.training
    stats_kept = torch.equal(tuned[1].running_mean, before["1.running_mean"])
    assert stats_kept == (bn == "frozen")


def damaged(teacher: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.add_(0.5 * torch.randn_like(student[0].weight))
        student[5].bias[0] += 4 * student[5].weight.norm()  # a classifier that calls most images class 0
    return student


def test_weight_averaging_keeps_the_average_of_the_trained_weights(teacher):
    student, data, heldout = damaged(teacher), colour_data(512, 2), colour_data(300, 3)

    def tuned(decay: float) -> tuple[nn.Module, dict]:
        return finetune(student, teacher, data, heldout, mean=(0.5,) * 3, std=(1.0,) * 3, progress=False, keep="last",
                        settings=Finetune(epochs=1, lr=1e-2, batch_size=32, ema_decay=decay, bn="frozen",
                                          feature_weight=0.0))

    (last, _), (frozen, _), (averaged, history) = tuned(0.0), tuned(1 - 1e-9), tuned(0.5)
    moved = lambda a, b: (a[0].weight - b[0].weight).abs().max().item()  # noqa: E731
    assert moved(last, student) > 0.05  # training moved the weights ...
    assert moved(frozen, student) < 1e-6  # ... an average that never forgets its start did not
    assert moved(averaged, last) > 1e-4 and moved(averaged, student) > 0.05  # a short memory sits near the end
    assert history["start_heldout_top1"] < 0.5 and history["epochs"][0]["heldout_top1"] > 0.9
    assert torch.equal(averaged[1].running_mean, student[1].running_mean)  # frozen statistics are not averaged
    assert history["ema_decay"] == 0.5


def test_sgd_with_batch_statistics_recovers_a_damaged_student(teacher):
    student = damaged(teacher)
    _, history = finetune(student, teacher, colour_data(512, 2), colour_data(300, 3), mean=(0.5,) * 3, std=(1.0,) * 3,
                          progress=False, settings=Finetune(epochs=2, lr=0.05, batch_size=32, bn="reestimate",
                                                            optimizer="sgd"))
    assert history["start_heldout_top1"] < 0.5 and history["best_heldout_top1"] > 0.9
    assert history["optimizer"] == "sgd"


def test_mixup_blends_a_batch_with_itself_in_another_order():
    x = np.arange(4 * 2 * 2 * 1, dtype=np.float32).reshape(4, 2, 2, 1)
    blended, partner, weight = mix(x, np.random.default_rng(0), concentration=1.0)
    assert sorted(partner) == [0, 1, 2, 3] and 0.0 < weight < 1.0 and blended.dtype == np.float32
    np.testing.assert_allclose(blended, weight * x + (1 - weight) * x[partner], rtol=1e-6)
    # a small concentration puts the weight near 0 or 1: blends stay close to one image
    weights = [mix(x, np.random.default_rng(s), concentration=0.05)[2] for s in range(50)]
    assert np.mean([min(w, 1 - w) < 0.05 for w in weights]) > 0.7


def test_mixup_distillation_recovers_a_damaged_student(teacher):
    def run(mixup: float) -> dict:
        return finetune(damaged(teacher), teacher, colour_data(512, 2), colour_data(300, 3), mean=(0.5,) * 3,
                        std=(1.0,) * 3, progress=False, settings=Finetune(epochs=2, lr=1e-2, batch_size=32, mixup=mixup))[1]

    history, plain = run(1.0), run(0.0)
    assert history["start_heldout_top1"] < 0.5 and history["best_heldout_top1"] > 0.9
    assert history["epochs"][0]["loss"] != plain["epochs"][0]["loss"]  # the batches really were blended
    assert history["mixup"] == 1.0


def test_the_seed_setting_changes_only_the_training_noise(teacher):
    def run(seed: int) -> dict:
        return finetune(damaged(teacher), teacher, colour_data(512, 2), colour_data(300, 3), mean=(0.5,) * 3,
                        std=(1.0,) * 3, progress=False, keep="last",
                        settings=Finetune(epochs=1, lr=1e-2, batch_size=32, seed=seed))[1]

    first, again, other = run(0), run(0), run(1)
    assert first["epochs"][0]["loss"] == again["epochs"][0]["loss"]  # a run is reproducible ...
    assert first["epochs"][0]["loss"] != other["epochs"][0]["loss"]  # ... and another seed is another run
    assert (first["seed"], other["seed"]) == (0, 1) and first["start_heldout_top1"] == other["start_heldout_top1"]


def test_every_optimizer_a_profile_may_name_is_built():
    # the schema names the same set: its refusal below lists "adamw, sgd"
    for name, build in OPTIMISERS.items():
        Finetune(optimizer=name)  # accepted by the profile schema
        assert isinstance(build([nn.Parameter(torch.zeros(1))], lr=0.1, weight_decay=0.0), torch.optim.Optimizer)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="Unknown optimizer value 'adam'; known: adamw, sgd"):
        Finetune(optimizer="adam")

    with pytest.raises(ConfigError, match=r"ema_decay=1.0; expected 0 \(no averaging\) or a decay in \(0, 1\)"):
        Finetune(ema_decay=1.0)
    with pytest.raises(ConfigError, match=r"mixup=-0.2; expected 0 \(no mixing\) or a positive Beta concentration"):
        Finetune(mixup=-0.2)
    with pytest.raises(ConfigError, match="seed=-1; expected 0 or a positive offset"):
        Finetune(seed=-1)
    with pytest.raises(ConfigError, match="Unknown bn value 'fold'; known: frozen, reestimate"):
        Finetune(epochs=1, bn="fold")
    with pytest.raises(ConfigError, match="FINETUNE_EPOCHS=-2"):
        Finetune(epochs=-2)


def test_features_are_matched_around_each_factored_layer_by_relative_error():
    teacher = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Conv2d(4, 4, 1), nn.Flatten())
    student = copy.deepcopy(teacher)
    student[0][0] = nn.Sequential(nn.Conv2d(3, 2, (3, 1)), nn.Conv2d(2, 4, (1, 3)))  # factored inside a block
    student[1] = nn.Sequential(nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1))  # factored at the top level
    assert feature_points(student, teacher) == ["0", "1"]
    assert feature_points(teacher, teacher) == []
    t = {"a": torch.ones(2, 3), "b": torch.full((1, 4), 2.0)}
    s = {"a": torch.zeros(2, 3), "b": torch.full((1, 4), 3.0)}
    # (6/6 + 4/16) / 2: each point's squared error relative to the teacher's energy, averaged
    assert feature_loss(s, t).item() == pytest.approx(0.625)


def test_a_run_of_removed_blocks_is_matched_at_its_end_alone():
    block = lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))  # noqa: E731
    teacher = nn.Sequential(nn.Sequential(block(), block(), block()), nn.Sequential(block(), block()))
    student = copy.deepcopy(teacher)
    student[0][0][1] = nn.Sequential(nn.Conv2d(4, 2, (3, 1)), nn.Conv2d(2, 4, (1, 3)))  # factored, then two removed
    for i in (1, 2):
        student[0][i][0] = Removed()
        student[0][i][1] = ConstantOutput(torch.zeros(1, 4, 1, 1), torch.ones(4), torch.zeros(4))
    student[1][0][0] = nn.Sequential(nn.Conv2d(4, 2, (3, 1)), nn.Conv2d(2, 4, (1, 3)))  # no removal follows it
    # "0.0" and "0.1" feed removed blocks: only the run's end, "0.2", is held to the teacher's features
    assert feature_points(student, teacher) == ["0.2", "1.0"]


def test_feature_distillation_is_recorded_and_still_learns(teacher):
    student = copy.deepcopy(teacher)
    student[0] = nn.Sequential(nn.Conv2d(3, 2, (3, 1), padding=(1, 0), bias=False), nn.Conv2d(2, 8, (1, 3), padding=(0, 1)))
    _, history = finetune(student, teacher, colour_data(512, 2), colour_data(300, 3), mean=(0.5,) * 3, std=(1.0,) * 3,
                          settings=Finetune(epochs=2, lr=1e-2, batch_size=32, feature_weight=1.0), progress=False)
    assert history["feature_points"] == ["0"]
    assert history["best_heldout_top1"] > history["start_heldout_top1"] + 0.2


def test_gradual_compression_tunes_at_each_intermediate_budget_then_the_last():
    torch.manual_seed(0)
    block = lambda: [nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]  # noqa: E731
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), *block(), *block(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(16, 3))
    train = colour_data(600, 4)
    spec = ModelSpec("colours", trained(net, train, steps=40, lr=0.02), (3, 8, 8), (0.5,) * 3, (1.0,) * 3)
    total = sum(c.macs for c in count(net, (3, 8, 8)).values())
    result = compress(spec, train, settings=Decomposition(budget="0.5", gradual=(0.8,)), progress=False, use_cache=False,
                      tuning=Finetune(epochs=3, step_epochs=1, lr=1e-2, batch_size=32), log=lambda _: None)
    tuned = result.finetune
    (step,) = tuned["steps"]
    assert step["budget"] == "macs:0.8" and step["macs_after"] <= 0.8 * total
    assert step["best_epoch"] == 1  # a step keeps its last epoch: the next one starts from where training went
    assert [e["budget"] for e in tuned["epochs"]] == ["macs:0.8", "macs:0.5", "macs:0.5"]
    assert result.plan.macs_after <= 0.5 * total and result.allocation["budget"] == "macs:0.5"
    for model in (result.one_shot, result.model):  # both at the budget: straight from dense, and by steps
        assert sum(c.macs for c in count(model, (3, 8, 8)).values()) <= 0.5 * total
    assert len(result.seconds["steps"]) == 2 and tuned["best_heldout_top1"] > 0.9


@pytest.mark.parametrize("change,words", [
    ({"gradual": (0.5, 0.7)}, "expected falling fractions in \\(0, 1\\)"),
    ({"gradual": (0.3,)}, "must stay above the budget 0.35"),
    ({"budget": ""}, "needs a budget to end at"),
    ({"epochs": 4}, "4 fine-tuning epochs for 2 intermediate budgets of 2 epochs each; expected more than 4"),
])
def test_gradual_schedules_that_cannot_run_are_refused(change, words):
    profile = load_target("rpi4").override(decomposition={"budget": "0.35", "gradual": [0.7, 0.5]},
                                           finetune={"epochs": 10, "step_epochs": 2})
    section = "finetune" if "epochs" in change else "decomposition"
    with pytest.raises(ConfigError, match=words):
        profile.override(**{section: change})


def test_keep_last_returns_the_last_epoch_even_when_no_epoch_beat_the_start(teacher):
    data, heldout = colour_data(256, 2), colour_data(200, 3)
    settings = Finetune(epochs=2, lr=0.05, batch_size=32)  # the teacher is its own student: no epoch can beat the start
    best, history = finetune(teacher, teacher, data, heldout, mean=(0.5,) * 3, std=(1.0,) * 3, settings=settings,
                             progress=False)
    assert history["best_epoch"] == 0 and all(torch.equal(v, teacher.state_dict()[k]) for k, v in best.state_dict().items())
    last, history = finetune(teacher, teacher, data, heldout, mean=(0.5,) * 3, std=(1.0,) * 3, settings=settings,
                             progress=False, keep="last")
    assert history["best_epoch"] == 2 and history["kept"] == "last"
    assert history["best_heldout_top1"] == history["epochs"][-1]["heldout_top1"]
    assert not torch.equal(last[0].weight, teacher[0].weight)
    with pytest.raises(ConfigError, match="Unknown keep 'first'; known: best, last"):
        finetune(teacher, teacher, data, heldout, mean=(0.5,) * 3, std=(1.0,) * 3, settings=settings, keep="first")


def test_compress_refuses_a_gradual_schedule_without_a_budget_before_any_work(teacher):
    spec = ModelSpec("colours", teacher, (3, 8, 8), (0.5,) * 3, (1.0,) * 3)
    with pytest.raises(ConfigError, match=r"gradual \[0.8\] needs a budget to end at"):
        compress(spec, colour_data(100, 5), settings=Decomposition(gradual=(0.8,)), tuning=Finetune(epochs=3),
                 progress=False, log=lambda _: None)


# Weights digest and per-epoch losses of two fine-tunes, recorded with the code before it learnt devices (this
# host's x86 CPU, the suite's 2 torch threads): the CPU path must reproduce them bit for bit.
GOLDEN_FROZEN = ("cf6311b2244ec5c9", [4.64548, 1.22601])
GOLDEN_REESTIMATE = ("7ee73dc5b0f7b4e8", [11.58384, 6.68275])


def weights_digest(model: nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("bn,mixup,feature_weight,expected", [
    ("frozen", 0.0, 0.0, GOLDEN_FROZEN),
    ("reestimate", 0.2, 1.0, GOLDEN_REESTIMATE),
])
def test_a_cpu_fine_tune_is_byte_identical_to_before_the_device_work(teacher, bn, mixup, feature_weight, expected):
    """Recorded before fine-tuning learnt to run on a CUDA device: on the CPU nothing may change, bit for bit."""
    settings = Finetune(epochs=2, lr=1e-2, batch_size=32, weight_decay=0.0, temperature=4.0, alpha=0.9,
                        feature_weight=feature_weight, bn=bn, optimizer="adamw", step_epochs=2, ema_decay=0.0,
                        mixup=mixup, seed=0, heldout_samples=300)
    tuned, history = finetune(damaged(teacher), teacher, colour_data(512, 2), colour_data(300, 3), mean=(0.5,) * 3,
                              std=(1.0,) * 3, settings=settings, progress=False)
    assert (weights_digest(tuned), [e["loss"] for e in history["epochs"]]) == expected


def test_a_model_with_its_batchnorms_folded_trains_with_them_given_back_and_comes_back_folded():
    torch.manual_seed(0)
    block = lambda: [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]  # noqa: E731  (a converter's conv: bias, no BN)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), *block(), *block(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(16, 3))
    train = colour_data(600, 4)
    spec = ModelSpec("folded", trained(net, train, steps=40, lr=0.02), (3, 8, 8), (0.5,) * 3, (1.0,) * 3)
    result = compress(spec, train, settings=Decomposition(method="svd", rank="4"), progress=False, use_cache=False,
                      tuning=Finetune(epochs=1, lr=1e-2, batch_size=32, bn="reestimate"), log=lambda _: None)
    assert [p.name for p in result.plan.layers if p.method] == ["2", "4"]
    # every conv gets one (the stem too: it trains), the classifier is not a conv
    assert result.finetune["restored_batchnorms"] == ["0", "2", "4"]
    assert result.model.state_dict().keys() == result.one_shot.state_dict().keys()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert result.finetune["best_heldout_top1"] >= result.finetune["start_heldout_top1"]
    from pipeline.report.deploy_report import tuning_sentence

    assert "BatchNorm reestimate, adamw, a BatchNorm for each of 3 convs without one, folded in after" in tuning_sentence(result.finetune)

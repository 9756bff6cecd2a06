"""A teacher of the user's (TEACHER=): fed its own normalisation, refused when it reads other images or answers in
other classes, and the one fine-tuning actually learns from."""

import dataclasses

import pytest
import torch
from test_finetune import colour_data, trained
from torch import nn

from pipeline.compress.stage import compress
from pipeline.compress.teacher import Renormalised, as_teacher
from pipeline.deploy import deploy
from pipeline.errors import ConfigError, InputError
from pipeline.report.deploy_report import tuning_sentence
from pipeline.zoo import ModelSpec
from targets import Decomposition, Finetune


def three_convs() -> nn.Module:
    block = lambda: [nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]  # noqa: E731
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), *block(), *block(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 3))


class Rolled(nn.Module):
    """A teacher that calls class c what the wrapped one calls class c + 1: wrong on every image it knows."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return torch.roll(self.module(x), 1, dims=1)


@pytest.fixture(scope="module")
def data():
    return colour_data(600, 4)


@pytest.fixture(scope="module")
def net(data):
    torch.manual_seed(0)
    return trained(three_convs(), data, steps=40, lr=0.02)  # inputs: pixels / 255 - 0.5


def test_a_teacher_of_another_normalisation_sees_the_pixels_the_student_sees(net):
    pixels = torch.rand(4, 3, 8, 8)
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.25, 1.0)
    student = ModelSpec("student", net, (3, 8, 8), mean, std)
    judge = as_teacher(ModelSpec("teacher", net, (3, 8, 8), (0.5,), (1.0,)), student)  # one value for every channel
    assert isinstance(judge, Renormalised)
    as_student_sees = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(judge(as_student_sees), net(pixels - 0.5), atol=1e-5)
    # the same normalisation: the teacher's own module, nothing in between
    assert as_teacher(ModelSpec("teacher", net, (3, 8, 8), (0.5,) * 3, (1.0,) * 3),
                      ModelSpec("student", net, (3, 8, 8), (0.5,), (1.0,))) is net


@pytest.mark.parametrize("teacher,words", [
    (dict(input_shape=(3, 16, 16)), r"TEACHER=teacher takes inputs of 3x16x16 \(C x H x W\); the model 'student' takes "
                                    r"3x8x8: a teacher must read the same images"),
    (dict(module=nn.Sequential(three_convs(), nn.Linear(3, 5))), r"TEACHER=teacher answers in 5 classes; the model "
                                                                 r"'student' in 3"),
    (dict(class_names=("red", "blue", "green")), r"names its classes red, blue, green; the model 'student' red, "
                                                 r"green, blue"),
])
def test_a_teacher_of_other_images_or_classes_is_refused(net, teacher, words):
    student = ModelSpec("student", net, (3, 8, 8), (0.5,), (1.0,), class_names=("red", "green", "blue"))
    given = {"module": net, "input_shape": (3, 8, 8), **teacher}
    with pytest.raises(InputError, match=words):
        as_teacher(ModelSpec("teacher", given["module"], given["input_shape"], (0.5,), (1.0,),
                             class_names=given.get("class_names")), student)


def test_fine_tuning_learns_from_the_teacher_it_is_given(net, data):
    """A right teacher and a wrong one (every class moved by one): what the student learns follows the teacher, and
    the report names it with its own held-out top-1."""
    spec = ModelSpec("colours", net, (3, 8, 8), (0.5,) * 3, (1.0,) * 3)
    tuning = Finetune(epochs=2, lr=2e-2, batch_size=32, alpha=1.0, heldout_samples=200)
    results = {}
    for name, module in (("right", net), ("wrong", Rolled(net))):
        teacher = ModelSpec(name, module, (3, 8, 8), (0.5,) * 3, (1.0,) * 3)
        results[name] = compress(spec, data, settings=Decomposition(method="svd", rank="2"), tuning=tuning,
                                 teacher=teacher, progress=False, use_cache=False, log=lambda _: None).finetune
    right, wrong = results["right"], results["wrong"]
    assert right["feature_points"] == []  # blocks are matched to the dense model's, not another net's
    assert right["teacher"] == {"model": "right", "weights_sha256": None, "dense_model": False}
    assert right["teacher_heldout_top1"] > 0.9 and wrong["teacher_heldout_top1"] < 0.1
    assert right["epochs"][-1]["heldout_top1"] > 0.9 and wrong["epochs"][-1]["heldout_top1"] < 0.5
    dense = compress(spec, data, settings=Decomposition(method="svd", rank="2"),
                     tuning=dataclasses.replace(tuning, epochs=1), progress=False, use_cache=False,
                     log=lambda _: None).finetune
    assert dense["teacher"] == {"model": "colours", "weights_sha256": None, "dense_model": True}
    assert f"by distillation from right (held-out top-1 {right['teacher_heldout_top1']:.2%}) (" in tuning_sentence(right)
    assert "by distillation (" in tuning_sentence(dense)


@pytest.mark.parametrize("given,words", [
    (dict(teacher="resnet56", finetune_epochs=0), r"TEACHER=resnet56 is what fine-tuning distils from, and "
                                                  r"FINETUNE_EPOCHS is 0 in rpi4"),
    (dict(teacher_weights="r56.th", finetune_epochs=2), r"TEACHER_WEIGHTS=r56.th without TEACHER="),
])
def test_a_teacher_without_fine_tuning_or_weights_without_a_teacher_are_refused_before_any_work(tmp_path, given,
                                                                                                 words):
    with pytest.raises(ConfigError, match=words):
        deploy(target="rpi4", model="resnet8", out=tmp_path / "out", **given)
    assert not list(tmp_path.iterdir())


def test_the_cli_refuses_teacher_weights_without_a_teacher(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["decompose", "--teacher-weights", "r56.th", "--out", str(tmp_path / "f.pt")]) == 2
    assert "TEACHER_WEIGHTS=r56.th without TEACHER=" in capsys.readouterr().err and not list(tmp_path.iterdir())

"""BatchNorm given back to folded layers for fine-tuning: only where none normalises the output, the identity when
added, folded back exactly, and the model after it has the converter's shape again."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from calib import Dataset
from pipeline.compress.restored_norms import (
    fine_tune_with_norms,
    fold_norms,
    restore_norms,
    unnormalised_layers,
)


class Folded(nn.Module):
    """What a converter leaves: convs with biases and no BatchNorm, a factored chain among them, and one conv
    that does keep its BatchNorm, and one without a bias."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.chain = nn.Sequential(nn.Conv2d(8, 4, (3, 1), padding=(1, 0), bias=False),
                                   nn.Conv2d(4, 8, (1, 3), padding=(0, 1)))
        self.normed = nn.Conv2d(8, 8, 1)
        self.norm = nn.BatchNorm2d(8)
        self.no_bias = nn.Conv2d(8, 8, 1, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.chain(x)) + x
        x = torch.relu(self.norm(self.normed(x)))
        return self.head(self.no_bias(x).mean((2, 3)))


NAMES = ["stem", "chain", "normed", "no_bias", "head"]


def _images(n: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 6, 6)).astype(np.float32)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = Folded().eval()
    model.norm.running_mean.uniform_(-1, 1)
    model.norm.running_var.uniform_(0.5, 2)
    return model


def test_only_layers_no_batchnorm_takes_are_found():
    # `normed` feeds a BatchNorm, `no_bias` has no bias to fold into, `head` is not a conv
    assert unnormalised_layers(_model(), NAMES, torch.from_numpy(_images(4))) == ["stem", "chain"]


def test_restored_batchnorm_is_the_identity_and_folds_back_exactly():
    model, x = _model(), _images()
    before = model(torch.from_numpy(x)).detach()
    restored = copy.deepcopy(model)
    restore_norms(restored, ["stem", "chain"], x)
    assert isinstance(restored.chain[-1], nn.BatchNorm2d) and isinstance(restored.stem.restored_norm, nn.BatchNorm2d)
    torch.testing.assert_close(restored(torch.from_numpy(x)).detach(), before, atol=1e-5, rtol=1e-5)

    # training moves the BatchNorms: their statistics and affine weights no longer cancel
    with torch.no_grad():
        for norm in (restored.stem.restored_norm, restored.chain[-1]):
            norm.weight.mul_(torch.linspace(0.5, 1.5, 8))
            norm.bias.add_(0.3)
            norm.running_mean.mul_(0.9)
    copied = copy.deepcopy(restored)  # a copy runs its own BatchNorms (fine-tuning copies the student)
    copied.stem.restored_norm.bias.data.add_(5.0)
    assert not torch.allclose(copied(torch.from_numpy(x)), restored(torch.from_numpy(x)))
    trained = restored(torch.from_numpy(x)).detach()
    assert not torch.allclose(trained, before, atol=1e-3)

    fold_norms(restored, ["stem", "chain"])
    torch.testing.assert_close(restored(torch.from_numpy(x)).detach(), trained, atol=1e-5, rtol=1e-5)
    assert restored.state_dict().keys() == model.state_dict().keys()  # the converter's shape again
    assert not restored.stem._forward_hooks and len(restored.chain) == 2


def _data(n: int = 32) -> Dataset:
    rng = np.random.default_rng(1)
    return Dataset(rng.integers(0, 256, (n, 6, 6, 3)).astype(np.uint8), rng.integers(0, 3, n), "noise")


@pytest.mark.parametrize("bn, expected", [("reestimate", ["stem", "chain"]), ("frozen", [])])
def test_fine_tuning_sees_the_batchnorms_and_gets_the_folded_model(bn, expected):
    seen = {}

    def tune(student, *, settings):  # stands for fine-tuning: shifts every restored BatchNorm's bias
        seen["norms"] = sum(isinstance(m, nn.BatchNorm2d) for m in student.modules())
        trained = copy.deepcopy(student)
        with torch.no_grad():
            for module in trained.modules():
                if isinstance(module, nn.BatchNorm2d) and module is not trained.norm:
                    module.bias.add_(settings)
        return trained, {"epochs": []}

    model = _model()
    tuned, history = fine_tune_with_norms(tune, model, names=NAMES, train_set=_data(), mean=0.5, std=0.25, bn=bn,
                                          settings=0.5)
    assert history["restored_batchnorms"] == expected
    assert seen["norms"] == 1 + len(expected)
    assert tuned.state_dict().keys() == model.state_dict().keys()
    shifted = 0.5 * (len(expected) > 0)  # a bias shift folds into the conv's bias
    torch.testing.assert_close(tuned.stem.bias.detach(), model.stem.bias.detach() + shifted)
    assert len(model.chain) == 2 and not hasattr(model.stem, "restored_norm")  # the student is left as it was

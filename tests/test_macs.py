from torch import nn

from pipeline.compress.budget.macs import count, totals
from pipeline.zoo import load_model
from pipeline.zoo.nets import CifarResNet, SeedNet


def test_seednet_macs_and_params_match_the_founding_document():
    # conv1 6*28*28*3*25 = 352,800; conv2 16*10*10*6*25 = 240,000; fc 48,000 + 10,080 + 840
    assert totals(SeedNet(), (3, 32, 32)) == (651_720, 62_006)
    costs = count(SeedNet(), (3, 32, 32))
    assert [c.macs for c in costs.values()] == [352_800, 240_000, 48_000, 10_080, 840]


def test_conv_macs_hand_checked_for_stride_padding_groups_dilation():
    # 8 x 8 x 8 outputs, each 3 * 3 * 3 taps
    assert count(nn.Conv2d(3, 8, 3, stride=2, padding=1), (3, 16, 16))[""].macs == 8 * 8 * 8 * 27
    # groups=4: each output sees 8/4 = 2 input channels; 'same' keeps 10 x 10
    assert count(nn.Conv2d(8, 12, 3, padding="same", groups=4), (8, 10, 10))[""].macs == 12 * 100 * 2 * 9
    # dilation 2 on a 3x3: effective 5x5, 12 - 4 = 8 outputs per axis
    assert count(nn.Conv2d(2, 4, 3, dilation=2), (2, 12, 12))[""].macs == 4 * 64 * 2 * 9
    assert count(nn.Linear(30, 7), (30,))[""].macs == 210


def test_resnet_macs_are_the_published_figures():
    assert totals(CifarResNet(20), (3, 32, 32)) == (40_551_040, 269_722)
    assert totals(CifarResNet(56), (3, 32, 32))[1] == 853_018


def test_seednet_reference_weights_ship_with_the_package():
    spec = load_model("seednet")
    assert spec.weights_sha256 and len(spec.weights_sha256) == 64
    assert spec.input_shape == (3, 32, 32)

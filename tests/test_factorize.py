"""Every factorisation at full rank computes the layer it replaces, across conv geometries."""

import numpy as np
import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.compress.methods import METHODS

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def convs(draw):
    cin, cout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)),
                             st.sampled_from(["same", "valid"])))
    stride = 1 if padding == "same" else draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    bias = draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    size = max(kernel[0] * dilation[0], kernel[1] * dilation[1]) + draw(st.integers(0, 5))
    return conv, torch.randn(2, cin, size, size + draw(st.integers(0, 3)))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(b.norm(), 1e-12))


@pytest.mark.parametrize("method", ["svd", "channel-svd", "slice-svd", "tucker2"])
@FAST
@given(case=convs())
def test_full_rank_factorisation_reproduces_the_conv(method, case):
    conv, x = case
    chain = METHODS[method].skeleton(conv, METHODS[method].max_ranks(conv))
    approx, _ = METHODS[method].fit_weights(conv, chain)
    with torch.no_grad():
        assert relative(chain(x), conv(x)) < 1e-4
    assert relative(approx, conv.weight.detach()) < 1e-5


@st.composite
def depthwise_convs(draw):
    """Depthwise kxk convs (channel multiplier 1 or 2), with the geometries of the `convs` strategy."""
    conv, _ = draw(convs())
    assume(min(conv.kernel_size) > 1)
    cin = draw(st.integers(2, 6))  # one channel is an ordinary conv
    multiplier = draw(st.integers(1, 2))
    depthwise = nn.Conv2d(cin, cin * multiplier, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                          dilation=conv.dilation, groups=cin, bias=conv.bias is not None)
    size = max(k * d for k, d in zip(conv.kernel_size, conv.dilation, strict=True)) + draw(st.integers(0, 5))
    return depthwise, torch.randn(2, cin, size, size + draw(st.integers(0, 3)))


@FAST
@given(case=depthwise_convs())
def test_full_rank_depthwise_split_reproduces_the_depthwise_conv(case):
    conv, x = case
    method = METHODS["depthwise-split"]
    assert method.applies(conv) and not METHODS["svd"].applies(conv)
    chain = method.skeleton(conv, (min(conv.kernel_size),))  # full rank; deploys offer rank 1 only
    approx, _ = method.fit_weights(conv, chain)
    with torch.no_grad():
        assert relative(chain(x), conv(x)) < 1e-4
    assert relative(approx, conv.weight.detach()) < 1e-5
    assert relative(method.effective_weight(chain, conv), conv.weight.detach()) < 1e-5


def test_depthwise_split_at_rank_one_is_the_best_separable_filter():
    """Rank 1 keeps each channel's leading singular pair: a separable filter comes back exactly, and the
    error of any other is its second singular value's share (Eckart-Young, per channel)."""
    conv = nn.Conv2d(2, 2, 3, padding=1, groups=2, bias=False)
    separable = torch.outer(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 0.0, -1.0]))  # Sobel
    other = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])  # Laplacian, not separable
    conv.weight.data = torch.stack([separable, other])[:, None]
    chain = METHODS["depthwise-split"].skeleton(conv, (1,))
    approx, _ = METHODS["depthwise-split"].fit_weights(conv, chain)
    assert torch.allclose(approx[0, 0], separable, atol=1e-6)
    s = torch.linalg.svdvals(other.double())
    assert float((approx[1, 0] - other).norm()) == pytest.approx(float(s[1:].norm()), rel=1e-6)


@FAST
@given(case=convs())
def test_full_rank_pointwise_svd_reproduces_the_1x1_conv(case):
    conv, x = case
    pointwise = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=conv.bias is not None)
    method = METHODS["pointwise-svd"]
    chain = method.skeleton(pointwise, method.max_ranks(pointwise))
    method.fit_weights(pointwise, chain)
    with torch.no_grad():
        assert relative(chain(x), pointwise(x)) < 1e-4
    assert not method.applies(conv) or conv.kernel_size == (1, 1)


@FAST
@given(case=convs(), rank=st.integers(1, 4))
def test_cp_chain_computes_the_conv_of_its_reconstructed_weight(case, rank):
    conv, x = case
    assume(rank <= min(conv.weight.shape))  # a larger CP rank is degenerate for ALS (decompose falls back)
    chain = METHODS["cp"].skeleton(conv, (rank,))
    approx, _ = METHODS["cp"].fit_weights(conv, chain)
    with torch.no_grad():
        expected = F.conv2d(x, approx, conv.bias, conv.stride, conv.padding, conv.dilation)
        assert relative(chain(x), expected) < 1e-4


@pytest.mark.parametrize("shape,rank,seed", [((8, 6, 3, 3), 2, 0), ((16, 16, 3, 3), 4, 1), ((6, 3, 5, 5), 3, 2)])
def test_cp_recovers_a_conv_of_exactly_that_cp_rank(shape, rank, seed):
    rng = np.random.default_rng(seed)
    weight = tl.cp_to_tensor((np.ones(rank), [rng.normal(size=(d, rank)) for d in shape]))
    conv = nn.Conv2d(shape[1], shape[0], shape[2:], padding=1, bias=True)
    conv.weight.data = torch.tensor(weight, dtype=torch.float32)
    chain = METHODS["cp"].skeleton(conv, (rank,))
    METHODS["cp"].fit_weights(conv, chain)
    x = torch.randn(2, shape[1], 9, 9)
    with torch.no_grad():
        assert relative(chain(x), conv(x)) < 1e-4


@given(inp=st.integers(1, 12), out=st.integers(1, 12), bias=st.booleans())
@FAST
def test_full_rank_linear_svd_reproduces_the_layer(inp, out, bias):
    layer = nn.Linear(inp, out, bias=bias)
    svd = METHODS["linear-svd"]
    chain = svd.skeleton(layer, svd.max_ranks(layer))
    svd.fit_weights(layer, chain)
    x = torch.randn(5, inp)
    with torch.no_grad():
        assert relative(chain(x), layer(x)) < 1e-4


def test_truncation_error_is_the_discarded_spectrum():
    layer = nn.Linear(6, 6, bias=False)
    u, _, vt = torch.linalg.svd(torch.randn(6, 6))
    layer.weight.data = u @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.1])) @ vt
    chain = METHODS["linear-svd"].skeleton(layer, (3,))
    approx, _ = METHODS["linear-svd"].fit_weights(layer, chain)
    expected = np.sqrt(1 + 0.25 + 0.01) / np.sqrt(16 + 9 + 4 + 1 + 0.25 + 0.01)
    assert relative(approx, layer.weight.detach()) == pytest.approx(expected, rel=1e-4)

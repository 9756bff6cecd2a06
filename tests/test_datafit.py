"""Data-aware factors: exact where the data allow it, better than weight-space truncation where they do not."""

import pytest
import torch
from helpers import plain
from torch import nn

from pipeline.compress import datafit
from pipeline.compress.decompose import decompose, fit_chain
from pipeline.compress.methods import METHODS


def low_dim_inputs(channels: int, dims: int, n: int = 64, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Images whose channels all lie in a `dims`-dimensional subspace, as real feature maps nearly do."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, dims, size, size, generator=g)
    mixing = torch.randn(channels, dims, generator=g)
    return torch.einsum("cd,ndhw->nchw", mixing, latent)


def outputs(layer, x):
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("method,ranks", [("tucker2", (24, 16)), ("svd", (48,)), ("channel-svd", (24,))])
def test_full_rank_data_aware_chains_reproduce_the_layer(method, ranks):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, stride=(1, 2))
    x = torch.randn(32, 16, 10, 10)
    chain, _, _ = fit_chain(conv, METHODS[method], ranks, x=x, y=outputs(conv, x))
    assert datafit.output_error(chain, x, outputs(conv, x)) < 1e-4


def test_inputs_in_a_subspace_are_reproduced_exactly_at_that_rank_where_weight_truncation_fails():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
    x = low_dim_inputs(32, 6)
    y = outputs(conv, x)
    data_aware, _, _ = fit_chain(conv, METHODS["tucker2"], (32, 8), x=x, y=y)  # 8 >= the 6 input dimensions in use
    weight_space, _, _ = fit_chain(conv, METHODS["tucker2"], (32, 8))
    assert datafit.output_error(data_aware, x, y) < 1e-4
    assert datafit.output_error(weight_space, x, y) > 0.3


def test_channel_decomposition_reproduces_inputs_of_few_patch_dimensions_at_that_rank():
    """Inputs along one channel direction give 3x3 patches in 9 dimensions: the whitened fit is exact at rank 9,
    where truncating the weights alone misses most of the output."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
    x = low_dim_inputs(32, 1)
    y = outputs(conv, x)
    data_aware, _, _ = fit_chain(conv, METHODS["channel-svd"], (9,), x=x, y=y)
    weight_space, _, _ = fit_chain(conv, METHODS["channel-svd"], (9,))
    assert datafit.output_error(data_aware, x, y) < 1e-4
    assert datafit.output_error(weight_space, x, y) > 0.3


def test_linear_and_svd_data_aware_beat_weight_space_on_correlated_inputs():
    torch.manual_seed(0)
    fc = nn.Linear(40, 30)
    x = torch.randn(500, 5) @ torch.randn(5, 40) + 0.05 * torch.randn(500, 40)
    y = outputs(fc, x)
    da, _, _ = fit_chain(fc, METHODS["linear-svd"], (6,), x=x, y=y)
    ws, _, _ = fit_chain(fc, METHODS["linear-svd"], (6,))
    assert datafit.output_error(da, x, y) < 0.05 < datafit.output_error(ws, x, y)


def test_least_squares_refit_recovers_the_last_layer_and_its_bias():
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), nn.Conv2d(6, 5, (1, 3), padding=(0, 1)))
    x = torch.randn(16, 8, 6, 6)
    y = outputs(chain, x)
    target = [p.detach().clone() for p in chain[1].parameters()]
    nn.init.zeros_(chain[1].weight)
    nn.init.zeros_(chain[1].bias)
    datafit.refit_last(chain, x, y)
    for got, want in zip(chain[1].parameters(), target, strict=True):
        assert torch.allclose(got, want, atol=1e-3)  # the ridge shifts it slightly


def test_effective_weight_is_what_the_chain_computes():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 7, 3, padding=1, bias=False)
    x = torch.randn(4, 6, 9, 9)
    for method, ranks in (("tucker2", (3, 4)), ("svd", (5,)), ("channel-svd", (5,)), ("cp", (4,))):
        chain, fitted, _ = fit_chain(conv, METHODS[method], ranks)
        w = METHODS[method].effective_weight(chain, conv)
        assert torch.allclose(chain(x), nn.functional.conv2d(x, w, padding=1), atol=1e-4), method
        assert torch.allclose(w, fitted, atol=1e-4), method  # the weight the fit reports is the chain's


def test_decompose_with_calibration_records_output_errors_and_fits_layer_by_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 64, 10)).eval()
    x = torch.randn(64, 3, 8, 8)
    weight_model, _ = decompose(net, settings=plain(rank=0.5, exclude=("0", "6")), input_shape=(3, 8, 8), progress=False)
    data_model, plan = decompose(net, settings=plain(rank=0.5, exclude=("0", "6")), input_shape=(3, 8, 8), progress=False, calibration=x.numpy())
    errors = {p.name: p.output_error for p in plan.layers}
    assert errors["0"] is None and errors["2"] is not None and errors["4"] is not None
    with torch.no_grad():
        dense, by_data, by_weight = net(x), data_model(x), weight_model(x)
    assert (by_data - dense).norm() < 0.8 * (by_weight - dense).norm()


def test_fitted_factors_have_row_major_strides():
    """Odd strides on size-1 dims (a transposed 1x1 solution) make torch.export trace the batch through an
    as_strided gather that TFLite cannot run: every fitted weight is stored row-major."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 1)
    x = torch.randn(8, 64, 5, 5)
    for method in ("pointwise-svd", "tucker2"):
        ranks = (16,) if method == "pointwise-svd" else (16, 16)
        chain, _, _ = fit_chain(conv, METHODS[method], ranks, x=x, y=outputs(conv, x))
        for p in chain.parameters():
            assert p.stride() == torch.empty(p.shape).stride(), (method, p.shape, p.stride())

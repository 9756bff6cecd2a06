"""Low-rank factorisation methods: one registered class per method, turning one Conv2d or Linear layer into
a chain of standard layers.

Each method knows its chain's `skeleton` (layer shapes only, cheap, so MACs can be checked before any
fitting), the largest meaningful rank of each mode, the matrices whose spectra set its ranks, a fit to the
layer's weights, a fit to its output on real activations (see `datafit`) and the single weight the chain
computes. Strides, padding (numbers, tuples, 'same'/'valid') and dilation are split between the row and
column parts so the chain computes the same function as the layer at full rank. A new method is one class.
"""

import warnings
from typing import ClassVar

import numpy as np
import tensorly as tl
import torch
import torch.nn.functional as F
from tensorly.decomposition import parafac, partial_tucker
from torch import nn

from pipeline.compress import datafit
from pipeline.compress.ranks import RankRule, energy_cut, evbmf_rank, round_up, spectral_rank
from pipeline.errors import ConfigError, StageError, unknown

tl.set_backend("numpy")

METHODS: dict[str, "Method"] = {}


def register(cls: type["Method"]) -> type["Method"]:
    METHODS[cls.name] = cls()
    return cls


def _split_padding(conv: nn.Conv2d) -> tuple:
    """Padding for the (kh x 1) and (1 x kw) parts; 'same' stays 'same' since it pads each axis on its own."""
    if isinstance(conv.padding, str):
        return conv.padding, conv.padding
    ph, pw = conv.padding
    return (ph, 0), (0, pw)


def _rows_part(layer: nn.Conv2d, cin: int, cout: int, *, groups: int = 1) -> nn.Conv2d:
    """The (kh x 1) half of a separable split: the layer's vertical stride, padding and dilation."""
    (kh, _), (sh, _), (dh, _) = layer.kernel_size, layer.stride, layer.dilation
    return nn.Conv2d(cin, cout, (kh, 1), stride=(sh, 1), padding=_split_padding(layer)[0], dilation=(dh, 1),
                     groups=groups, bias=False)


def _columns_part(layer: nn.Conv2d, cin: int, cout: int, *, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """The (1 x kw) half of a separable split: the layer's horizontal stride, padding and dilation."""
    (_, kw), (_, sw), (_, dw) = layer.kernel_size, layer.stride, layer.dilation
    return nn.Conv2d(cin, cout, (1, kw), stride=(1, sw), padding=_split_padding(layer)[1], dilation=(1, dw),
                     groups=groups, bias=bias)


def _assign(module: nn.Module, weight: np.ndarray | torch.Tensor) -> None:
    module.weight.data = datafit.canonical(torch.as_tensor(np.ascontiguousarray(weight), dtype=torch.float32)
                                           .reshape(module.weight.shape))


def _truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(left, right, product): the rank-`rank` Eckart-Young approximation of `matrix` as left @ right, the
    singular values split evenly (square roots) so both factors have the same scale."""
    u, s, vt = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vt[:rank], (u[:, :rank] * s[:rank]) @ vt[:rank]


class Method:
    """One factorisation of one layer type. Subclasses set `name` and `layer_type` and fill in the rest."""

    name: ClassVar[str]
    layer_type: ClassVar[type[nn.Module]] = nn.Conv2d
    fits_activations: ClassVar[bool] = True  # whether `fit_data` has a closed-form output fit
    by_shape: ClassVar[bool] = False  # the only method for the layers it applies to: chosen by shape, never named
    channel_ranks: ClassVar[bool] = True  # ranks count channels, so they round to the kernels' multiple

    def applies(self, layer: nn.Module) -> bool:
        """Whether this method can factor `layer` (a full, non-grouped conv for the general conv methods)."""
        return type(layer) is nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros"

    def max_ranks(self, layer: nn.Module) -> tuple[int, ...]:
        raise NotImplementedError

    def unfoldings(self, layer: nn.Module) -> list[np.ndarray]:
        """The matrix (or matrices, one per mode) whose spectrum sets each rank."""
        raise NotImplementedError

    def spectral_ranks(self, layer: nn.Module, rule: RankRule) -> list[int]:
        """The ranks an 'evbmf' or 'energy' rule reads off the layer's spectra, one per mode."""
        return [spectral_rank(m, rule) for m in self.unfoldings(layer)]

    def choose_ranks(self, layer: nn.Module, rule: RankRule, *, round_to: int, name: str) -> tuple[int, ...]:
        """Ranks per mode: a fixed rank or a fraction of each maximum, or read off the layer's spectrum."""
        maxima = self.max_ranks(layer)
        if rule.kind == "fixed":
            if any(rule.value > m for m in maxima):
                raise ConfigError(f"Rank {int(rule.value)} for layer {name!r} ({self.name}); expected at most "
                                  f"{'x'.join(map(str, maxima))} there. Use a fraction (e.g. 0.5) for nets of mixed widths")
            raw = [int(rule.value)] * len(maxima)
        elif rule.kind == "ratio":
            raw = [max(1, round(rule.value * m)) for m in maxima]
        else:
            raw = self.spectral_ranks(layer, rule)
        step = round_to if self.channel_ranks else 1
        return tuple(round_up(r, step, m) for r, m in zip(raw, maxima, strict=True))

    def skeleton(self, layer: nn.Module, ranks: tuple[int, ...]) -> nn.Sequential:
        raise NotImplementedError

    def fit_weights(self, layer: nn.Module, chain: nn.Sequential, *, seed: int = 0) -> tuple[torch.Tensor, str]:
        """Fill `chain` from the layer's weights; return the weight it computes and a note ('' if none)."""
        approx, note = self._fit_weights(layer, chain, layer.weight.detach().double(), seed=seed)
        if layer.bias is not None:
            chain[-1].bias.data = layer.bias.detach().clone()
        return approx.float(), note

    def _fit_weights(self, layer, chain, w: torch.Tensor, *, seed: int) -> tuple[torch.Tensor, str]:
        raise NotImplementedError

    def fits_data(self, layer: nn.Module) -> bool:
        """Data-aware fitting needs numeric padding (unfold has no 'same')."""
        return self.fits_activations and not isinstance(getattr(layer, "padding", 0), str)

    def fit_data(self, layer: nn.Module, chain: nn.Sequential, x: torch.Tensor, y: torch.Tensor, *,
                 seed: int = 0) -> str:
        """Fill all factors but the last from the input activations `x`; `datafit.fit` then refits the last
        one to the dense output `y`. Returns a note ('' if none)."""
        raise NotImplementedError

    def effective_weight(self, chain: nn.Sequential, layer: nn.Module) -> torch.Tensor:
        """The single weight tensor a chain computes: the plan's relative weight error compares it with the
        layer's, and `collapse` puts it back in a dense layer (exact: only a chain's last factor has a bias)."""
        raise NotImplementedError


@register
class LinearSVD(Method):
    """Truncated SVD of a Linear layer: two Linear layers through r features (Eckart-Young; whitened by the
    input's second moment when fitted to data, Zhang et al. 2016)."""

    name = "linear-svd"
    layer_type = nn.Linear
    by_shape = True

    def applies(self, layer):
        return isinstance(layer, nn.Linear)

    def max_ranks(self, layer):
        return (min(layer.in_features, layer.out_features),)

    def unfoldings(self, layer):
        return [layer.weight.detach().double().numpy()]

    def skeleton(self, layer, ranks):
        (r,) = ranks
        return nn.Sequential(nn.Linear(layer.in_features, r, bias=False),
                             nn.Linear(r, layer.out_features, bias=layer.bias is not None))

    def _fit_weights(self, layer, chain, w, *, seed):
        left, right, approx = _truncated_svd(w, chain[0].out_features)
        _assign(chain[0], right)
        _assign(chain[1], left)
        return approx, ""

    def fits_data(self, layer):
        return True

    def fit_data(self, layer, chain, x, y, *, seed=0):
        moment = datafit.second_moment(datafit.sample_rows(x.reshape(-1, x.shape[-1]), seed=seed)[0])
        first, second = datafit.whitened_split(moment, layer.weight.detach().double().T, chain[0].out_features)
        datafit.set_weight(chain[0], first.T)
        datafit.set_weight(chain[1], second.T)
        return ""

    def effective_weight(self, chain, layer):
        w = [m.weight.detach().double() for m in chain]
        return (w[1] @ w[0]).float()


@register
class SpatialSVD(Method):
    """Spatial SVD across channels (Jaderberg et al. 2014): a kx1 conv to r channels, then a 1xk conv."""

    name = "svd"

    def max_ranks(self, layer):
        cout, cin, kh, kw = layer.weight.shape
        return (min(cin * kh, cout * kw),)

    def unfoldings(self, layer):
        w = layer.weight.detach().double().numpy()
        cout, cin, kh, kw = w.shape
        return [w.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)]

    def skeleton(self, layer, ranks):
        (r,) = ranks
        cout, cin = layer.weight.shape[:2]
        return nn.Sequential(_rows_part(layer, cin, r), _columns_part(layer, r, cout, bias=layer.bias is not None))

    def _fit_weights(self, layer, chain, w, *, seed):
        cout, cin, kh, kw = w.shape
        r = chain[0].out_channels
        left, right, _ = _truncated_svd(w.permute(1, 2, 0, 3).reshape(cin * kh, cout * kw), r)
        vertical = left.T.reshape(r, cin, kh, 1)
        horizontal = right.reshape(r, cout, kw).permute(1, 0, 2)
        _assign(chain[0], vertical)
        _assign(chain[1], horizontal)
        return torch.einsum("rci,orj->ocij", vertical[..., 0], horizontal), ""

    def fit_data(self, layer, chain, x, y, *, seed=0):
        w = layer.weight.detach().double()
        cout, cin, kh, kw = w.shape
        rows = datafit.patches(x, chain[0])  # the (kh x 1) receptive fields the first factor sees
        first, second = datafit.whitened_split(datafit.second_moment(datafit.sample_rows(rows, seed=seed)[0]),
                                               w.permute(1, 2, 0, 3).reshape(cin * kh, cout * kw), chain[0].out_channels)
        datafit.set_weight(chain[0], first.T.reshape(-1, cin, kh, 1))
        datafit.set_weight(chain[1], second.reshape(-1, cout, kw).permute(1, 0, 2))
        return ""

    def effective_weight(self, chain, layer):
        w = [m.weight.detach().double() for m in chain]
        return torch.einsum("rci,orj->ocij", w[0][..., 0], w[1][:, :, 0, :]).float()


@register
class ChannelSVD(Method):
    """Channel decomposition (Zhang et al. 2016, "Accelerating very deep convolutional networks for
    classification and detection"): a kxk conv to r channels, then a 1x1 conv. The truncated SVD of the
    (Cout, Cin*kh*kw) weight matrix, whitened by the input patches' second moment when fitted to data; the
    scheme of the published low-rank ResNet results (LC, TRP, HALOC)."""

    name = "channel-svd"

    def max_ranks(self, layer):
        cout, cin, kh, kw = layer.weight.shape
        return (min(cin * kh * kw, cout),)

    def unfoldings(self, layer):
        w = layer.weight.detach().double().numpy()
        return [w.reshape(w.shape[0], -1).T]

    def skeleton(self, layer, ranks):
        (r,) = ranks
        cout, cin = layer.weight.shape[:2]
        spatial = nn.Conv2d(cin, r, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                            dilation=layer.dilation, bias=False)
        return nn.Sequential(spatial, nn.Conv2d(r, cout, 1, bias=layer.bias is not None))

    def _fit_weights(self, layer, chain, w, *, seed):
        left, right, approx = _truncated_svd(w.reshape(w.shape[0], -1), chain[0].out_channels)
        _assign(chain[0], right)
        _assign(chain[1], left)
        return approx.reshape(w.shape), ""

    def fit_data(self, layer, chain, x, y, *, seed=0):
        w = layer.weight.detach().double()
        rows = datafit.patches(x, chain[0])  # the kxk receptive fields, in the weight's (Cin, kh, kw) order
        first, second = datafit.whitened_split(datafit.second_moment(datafit.sample_rows(rows, seed=seed)[0]),
                                               w.reshape(w.shape[0], -1).T, chain[0].out_channels)
        datafit.set_weight(chain[0], first.T)
        datafit.set_weight(chain[1], second.T)
        return ""

    def effective_weight(self, chain, layer):
        spatial, pointwise = (m.weight.detach().double() for m in chain)
        return torch.einsum("or,rcij->ocij", pointwise[:, :, 0, 0], spatial).float()


@register
class SliceSVD(Method):
    """The founding document's scheme: an SVD of every kxk slice of every (filter, input channel) pair, as a
    grouped kx1 conv, a channel shuffle and a grouped 1xk conv. One rank for every slice (the groups need one)."""

    name = "slice-svd"
    fits_activations = False  # its grouped last factor has no least-squares refit here
    channel_ranks = False  # a rank per kxk slice (at most k), not a channel count

    def max_ranks(self, layer):
        _, _, kh, kw = layer.weight.shape
        return (min(kh, kw),)

    def unfoldings(self, layer):
        w = layer.weight.detach().double().numpy()
        cout, cin, kh, kw = w.shape
        return [w.reshape(cout * cin, kh, kw)]  # a stack: one rank for all slices

    def spectral_ranks(self, layer, rule):
        """EVBMF on the slices' stacked rows (a shared noise model), or the energy kept across all slices."""
        stack = self.unfoldings(layer)[0]
        if rule.kind == "evbmf":
            return [evbmf_rank(stack.reshape(-1, stack.shape[-1]))]
        return [energy_cut((np.linalg.svd(stack, compute_uv=False) ** 2).sum(axis=0), rule.value)]

    def skeleton(self, layer, ranks):
        (r,) = ranks
        cout, cin = layer.weight.shape[:2]
        return nn.Sequential(
            _rows_part(layer, cin, cin * cout * r, groups=cin),
            nn.ChannelShuffle(cin),  # (c, o, k) channel order -> (o, k, c), so the row filters group by output
            _columns_part(layer, cin * cout * r, cout, groups=cout, bias=layer.bias is not None),
        )

    def _fit_weights(self, layer, chain, w, *, seed):
        cout, cin, kh, kw = w.shape
        r = chain[0].out_channels // (cin * cout)
        u, s, vt = torch.linalg.svd(w, full_matrices=False)  # batched over (o, c)
        root = s[..., :r].sqrt()
        columns = u[..., :, :r] * root[..., None, :]  # o, c, i, k
        rows = root[..., :, None] * vt[..., :r, :]  # o, c, k, j
        _assign(chain[0], columns.permute(1, 0, 3, 2))  # channel (c, o, k), taps i
        _assign(chain[2], rows.permute(0, 2, 1, 3))  # output o, input channel (k, c), taps j
        return torch.einsum("ocik,ockj->ocij", columns, rows), ""

    def effective_weight(self, chain, layer):
        cout, cin = layer.weight.shape[:2]
        columns = chain[0].weight.detach().double()[:, 0, :, 0].reshape(cin, cout, -1, chain[0].kernel_size[0])  # c, o, k, i
        rows = chain[2].weight.detach().double()[:, :, 0, :].reshape(cout, -1, cin, chain[2].kernel_size[1])  # o, k, c, j
        return torch.einsum("coki,okcj->ocij", columns, rows).float()


@register
class PointwiseSVD(SpatialSVD):
    """Truncated SVD of a 1x1 conv: two thinner 1x1 convs through r channels (the spatial SVD's algebra at
    k = 1, whitened by the input channels' second moment when fitted to data, Zhang et al. 2016). The only
    method that pays on the pointwise convs of MobileNets and DS-CNNs: Tucker-2 or CP of a 1x1 conv add a layer."""

    name = "pointwise-svd"
    by_shape = True

    def applies(self, layer):
        return super().applies(layer) and tuple(layer.kernel_size) == (1, 1)


@register
class DepthwiseSplit(SliceSVD):
    """A depthwise kxk conv as a kx1 depthwise conv then a 1xk one, from the SVD of each channel's filter
    (separable filters, Sironi et al. 2013; the founding document's per-slice SVD with one input per group).
    At rank r it costs 2rk multiplies per output pixel against k^2, so rank 1 pays at stride 1 (3x3: 6 vs 9);
    rank 1 is the one offered."""

    name = "depthwise-split"
    by_shape = True

    def max_ranks(self, layer):
        # the skeleton takes any rank up to k, but above 1 its 1xk part is a grouped conv, which TFLite Micro
        # cannot run, and 3x3 filters save nothing there (2rk >= k^2)
        return (1,)

    def choose_ranks(self, layer, rule, *, round_to, name):
        """A fixed rank or fraction gives rank 1; a spectral rule gives the rank the filters need, which may
        exceed the 1 offered: the layer then stays dense, saying so."""
        if rule.kind in ("fixed", "ratio"):
            return (1,)
        return tuple(self.spectral_ranks(layer, rule))

    def applies(self, layer):
        return (type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and layer.groups > 1
                and layer.groups == layer.in_channels and layer.out_channels % layer.groups == 0
                and min(layer.kernel_size) > 1)

    def skeleton(self, layer, ranks):
        (r,) = ranks
        cout, cin = layer.out_channels, layer.in_channels
        # each input channel makes r row-filtered maps per output channel it feeds; each output sums its r maps
        return nn.Sequential(_rows_part(layer, cin, cout * r, groups=cin),
                             _columns_part(layer, cout * r, cout, groups=cout, bias=layer.bias is not None))

    def _fit_weights(self, layer, chain, w, *, seed):
        r = chain[0].out_channels // layer.out_channels
        u, s, vt = torch.linalg.svd(w[:, 0], full_matrices=False)  # batched over output channels
        root = s[:, :r].sqrt()
        columns = u[:, :, :r] * root[:, None, :]  # o, i, k
        rows = root[:, :, None] * vt[:, :r, :]  # o, k, j
        _assign(chain[0], columns.permute(0, 2, 1).reshape(-1, 1, w.shape[2], 1))  # channel (o, k), taps i
        _assign(chain[1], rows[:, :, None, :])  # output o, its r maps, taps j
        return torch.einsum("oik,okj->oij", columns, rows)[:, None], ""

    def effective_weight(self, chain, layer):
        cout = layer.out_channels
        r = chain[0].out_channels // cout
        columns = chain[0].weight.detach().double()[:, 0, :, 0].reshape(cout, r, -1)  # o, k, i
        rows = chain[1].weight.detach().double()[:, :, 0, :]  # o, k, j
        return torch.einsum("oki,okj->oij", columns, rows)[:, None].float()


@register
class CP(Method):
    """CP decomposition (Lebedev et al. 2015): 1x1 -> kx1 depthwise -> 1xk depthwise -> 1x1, by tensorly's
    CP-ALS. One CP rank, from the larger of the two unfolding ranks."""

    name = "cp"

    def max_ranks(self, layer):
        dims = sorted(layer.weight.shape)  # CP rank never exceeds the product of all modes but the largest
        return (dims[0] * dims[1] * dims[2],)

    def unfoldings(self, layer):
        return _channel_unfoldings(layer)

    def spectral_ranks(self, layer, rule):
        return [max(super().spectral_ranks(layer, rule))]

    def skeleton(self, layer, ranks):
        (r,) = ranks
        cout, cin = layer.weight.shape[:2]
        return nn.Sequential(nn.Conv2d(cin, r, 1, bias=False), _rows_part(layer, r, r, groups=r),
                             _columns_part(layer, r, r, groups=r), nn.Conv2d(r, cout, 1, bias=layer.bias is not None))

    def _fit_weights(self, layer, chain, w, *, seed):
        """CP-ALS from an SVD start; on NaN, inf or divergence retry from a random start, then give up."""
        r = chain[0].out_channels
        tensor = w.numpy()
        norm = np.linalg.norm(tensor)
        tried = []
        # an SVD start needs the rank within every mode; beyond that only a random start is defined
        inits = ("svd", "random") if r <= min(tensor.shape) else ("random",)
        for init in inits:
            try:
                with warnings.catch_warnings(), np.errstate(all="ignore"):
                    warnings.simplefilter("ignore")
                    weights, factors = parafac(tensor, rank=r, init=init, n_iter_max=300, tol=1e-7,
                                               random_state=seed, normalize_factors=True)
                approx = tl.cp_to_tensor((weights, factors))
            except (ValueError, np.linalg.LinAlgError) as exc:  # tensorly's ALS on degenerate modes
                tried.append(f"{init} init failed ({exc})")
                continue
            error = np.linalg.norm(approx - tensor) / norm if norm else 0.0
            if np.isfinite(error) and all(np.isfinite(f).all() for f in factors) and error < 1.0:
                break
            tried.append(f"{init} init gave {'NaN/inf' if not np.isfinite(error) else f'relative error {error:.2f}'}")
        else:
            raise StageError("CP-ALS failed: " + "; ".join(tried))
        # spread each component's weight evenly over its four factors so no int8 activation range is dominated
        share = np.abs(weights) ** 0.25
        sign = np.sign(weights)
        out_f, in_f, h_f, w_f = (f * share for f in factors)
        _assign(chain[0], in_f.T)
        _assign(chain[1], h_f.T)
        _assign(chain[2], w_f.T)
        _assign(chain[3], out_f * sign)
        return torch.from_numpy(approx), f"CP-ALS retried ({tried[0]})" if tried else ""

    def fit_data(self, layer, chain, x, y, *, seed=0):
        return self.fit_weights(layer, chain, seed=seed)[1]  # CP-ALS has no closed-form whitened variant

    def effective_weight(self, chain, layer):
        w = [m.weight.detach().double() for m in chain]
        return torch.einsum("or,ri,rj,rc->ocij", w[3][..., 0, 0], w[1][:, 0, :, 0], w[2][:, 0, 0, :],
                            w[0][..., 0, 0]).float()


@register
class Tucker2(Method):
    """Tucker-2 (Kim et al. 2016): 1x1 -> kxk core -> 1x1, by tensorly's partial_tucker; fitted to data, the
    output basis comes from the core's actual outputs and the core is refitted to the dense output."""

    name = "tucker2"

    def max_ranks(self, layer):
        cout, cin, kh, kw = layer.weight.shape  # beyond the rank of each unfolding a factor has nothing to hold
        return (min(cout, cin * kh * kw), min(cin, cout * kh * kw))

    def unfoldings(self, layer):
        return _channel_unfoldings(layer)

    def skeleton(self, layer, ranks):
        r_out, r_in = ranks
        cout, cin, kh, kw = layer.weight.shape
        return nn.Sequential(
            nn.Conv2d(cin, r_in, 1, bias=False),
            nn.Conv2d(r_in, r_out, (kh, kw), stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                      bias=False),
            nn.Conv2d(r_out, cout, 1, bias=layer.bias is not None),
        )

    def _fit_weights(self, layer, chain, w, *, seed):
        r_out, r_in = chain[1].out_channels, chain[1].in_channels
        (core, (u_out, u_in)), _ = partial_tucker(w.numpy(), rank=[r_out, r_in], modes=[0, 1], init="svd",
                                                  random_state=seed)
        _assign(chain[0], u_in.T)
        _assign(chain[1], core)
        _assign(chain[2], u_out)
        return torch.from_numpy(tl.tenalg.multi_mode_dot(core, [u_out, u_in], modes=[0, 1])), ""

    def fit_data(self, layer, chain, x, y, *, seed=0):
        w = layer.weight.detach().double()
        cout, cin, kh, kw = w.shape
        r_in = chain[0].out_channels
        channels = x.permute(0, 2, 3, 1).reshape(-1, cin)
        first, core = datafit.whitened_split(datafit.second_moment(datafit.sample_rows(channels, seed=seed)[0]),
                                             w.permute(1, 0, 2, 3).reshape(cin, -1), r_in)
        datafit.set_weight(chain[0], first.T)
        core = core.reshape(r_in, cout, kh, kw).permute(1, 0, 2, 3)  # all Cout outputs, r_in inputs
        # output mode: keep the leading directions of what the core actually produces on these inputs
        with torch.inference_mode():
            z = F.conv2d(chain[0](x).double(), core, None, layer.stride, layer.padding, layer.dilation)
        eigvals, eigvecs = torch.linalg.eigh(datafit.second_moment(datafit.sample_rows(datafit.outputs_2d(z), seed=seed)[0]))
        basis = eigvecs[:, eigvals.argsort(descending=True)[:chain[1].out_channels]]  # Cout x r_out
        datafit.set_weight(chain[1], torch.einsum("or,oikl->rikl", basis, core))
        datafit.set_weight(chain[2], basis)
        # the core is linear in its weights once both 1x1 factors are fixed: refit it to the dense output
        # seen through the output basis, so it also absorbs the error of the input factor
        unbiased = datafit.outputs_2d(y).double() - (0 if layer.bias is None else layer.bias.detach().double())
        datafit.least_squares(chain[1], chain[0](x), unbiased @ basis, seed=seed)
        return ""

    def effective_weight(self, chain, layer):
        w = [m.weight.detach().double() for m in chain]
        return torch.einsum("or,rskl,sc->ockl", w[2][..., 0, 0], w[1], w[0][..., 0, 0]).float()


def _channel_unfoldings(layer: nn.Module) -> list[np.ndarray]:
    """The output-channel and input-channel unfoldings of a conv weight."""
    w = layer.weight.detach().double().numpy()
    return [w.reshape(w.shape[0], -1), w.transpose(1, 0, 2, 3).reshape(w.shape[1], -1)]


CONV_METHODS = tuple(sorted(name for name, m in METHODS.items() if m.layer_type is nn.Conv2d and not m.by_shape))
SHAPE_METHODS = tuple(m for m in METHODS.values() if m.by_shape)
# structured channel pruning (`pipeline/compress/prune.py`): a method of whole channel groups, not of one layer, so
# it is no Method class; a method name and a budget candidate like the factorisations
PRUNE = "prune"
METHOD_NAMES = (*CONV_METHODS, PRUNE)


def unsupported_reason(layer: nn.Module) -> str:
    """Why no method takes this layer ('' when one does)."""
    if isinstance(layer, nn.Linear) or any(m.applies(layer) for m in METHODS.values()):
        return ""
    if type(layer) is not nn.Conv2d:
        return f"{type(layer).__name__} is not handled (only Conv2d and Linear): left dense"
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} (only zero padding splits across factors): left dense"
    return (f"grouped conv (groups={layer.groups} of {layer.in_channels} channels, kernel "
            f"{'x'.join(map(str, layer.kernel_size))}): only full and depthwise kxk convs are factored; left dense")


def method_for(layer: nn.Module, conv_method: str) -> Method:
    """The method that factors `layer`: the one its shape calls for (a Linear, a 1x1 or a depthwise conv), else
    the named conv method."""
    for method in SHAPE_METHODS:
        if method.applies(layer):
            return method
    if conv_method not in CONV_METHODS:
        raise unknown("method", conv_method, CONV_METHODS)
    return METHODS[conv_method]


def methods_for(layer: nn.Module, conv_methods: tuple[str, ...]) -> list[Method]:
    """The candidates a budget allocation may try on `layer`: the method its shape calls for (a Linear, a 1x1 or a
    depthwise conv) or else the named conv methods; none when only channel cuts are named (`prune` alone asks for
    no factorisation of any layer)."""
    if all(name == PRUNE for name in conv_methods):
        return []
    shaped = [m for m in SHAPE_METHODS if m.applies(layer)]
    return shaped[:1] or [method_for(layer, name) for name in conv_methods if name != PRUNE]

"""Low-rank factorisations of one Conv2d or Linear layer into a chain of standard layers.

Each method has a `skeleton` (layer shapes only, cheap, so MACs can be checked before any fitting) and a
`fit` that fills its weights and returns the weight tensor the chain computes (for the plan's error).
Strides, padding (numbers, tuples, 'same'/'valid') and dilation are split between the row and column
parts so the chain computes the same function as the layer at full rank.
"""

import warnings

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker
from torch import nn

from pipeline.errors import StageError

tl.set_backend("numpy")


def _split_padding(conv: nn.Conv2d) -> tuple:
    """Padding for the (kh x 1) and (1 x kw) parts; 'same' stays 'same' since it pads each axis on its own."""
    if isinstance(conv.padding, str):
        return conv.padding, conv.padding
    ph, pw = conv.padding
    return (ph, 0), (0, pw)


def max_ranks(layer: nn.Module, method: str) -> tuple[int, ...]:
    """The largest meaningful rank of each mode: full rank reproduces the layer."""
    if isinstance(layer, nn.Linear):
        return (min(layer.in_features, layer.out_features),)
    cout, cin, kh, kw = layer.weight.shape
    if method == "svd":
        return (min(cin * kh, cout * kw),)
    if method == "slice-svd":
        return (min(kh, kw),)
    if method == "tucker2":  # beyond the rank of each unfolding a factor has nothing left to hold
        return (min(cout, cin * kh * kw), min(cin, cout * kh * kw))
    dims = sorted((cout, cin, kh, kw))  # CP rank never exceeds the product of all modes but the largest
    return (dims[0] * dims[1] * dims[2],)


def unfoldings(layer: nn.Module, method: str) -> list[np.ndarray]:
    """The matrix (or matrices, one per mode) whose spectrum sets each rank."""
    w = layer.weight.detach().double().numpy()
    if isinstance(layer, nn.Linear):
        return [w]
    cout, cin, kh, kw = w.shape
    if method == "svd":
        return [w.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)]
    if method == "slice-svd":
        return [w.reshape(cout * cin, kh, kw)]  # a stack: callers take a rank per slice
    return [w.reshape(cout, -1), w.transpose(1, 0, 2, 3).reshape(cin, -1)]


# ---- skeletons ------------------------------------------------------------------------------------------

def skeleton(layer: nn.Module, method: str, ranks: tuple[int, ...]) -> nn.Sequential:
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        (r,) = ranks
        return nn.Sequential(nn.Linear(layer.in_features, r, bias=False), nn.Linear(r, layer.out_features, bias=has_bias))
    cout, cin, kh, kw = layer.weight.shape
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    pad_h, pad_w = _split_padding(layer)
    if method == "svd":
        (r,) = ranks
        return nn.Sequential(
            nn.Conv2d(cin, r, (kh, 1), stride=(sh, 1), padding=pad_h, dilation=(dh, 1), bias=False),
            nn.Conv2d(r, cout, (1, kw), stride=(1, sw), padding=pad_w, dilation=(1, dw), bias=has_bias),
        )
    if method == "slice-svd":
        (r,) = ranks
        return nn.Sequential(
            nn.Conv2d(cin, cin * cout * r, (kh, 1), stride=(sh, 1), padding=pad_h, dilation=(dh, 1), groups=cin, bias=False),
            nn.ChannelShuffle(cin),  # (c, o, k) channel order -> (o, k, c), so the row filters group by output
            nn.Conv2d(cin * cout * r, cout, (1, kw), stride=(1, sw), padding=pad_w, dilation=(1, dw), groups=cout, bias=has_bias),
        )
    if method == "cp":
        (r,) = ranks
        return nn.Sequential(
            nn.Conv2d(cin, r, 1, bias=False),
            nn.Conv2d(r, r, (kh, 1), stride=(sh, 1), padding=pad_h, dilation=(dh, 1), groups=r, bias=False),
            nn.Conv2d(r, r, (1, kw), stride=(1, sw), padding=pad_w, dilation=(1, dw), groups=r, bias=False),
            nn.Conv2d(r, cout, 1, bias=has_bias),
        )
    if method == "tucker2":
        r_out, r_in = ranks
        return nn.Sequential(
            nn.Conv2d(cin, r_in, 1, bias=False),
            nn.Conv2d(r_in, r_out, (kh, kw), stride=layer.stride, padding=layer.padding, dilation=layer.dilation, bias=False),
            nn.Conv2d(r_out, cout, 1, bias=has_bias),
        )
    raise ValueError(method)


# ---- fitting --------------------------------------------------------------------------------------------

def _set(module: nn.Module, weight: np.ndarray | torch.Tensor) -> None:
    module.weight.data = torch.as_tensor(np.ascontiguousarray(weight), dtype=torch.float32).reshape(module.weight.shape)


def fit(layer: nn.Module, method: str, chain: nn.Sequential, *, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Fill `chain`'s weights from `layer`; return the weight it computes and a note (empty if none)."""
    w = layer.weight.detach().double()
    note = ""
    if isinstance(layer, nn.Linear):
        r = chain[0].out_features
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        root = s[:r].sqrt()
        _set(chain[0], root[:, None] * vt[:r])
        _set(chain[1], u[:, :r] * root)
        approx = (u[:, :r] * s[:r]) @ vt[:r]
    elif method == "svd":
        cout, cin, kh, kw = w.shape
        r = chain[0].out_channels
        u, s, vt = torch.linalg.svd(w.permute(1, 2, 0, 3).reshape(cin * kh, cout * kw), full_matrices=False)
        root = s[:r].sqrt()
        vertical = (u[:, :r] * root).T.reshape(r, cin, kh, 1)
        horizontal = (root[:, None] * vt[:r]).reshape(r, cout, kw).permute(1, 0, 2)
        _set(chain[0], vertical)
        _set(chain[1], horizontal)
        approx = torch.einsum("rci,orj->ocij", vertical[..., 0], horizontal)
    elif method == "slice-svd":
        cout, cin, kh, kw = w.shape
        r = chain[0].out_channels // (cin * cout)
        u, s, vt = torch.linalg.svd(w, full_matrices=False)  # batched over (o, c)
        root = s[..., :r].sqrt()
        columns = u[..., :, :r] * root[..., None, :]  # o, c, i, k
        rows = root[..., :, None] * vt[..., :r, :]  # o, c, k, j
        _set(chain[0], columns.permute(1, 0, 3, 2))  # channel (c, o, k), taps i
        _set(chain[2], rows.permute(0, 2, 1, 3))  # output o, input channel (k, c), taps j
        approx = torch.einsum("ocik,ockj->ocij", columns, rows)
    elif method == "cp":
        approx, note = _fit_cp(w, chain, seed=seed)
    elif method == "tucker2":
        r_out, r_in = chain[1].out_channels, chain[1].in_channels
        (core, (u_out, u_in)), _ = partial_tucker(w.numpy(), rank=[r_out, r_in], modes=[0, 1], init="svd",
                                                  random_state=seed)
        _set(chain[0], u_in.T)
        _set(chain[1], core)
        _set(chain[2], u_out)
        approx = torch.from_numpy(tl.tenalg.multi_mode_dot(core, [u_out, u_in], modes=[0, 1]))
    else:
        raise ValueError(method)
    if layer.bias is not None:
        chain[-1].bias.data = layer.bias.detach().clone()
    return approx.float(), note


def _fit_cp(w: torch.Tensor, chain: nn.Sequential, *, seed: int) -> tuple[torch.Tensor, str]:
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
    _set(chain[0], in_f.T)
    _set(chain[1], h_f.T)
    _set(chain[2], w_f.T)
    _set(chain[3], out_f * sign)
    note = f"CP-ALS retried ({tried[0]})" if tried else ""
    return torch.from_numpy(approx), note


def effective_weight(chain: nn.Sequential, method: str, layer: nn.Module) -> torch.Tensor:
    """The single weight tensor a fitted chain computes (for the plan's relative weight error)."""
    with torch.no_grad():
        w = [m.weight.detach().double() for m in chain if hasattr(m, "weight")]
        if isinstance(layer, nn.Linear):
            return (w[1] @ w[0]).float()
        if method == "svd":
            return torch.einsum("rci,orj->ocij", w[0][..., 0], w[1][:, :, 0, :]).float()
        if method == "tucker2":
            return torch.einsum("or,rskl,sc->ockl", w[2][..., 0, 0], w[1], w[0][..., 0, 0]).float()
        if method == "cp":
            return torch.einsum("or,ri,rj,rc->ocij", w[3][..., 0, 0], w[1][:, 0, :, 0], w[2][:, 0, 0, :],
                                w[0][..., 0, 0]).float()
    raise ValueError(f"no effective weight for {method!r}")

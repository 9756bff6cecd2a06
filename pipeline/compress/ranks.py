"""Rank selection: EVBMF (Nakajima et al. 2013), an energy threshold, a fixed rank or a ratio.

EVBMF is written here, not imported: the public implementations carry the pitfalls listed in
FINDINGS (rank 0, a noise-variance search whose absolute tolerance fails on small weights, rows > cols).
"""

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class RankRule:
    """How ranks are chosen: 'evbmf', 'energy' (threshold in `value`), 'fixed' (int) or 'ratio' (of the maximum)."""

    kind: str
    value: float = 0.0

    def __str__(self) -> str:
        return {"evbmf": "evbmf", "energy": f"energy:{self.value:g}", "fixed": f"{int(self.value)}",
                "ratio": f"{self.value:g}"}[self.kind]


def parse_rank(text: str | int | float | None) -> RankRule:
    """'evbmf', 'energy:0.9', an integer rank ('8') or a fraction of each layer's maximum rank ('0.5')."""
    if text is None or text == "evbmf":
        return RankRule("evbmf")
    if isinstance(text, str) and text.startswith("energy"):
        _, _, value = text.partition(":")
        try:
            threshold = float(value) if value else 0.9
        except ValueError:
            threshold = -1.0
        if not 0 < threshold <= 1:
            raise ConfigError(f"Energy threshold {value!r}; expected a fraction in (0, 1], e.g. energy:0.9")
        return RankRule("energy", threshold)
    try:
        number = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"Rank {text!r}; expected evbmf, energy:<fraction>, a positive integer "
                          "or a fraction in (0, 1)") from None
    if number >= 1 and number == int(number):
        return RankRule("fixed", int(number))
    if 0 < number < 1:
        return RankRule("ratio", number)
    raise ConfigError(f"Rank {text!r}; expected a positive integer rank or a fraction in (0, 1)")


def evbmf_rank(matrix: np.ndarray) -> int:
    """Rank EVBMF keeps for `matrix`, with the noise variance estimated (never below 1)."""
    y = np.asarray(matrix, np.float64)
    if y.shape[0] > y.shape[1]:  # the derivation assumes rows <= cols
        y = y.T
    rms = math.sqrt(float(np.mean(y**2)))
    if rms == 0:
        return 1
    y = y / rms  # unit RMS keeps the noise-variance search's tolerance meaningful at any weight scale
    rows, cols = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    alpha = rows / cols
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = 0.0  # all singular values are kept, so nothing lies outside them
    eh_ub = int(min(math.ceil(rows / (1 + alpha)) - 1, rows)) - 1
    upper = float(np.sum(s**2)) / (rows * cols)
    lower = max(s[eh_ub + 1] ** 2 / (cols * x_bar), float(np.mean(s[eh_ub + 1:] ** 2)) / cols) if eh_ub + 1 < rows else 1e-12
    lower = min(lower, upper * (1 - 1e-9))

    def objective(sigma2: float) -> float:
        x = s**2 / (cols * sigma2)
        z1, z2 = x[x > x_bar], x[x <= x_bar]
        tau_z1 = 0.5 * (z1 - (1 + alpha) + np.sqrt((z1 - (1 + alpha)) ** 2 - 4 * alpha))
        return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1) + np.sum(np.log((tau_z1 + 1) / z1))
                     + alpha * np.sum(np.log(tau_z1 / alpha + 1)) + residual / (cols * sigma2)
                     + (rows - len(s)) * math.log(sigma2))

    sigma2 = minimize_scalar(objective, bounds=(lower, upper), method="bounded",
                             options={"xatol": 1e-8 * upper}).x
    threshold = math.sqrt(cols * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return max(1, int(np.sum(s > threshold)))


def energy_cut(energies: np.ndarray, threshold: float) -> int:
    """Smallest count of leading components (squared singular values, descending) keeping `threshold`."""
    total = float(np.sum(energies))
    if total == 0:
        return 1
    kept = np.cumsum(energies) / total
    return int(min(len(energies), np.searchsorted(kept, threshold - 1e-12) + 1))


def energy_rank(matrix: np.ndarray, threshold: float) -> int:
    """Smallest rank whose singular values keep `threshold` of the squared Frobenius norm."""
    return energy_cut(np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False) ** 2, threshold)


def spectral_rank(matrix: np.ndarray, rule: RankRule) -> int:
    """The rank an 'evbmf' or 'energy' rule reads off one matrix's spectrum."""
    return evbmf_rank(matrix) if rule.kind == "evbmf" else energy_rank(matrix, rule.value)


def round_up(rank: int, multiple: int, maximum: int) -> int:
    """Round up to a multiple the target's kernels like (8-channel blocks), never past the maximum."""
    if multiple > 1:
        rank = math.ceil(rank / multiple) * multiple
    return max(1, min(rank, maximum))

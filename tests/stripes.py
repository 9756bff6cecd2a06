"""Data a small CNN learns in a few epochs, in numpy only (the Keras script imports it too)."""

import numpy as np


def stripes(size: int, classes: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of noisy stripes, the class their orientation (0, 180/classes, ... degrees): learnable by a few
    conv layers in a few epochs, and not by colour or brightness alone. N x H x W x 3 in 0..1."""
    rng = np.random.default_rng(seed)
    y = np.arange(count) % classes
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = np.pi * y / classes + rng.normal(0, 0.05, count)
    period = rng.uniform(4, 10, count) * size / 32
    phase = rng.uniform(0, 2 * np.pi, count)
    along = np.cos(angle)[:, None, None] * grid[0] + np.sin(angle)[:, None, None] * grid[1]
    wave = 0.5 + 0.35 * np.sin(2 * np.pi * along / period[:, None, None] + phase[:, None, None])
    tint = rng.uniform(0.7, 1.0, (count, 1, 1, 3))
    x = wave[..., None] * tint + rng.normal(0, 0.08, (count, size, size, 3))
    return np.clip(x, 0, 1).astype(np.float32), y

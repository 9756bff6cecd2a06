"""Train a model from scratch (how the zoo's reference weights were made).

Seeded and single-process so a rerun on the same machine gives the same weights.
"""

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from calib import Dataset, preprocess
from pipeline.compute import torch_device
from pipeline.metrics import top1, torch_logits
from pipeline.util import atomic_path
from pipeline.zoo import ModelSpec


def augment(x: np.ndarray, rng: np.random.Generator, *, flip: bool = True) -> np.ndarray:
    """The CIFAR augmentation on NHWC samples: a random crop of the sample zero-padded by an eighth of its size
    (4 pixels at 32x32), and a horizontal flip unless `flip` is off (features whose axes mean time or frequency)."""
    n, h, w, _ = x.shape
    ph, pw = max(1, h // 8), max(1, w // 8)
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    dy, dx = rng.integers(0, 2 * ph + 1, n), rng.integers(0, 2 * pw + 1, n)
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if flip:
        flipped = rng.random(n) < 0.5
        out[flipped] = out[flipped, :, ::-1]
    return out


def train(spec: ModelSpec, train_set: Dataset, *, test_set: Dataset | None = None, epochs: int = 40,
          batch_size: int = 128, lr: float = 0.05, weight_decay: float = 5e-4, seed: int = 0,
          out: str | os.PathLike | None = None, flip: bool = True, device: str = "auto",
          mixed_precision: bool = False) -> dict[str, float]:
    """SGD with momentum and a one-cycle schedule on `device` (see `pipeline.compute`); returns the final test
    top-1 (when a test set is given) and where it ran. The model ends on the CPU."""
    where = torch_device(device, mixed_precision=mixed_precision)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = spec.module.to(where.device)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    batch_size = min(batch_size, len(train_set))  # a small data set still takes steps
    steps = epochs * (len(train_set) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.15)
    result = where.about()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(train_set))
        bar = tqdm(range(len(train_set) // batch_size), desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False)
        for step in bar:
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = where.tensor(preprocess(augment(train_set.x[idx], rng, flip=flip), mean=spec.mean, std=spec.std))
            with where.autocast():
                loss = F.cross_entropy(model(x).float(), where.tensor(train_set.y[idx]))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        if test_set is not None:
            result["top1"] = top1(torch_logits(model, preprocess(test_set.x, mean=spec.mean, std=spec.std),
                                               device=where.device), test_set.y)
            tqdm.write(f"epoch {epoch + 1}/{epochs}: test top-1 {result['top1']:.2%}")
    model.to("cpu")
    if out is not None:
        with atomic_path(out) as tmp:
            torch.save(model.state_dict(), tmp)
        result["weights"] = str(Path(out))
    return result

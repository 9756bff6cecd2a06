import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10 = Path(os.environ.get("CIFAR10_DIR", SHARED / "data" / "cifar-10-batches-py"))
RESNETS = SHARED / "models" / "cifar-resnet"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not (CIFAR10 / "test_batch").is_file():
        pytest.skip(f"CIFAR-10 not at {CIFAR10}: set CIFAR10_DIR")
    return CIFAR10


@pytest.fixture(scope="session")
def cifar_small(cifar_dir, tmp_path_factory) -> Path:
    """A class-balanced CIFAR-10 subset as one .npz (5,000 training, 1,000 test images): for tests of what a run
    records, not of how accurate it gets, where fine-tuning on 50,000 images only costs minutes."""
    import numpy as np

    from calib import balanced_subset, load_data

    splits = load_data(str(cifar_dir))
    train = balanced_subset(splits.train.y, 5000, seed=0)
    test = balanced_subset(splits.test.y, 1000, seed=0)
    path = tmp_path_factory.mktemp("cifar_small") / "cifar_small.npz"
    np.savez(path, x_train=splits.train.x[train], y_train=splits.train.y[train], x_test=splits.test.x[test],
             y_test=splits.test.y[test])
    return path


def _checkpoint(name: str) -> Path:
    path = RESNETS / name
    if not path.is_file():
        pytest.skip(f"checkpoint not at {path}")
    return path


@pytest.fixture(scope="session")
def resnet20_weights() -> Path:
    return _checkpoint("resnet20-12fca82f.th")


@pytest.fixture(scope="session")
def resnet56_weights() -> Path:
    return _checkpoint("resnet56-4bfd9763.th")

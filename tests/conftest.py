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

"""Which test images a board regression streams: MLPerf Tiny's performance images for a CIFAR-10 build, or the
indices a user gives, checked."""

import numpy as np
import pytest

from pipeline.device.regress import PERF_IMAGES, _indices, perf_images
from pipeline.device.transports import parse_device
from pipeline.errors import InputError


def test_a_cifar10_build_streams_mlperfs_performance_images_where_the_file_is(tmp_path, monkeypatch):
    np.save(tmp_path / PERF_IMAGES, np.array([7657, 8959, 3596]))
    monkeypatch.setenv("MLPERF_TINY_DIR", str(tmp_path))
    assert perf_images("CIFAR-10", (3, 32, 32)) == tmp_path / PERF_IMAGES
    assert perf_images("CIFAR-10", (3, 64, 64)) is None and perf_images("image folder flowers", (3, 32, 32)) is None
    monkeypatch.setenv("MLPERF_TINY_DIR", str(tmp_path / "elsewhere"))
    assert perf_images("CIFAR-10", (3, 32, 32)) is None  # then a class-balanced subset, as on other devices
    assert list(_indices(tmp_path / PERF_IMAGES, 10_000)) == [7657, 8959, 3596]


@pytest.mark.parametrize("content,words", [(np.array([1.5, 2.0]), "float64 of shape"), (np.array([[1, 2]]), r"\(1, 2\)"),
                                           (np.array([3, 10_000]), "indices into the 10,000 test images")])
def test_bad_image_indices_are_refused_naming_what_was_found(tmp_path, content, words):
    np.save(tmp_path / "idx.npy", content)
    with pytest.raises(InputError, match=words):
        _indices(tmp_path / "idx.npy", 10_000)


def test_serial_devices_parse_to_their_port():
    board = parse_device("serial:///dev/ttyACM0")
    assert (board.kind, board.url, board.key) == ("serial", "/dev/ttyACM0", "serial-dev-ttyACM0")
    assert parse_device("socket://127.0.0.1:4444").url == "socket://127.0.0.1:4444"

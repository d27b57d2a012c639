"""The bundled MNIST is the real one, verified on load; subsets are stratified; loading is cached."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tuner import data
from tuner.errors import DataError


def test_bundled_mnist_is_the_real_set():
    arrays = data.load_arrays()
    assert arrays["x_train"].shape == (60000, 28, 28) and arrays["x_train"].dtype == np.uint8
    assert arrays["x_test"].shape == (10000, 28, 28)
    assert list(arrays["y_train"][:5]) == [5, 0, 4, 1, 9]
    assert list(arrays["y_test"][:5]) == [7, 2, 1, 0, 4]
    assert data.content_sha256(arrays) == data.BUNDLED_SHA256


def test_damaged_bundled_file_is_caught(tmp_path, monkeypatch):
    copy = tmp_path / "mnist.npz"
    shutil.copy(data.BUNDLED, copy)
    arrays = dict(np.load(copy))
    arrays["x_train"] = arrays["x_train"].copy()
    arrays["x_train"][0, 0, 0] ^= 1
    np.savez_compressed(copy, **arrays)
    monkeypatch.setattr(data, "BUNDLED", copy)
    data.load_arrays.cache_clear()
    try:
        with pytest.raises(DataError, match="checksum mismatch"):
            data.load_arrays()
    finally:
        data.load_arrays.cache_clear()


def test_subset_is_stratified_and_seeded():
    full = data.load()
    sub = data.load(subset=1000, seed=3)
    assert len(sub.y_train) == 1000 and len(sub.y_test) == 10000
    expected = np.bincount(full.y_train, minlength=10) / len(full.y_train) * 1000
    assert np.all(np.abs(np.bincount(sub.y_train, minlength=10) - expected) <= 1)
    assert np.array_equal(data.load(subset=1000, seed=3).x_train, sub.x_train)
    assert not np.array_equal(data.load(subset=1000, seed=4).y_train, sub.y_train)
    assert sub.x_train.dtype == np.float32 and 0.0 <= sub.x_train.min() and sub.x_train.max() <= 1.0


def test_validation_split_is_the_last_ten_thousand():
    arrays = data.load_arrays()
    splits = data.load(validation=True)
    assert len(splits.y_train) == 50000 and len(splits.y_val) == 10000
    assert np.array_equal(splits.y_val, arrays["y_train"][-10000:])


def test_data_is_loaded_once_per_process():
    assert data.load(subset=500) is data.load(subset=500)


def test_flat_784_arrays_are_accepted(tmp_path):
    path = tmp_path / "flat.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 255, (30, 784), dtype=np.uint8), y_train=np.arange(30) % 10,
             x_test=rng.integers(0, 255, (10, 784), dtype=np.uint8), y_test=np.arange(10))  # fmt: skip
    splits = data.load(str(path))
    assert splits.x_train.shape == (30, 28, 28) and splits.source == str(path)

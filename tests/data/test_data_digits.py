"""Tests for the digits dataset and the shared finite-dataset batching."""

import numpy as np
import pytest

from pixeldit.data import DataError, Dataset, DigitsDataset, load_dataset
from pixeldit.data.digits import resize_matrix


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset()


def test_shapes_range_and_attributes(digits):
    assert isinstance(digits, Dataset)
    assert digits.name == "digits"
    assert digits.image_shape == (16, 16, 1)
    assert digits.condition == "class" and digits.num_classes == 10 and digits.theta_dim is None
    x, y = digits.arrays()
    assert x.shape == (1797, 16, 16, 1) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int32
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))


def test_resolution_option_and_native_scaling():
    from sklearn.datasets import load_digits

    d8 = load_dataset("digits", resolution=8)
    raw = load_digits().images
    np.testing.assert_allclose(d8.arrays()[0][..., 0], raw / 8.0 - 1.0, atol=1e-6)
    d32 = load_dataset("digits", resolution=32, seed=3)
    assert d32.image_shape == (32, 32, 1)
    x = d32.arrays()[0]
    assert -1.0 <= x.min() and x.max() <= 1.0
    # bilinear upsampling preserves the image mean up to edge effects
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), (raw / 8.0 - 1.0).mean(axis=(1, 2)), atol=0.05)


def test_resize_matrix_rows_are_convex():
    for mode in ("bilinear", "nearest"):
        m = resize_matrix(8, 16, mode)
        assert (m >= 0).all()
        np.testing.assert_allclose(m.sum(axis=1), 1.0)
    np.testing.assert_array_equal(resize_matrix(8, 16, "nearest").argmax(axis=1), np.repeat(np.arange(8), 2))


def test_get_batch_reproducible_and_step_dependent(digits):
    b1 = digits.get_batch(5, 32)
    b2 = DigitsDataset().get_batch(5, 32)  # a fresh object, as after a resume
    np.testing.assert_array_equal(b1["x"], b2["x"])
    np.testing.assert_array_equal(b1["y"], b2["y"])
    assert b1["x"].shape == (32, 16, 16, 1) and b1["x"].dtype == np.float32
    assert b1["y"].dtype == np.int32
    b3 = digits.get_batch(6, 32)
    assert not np.array_equal(b1["y"], b3["y"]) or not np.array_equal(b1["x"], b3["x"])
    other_seed = DigitsDataset(seed=1).get_batch(5, 32)
    assert not np.array_equal(b1["x"], other_seed["x"])


def test_epoch_permutation_covers_every_image_once(digits):
    n = len(digits)
    b = 100
    idx = np.concatenate([digits.batch_indices(s, b) for s in range(-(-n // b) + 1)])
    first_epoch = idx[:n]
    assert sorted(first_epoch.tolist()) == list(range(n))
    # a batch spanning the epoch boundary continues with the next epoch's permutation
    np.testing.assert_array_equal(idx[n : n + 50], digits.permutation(1)[:50])
    x, y = digits.arrays()
    batch = digits.get_batch(3, b)
    np.testing.assert_array_equal(batch["y"], y[digits.batch_indices(3, b)])


def test_patch_size_and_bad_steps():
    with pytest.raises(DataError, match="digits"):
        DigitsDataset(resolution=16, patch_size=5)
    DigitsDataset(resolution=16, patch_size=4)
    with pytest.raises(ValueError):
        DigitsDataset(resolution=8).get_batch(-1, 4)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("no_such_dataset_xyz")

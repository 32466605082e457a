"""Tests for user data: image folders and .npz archives."""

import warnings

import numpy as np
import pytest
from PIL import Image

from pixeldit.data import DataError, load_dataset, load_image_folder, load_npz


def _png(path, size=(8, 8), mode="L", value=None, seed=0):
    rng = np.random.default_rng(seed)
    h, w = size
    shape = (h, w) if mode == "L" else (h, w, 3)
    a = rng.integers(0, 256, size=shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode=None).convert(mode).save(path)
    return a


def test_class_folders(tmp_path):
    root = tmp_path / "pets"
    _png(root / "dog" / "a.png", mode="RGB", seed=1)
    _png(root / "dog" / "b.jpg", mode="RGB", seed=2)
    _png(root / "cat" / "c.png", mode="RGB", value=255)
    (root / "cat" / "notes.txt").write_text("ignored")
    ds = load_dataset(str(root))
    assert ds.name == "pets" and ds.condition == "class"
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    x, y = ds.arrays()
    assert x.shape == (3, 8, 8, 3) and x.dtype == np.float32
    assert y.tolist() == [0, 1, 1]
    np.testing.assert_array_equal(x[0], 1.0)  # white -> +1
    assert -1.0 <= x.min() and x.max() <= 1.0
    b = ds.get_batch(0, 5)
    assert b["x"].shape == (5, 8, 8, 3) and b["y"].dtype == np.int32
    assert load_image_folder(root, channels=1).image_shape == (8, 8, 1)


def test_flat_grayscale_folder(tmp_path):
    raw = _png(tmp_path / "a.png", value=0)
    _png(tmp_path / "b.png", seed=3)
    ds = load_dataset(tmp_path)
    assert ds.condition == "none" and ds.num_classes is None and ds.theta_dim is None
    assert ds.image_shape == (8, 8, 1)  # all grayscale -> 1 channel by default
    np.testing.assert_array_equal(ds.arrays()[0][0, ..., 0], raw / 127.5 - 1.0)
    assert ds.arrays()[1] is None
    b = ds.get_batch(2, 3)
    assert set(b) == {"x"}
    np.testing.assert_array_equal(b["x"], ds.get_batch(2, 3)["x"])
    assert load_image_folder(tmp_path, channels=3).image_shape == (8, 8, 3)


def test_folder_errors_name_the_file(tmp_path):
    # mixed sizes
    mixed = tmp_path / "mixed"
    _png(mixed / "a.png", size=(8, 8))
    _png(mixed / "b.png", size=(8, 12))
    with pytest.raises(DataError, match=r"b\.png.*8x12.*a\.png.*8x8"):
        load_image_folder(mixed)
    # patch size
    odd = tmp_path / "odd"
    _png(odd / "only.png", size=(8, 12))
    with pytest.raises(DataError, match=r"only\.png.*8x12.*multiples of 5"):
        load_image_folder(odd, patch_size=5)
    assert load_image_folder(odd, patch_size=4).image_shape == (8, 12, 1)
    # empty
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(DataError, match="nothing_here.*is empty"):
        load_image_folder(empty)
    empty_class = tmp_path / "classes"
    _png(empty_class / "one" / "x.png")
    (empty_class / "two").mkdir()
    with pytest.raises(DataError, match="two.*is empty"):
        load_dataset(str(empty_class))
    # corrupt
    bad = tmp_path / "bad"
    _png(bad / "good.png")
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(DataError, match=r"broken\.png"):
        load_image_folder(bad)
    truncated = tmp_path / "trunc"
    _png(truncated / "t.png", size=(32, 32))
    data = (truncated / "t.png").read_bytes()
    (truncated / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.png"):
        load_image_folder(truncated)
    # loose images next to class folders
    amb = tmp_path / "amb"
    _png(amb / "cls" / "a.png")
    _png(amb / "loose.png")
    with pytest.raises(DataError, match=r"loose\.png"):
        load_image_folder(amb)
    with pytest.raises(DataError, match="missing_dir"):
        load_image_folder(tmp_path / "missing_dir")


def test_npz_variants(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 8, 8, 2)).astype(np.float32) * 5
    np.savez(tmp_path / "plain.npz", x=x)
    ds = load_dataset(str(tmp_path / "plain.npz"))
    assert ds.name == "plain" and ds.condition == "none" and ds.image_shape == (8, 8, 2)
    np.testing.assert_array_equal(ds.arrays()[0], x)  # not scaled by default

    np.savez(tmp_path / "labels.npz", x=x[..., 0], y=np.arange(10) % 3)
    ds = load_npz(tmp_path / "labels.npz")
    assert ds.image_shape == (8, 8, 1) and ds.condition == "class" and ds.num_classes == 3
    assert ds.get_batch(1, 4)["y"].dtype == np.int32

    np.savez(tmp_path / "theta.npz", x=x, theta=rng.normal(size=(10, 3)))
    ds = load_npz(tmp_path / "theta.npz")
    assert ds.condition == "theta" and ds.theta_dim == 3
    b = ds.get_batch(0, 4)
    assert b["y"].shape == (4, 3) and b["y"].dtype == np.float32

    ds = load_npz(tmp_path / "plain.npz", normalize="minmax")
    assert ds.arrays()[0].min() == -1.0 and ds.arrays()[0].max() == 1.0
    np.savez(tmp_path / "u8.npz", x=np.array([[[[0]], [[255]]]], dtype=np.uint8))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        raw = load_npz(tmp_path / "u8.npz")
    assert any("uint8" in str(w.message) for w in rec)
    assert raw.arrays()[0].max() == 255.0
    np.testing.assert_array_equal(load_npz(tmp_path / "u8.npz", normalize="uint8").arrays()[0].reshape(-1), [-1.0, 1.0])


@pytest.mark.parametrize(
    "fname, arrays, pattern",
    [
        ("nan.npz", {"x": np.array([np.nan] + [0.0] * 15).reshape(1, 4, 4, 1)}, "NaN"),
        ("inf.npz", {"x": np.array([np.inf] + [0.0] * 15).reshape(1, 4, 4, 1)}, "inf"),
        ("theta_nan.npz", {"x": np.zeros((2, 4, 4)), "theta": np.array([[0.0], [np.nan]])}, "theta"),
        ("rank.npz", {"x": np.zeros((4, 4))}, "rank 2"),
        ("rank5.npz", {"x": np.zeros((1, 2, 4, 4, 1))}, "rank 5"),
        ("len_y.npz", {"x": np.zeros((3, 4, 4)), "y": np.array([0, 1])}, "3 entries but 'y' has 2"),
        ("len_theta.npz", {"x": np.zeros((3, 4, 4)), "theta": np.zeros((4, 2))}, "'theta' has 4"),
        ("both.npz", {"x": np.zeros((2, 4, 4)), "y": np.array([0, 1]), "theta": np.zeros((2, 1))}, "both"),
        ("float_y.npz", {"x": np.zeros((2, 4, 4)), "y": np.array([0.5, 1.0])}, "integer"),
        ("y_rank.npz", {"x": np.zeros((2, 4, 4)), "y": np.zeros((2, 1), int)}, "shape"),
        ("neg.npz", {"x": np.zeros((2, 4, 4)), "y": np.array([0, -1])}, "negative"),
        ("empty.npz", {"x": np.zeros((0, 4, 4, 1))}, "empty"),
        ("nox.npz", {"images": np.zeros((2, 4, 4, 1))}, "no array 'x'"),
        ("patch.npz", {"x": np.zeros((2, 6, 8, 1))}, "6x8.*multiples of 4"),
    ],
)
def test_npz_errors_name_the_file(tmp_path, fname, arrays, pattern):
    np.savez(tmp_path / fname, **arrays)
    with pytest.raises(DataError, match=pattern) as info:
        load_dataset(str(tmp_path / fname), patch_size=4)
    assert fname in str(info.value)


def test_npz_unreadable(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"junk\.npz"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(DataError, match=r"gone\.npz"):
        load_dataset(str(tmp_path / "gone.npz"))
    assert issubclass(DataError, ValueError)

"""Tests for pixeldit.data.stream.transforms: ADM crop, decoding, flip, scaling."""

import numpy as np
import pytest
from PIL import Image

from pixeldit.data import DataError
from pixeldit.data.stream.transforms import Decode, center_crop_arr, random_flip, to_float
from stream_fixtures import png_bytes


def _adm_center_crop(pil_image, image_size):
    """guided-diffusion's center_crop_arr, restated from its source for this test."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize("hw", [(37, 50), (50, 37), (9, 12), (64, 64)])
def test_center_crop_matches_adm(hw):
    a = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    got = center_crop_arr(Image.fromarray(a), 8)
    assert got.shape == (8, 8, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _adm_center_crop(Image.fromarray(a), 8))


def test_center_crop_box_halving_and_offsets():
    a = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    # one BOX halving = 2x2 block means (Pillow rounds in fixed point: within 1); the bicubic step is the identity
    blocks = a.reshape(8, 2, 8, 2, 3).astype(float).mean(axis=(1, 3))
    np.testing.assert_allclose(center_crop_arr(Image.fromarray(a), 8), blocks, atol=1.0)
    # short side already at the target: only the centre crop, offset (20 - 8) // 2 = 6
    b = np.random.default_rng(2).integers(0, 256, (8, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(b), 8), b[:, 6:14])


def test_decode_modes_and_sizes():
    rgb = np.random.default_rng(3).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    d3 = Decode(resolution=None, channels=3, on_corrupt="stop", size=(6, 6))
    np.testing.assert_array_equal(d3.decode(png_bytes(rgb), "a"), rgb)
    np.testing.assert_array_equal(d3.decode(png_bytes(gray), "g"), np.repeat(gray[..., None], 3, -1))
    d1 = Decode(resolution=None, channels=1, on_corrupt="stop", size=(6, 6))
    np.testing.assert_array_equal(d1.decode(png_bytes(gray), "g"), gray[..., None])
    wide = png_bytes(np.zeros((6, 7, 3), np.uint8))
    with pytest.raises(DataError, match=r"image 'w\.png' has size 6x7"):
        d3.decode(wide, "w.png")
    sixteen = np.array([[0, 65535], [257, 32896]], dtype=np.uint16)
    d16 = Decode(resolution=None, channels=1, on_corrupt="stop")
    assert d16.decode(png_bytes(sixteen), "s")[..., 0].tolist() == [[0, 255], [1, 128]]


def test_decode_corrupt_policy():
    rec = {"image": b"\x89PNG broken", "name": "/data/c0/broken.png", "y": 1}
    with pytest.raises(DataError, match=r"cannot read image '/data/c0/broken\.png'"):
        Decode(resolution=8, channels=3, on_corrupt="stop")(rec)
    with pytest.warns(UserWarning, match=r"skipping unreadable record: cannot read image '/data/c0/broken\.png'"):
        assert Decode(resolution=8, channels=3, on_corrupt="skip")(rec) is None
    missing = {"image": FileNotFoundError(2, "No such file"), "name": "/data/gone.png"}
    with pytest.raises(DataError, match=r"'/data/gone\.png': FileNotFoundError"):
        Decode(resolution=8, channels=3, on_corrupt="stop")(missing)
    with pytest.raises(ValueError, match="on_corrupt must be one of"):
        Decode(resolution=8, channels=3, on_corrupt="ignore")


def test_flip_and_scaling():
    x = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    flips = [random_flip({"x": x}, np.random.default_rng(s))["x"] for s in range(20)]
    kinds = {f.tobytes() for f in flips}
    assert kinds == {x.tobytes(), x[:, ::-1].tobytes()}  # both outcomes, nothing else
    assert random_flip(None, np.random.default_rng(0)) is None
    b = to_float({"x": np.array([[[[0, 255, 51]]]], np.uint8), "y": np.array([3], np.int64)})
    assert b["x"].dtype == np.float32 and b["y"].dtype == np.int32
    np.testing.assert_allclose(b["x"].ravel(), [-1.0, 1.0, 51 / 127.5 - 1], atol=1e-7)

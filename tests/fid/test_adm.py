import numpy as np
import pytest

from pixeldit.fid.adm import completed_batches, merge_batches, to_uint8, write_batch


def test_to_uint8_rounds_as_the_reference():
    x = np.array([-1.5, -1.0, 0.0, 1.0 / 127.5 * 0.49, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 128, 255, 255])  # 127.5 + 0.5 -> 128


def test_batches_resume_and_merge_for_the_evaluator(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, 10)
    for i in range(2):
        write_batch(tmp_path / "b", i, images[4 * i : 4 * i + 4], labels[4 * i : 4 * i + 4])
    assert completed_batches(tmp_path / "b") == [0, 1]  # a resumed run continues at batch 2
    write_batch(tmp_path / "b", 2, images[8:], labels[8:])
    out = merge_batches(tmp_path / "b", tmp_path / "samples.npz", num=9)
    with np.load(out) as data:
        np.testing.assert_array_equal(data["arr_0"], images[:9])
        np.testing.assert_array_equal(data["arr_1"], labels[:9])
        assert data["arr_0"].dtype == np.uint8


def test_bad_batches_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_batch(tmp_path, 0, np.zeros((1, 8, 8, 3), np.float32))
    write_batch(tmp_path, 1, np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="not contiguous"):
        merge_batches(tmp_path, tmp_path / "out.npz")
    write_batch(tmp_path, 0, np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="fewer than"):
        merge_batches(tmp_path, tmp_path / "out.npz", num=5)

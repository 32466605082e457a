"""Tests for pixeldit.data.stream.sources: folder, reference images.h5, parquet and .npz layouts."""

import pickle

import numpy as np
import pytest
from PIL import Image

from pixeldit.data import DataError, load_npz
from pixeldit.data.stream import open_source, open_stream
from pixeldit.data.stream.sources import ImageFolderSource, NpzSource, ParquetSource, ReferenceH5Source
from stream_fixtures import class_folder, flat_image, image_ids, parquet_shards, reference_h5


def _all(ds):
    """Every image of a StreamingDataset once, in stream order: (ids, labels)."""
    it = ds.iterator(1, num_epochs=1)
    batches = list(it)
    x = np.concatenate([b["x"] for b in batches])
    y = np.concatenate([b["y"] for b in batches]) if "y" in batches[0] else None
    return image_ids(x), y


def test_image_folder_layout(tmp_path):
    labels = class_folder(tmp_path / "pets", (2, 3))
    (tmp_path / "pets" / "c1" / "notes.txt").write_text("ignored")
    src = open_source(tmp_path / "pets")
    assert isinstance(src, ImageFolderSource) and len(src) == 5
    assert src.class_names == ["c0", "c1"] and src.num_classes == 2 and src.condition == "class"
    rec = src[3]
    assert rec["y"] == labels[3] and rec["name"].endswith("c1/img003.png")
    ids, y = _all(open_stream(tmp_path / "pets"))
    assert [labels[i] for i in ids] == y.tolist() and sorted(ids) == list(range(5))


def test_image_folder_errors(tmp_path):
    class_folder(tmp_path / "mix", (1,))
    Image.fromarray(flat_image(0)).save(tmp_path / "mix" / "loose.png")
    with pytest.raises(DataError, match="mixes class subfolders"):
        ImageFolderSource(tmp_path / "mix")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"class folder '.*a' is empty"):
        ImageFolderSource(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderSource(tmp_path / "nowhere")


def test_reference_h5_layout(tmp_path):
    labels = reference_h5(tmp_path / "in1k", n=5)
    src = open_source(tmp_path / "in1k")
    assert isinstance(src, ReferenceH5Source) and len(src) == 5 and src.condition == "class"
    assert src.num_classes == max(labels) + 1
    assert src[1]["name"].endswith("images.h5:00000/img00000001.png")
    assert open_source(tmp_path / "in1k", num_classes=1000).num_classes == 1000
    clone = pickle.loads(pickle.dumps(src))  # lazily opened file handle: picklable for workers
    assert clone[4]["image"] == src[4]["image"]
    ids, y = _all(open_stream(tmp_path / "in1k", resolution=8))
    assert sorted(ids) == list(range(5)) and [labels[i] for i in ids] == y.tolist()


def test_reference_h5_missing_files(tmp_path):
    reference_h5(tmp_path / "d", n=2)
    (tmp_path / "d" / "images_h5.json").unlink()
    with pytest.raises(DataError, match="has no 'images_h5.json'"):
        ReferenceH5Source(tmp_path / "d")


def test_parquet_shards(tmp_path):
    labels = parquet_shards(tmp_path / "pq", sizes=(4, 3), row_group=3)
    src = open_source(tmp_path / "pq")
    assert isinstance(src, ParquetSource) and len(src) == 7 and src.num_classes == 3
    assert "row group 1, row 0 (n03.JPEG)" in src[3]["name"]
    single = open_source(tmp_path / "pq" / "train-00001-of-00002.parquet")
    assert len(single) == 3 and single.name == "train-00001-of-00002"
    clone = pickle.loads(pickle.dumps(src))
    assert clone[6]["image"] == src[6]["image"]
    ids, y = _all(open_stream(tmp_path / "pq"))
    assert sorted(ids) == list(range(7)) and [labels[i] for i in ids] == y.tolist()


def test_parquet_without_image_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"img": [b"x"], "label": [0]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="has no 'image' column"):
        ParquetSource(tmp_path / "bad.parquet")


def test_npz_source(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 4, 4, 1)).astype(np.float32)
    theta = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.savez(tmp_path / "fields.npz", x=x, theta=theta)
    src = open_source(tmp_path / "fields.npz")
    assert isinstance(src, NpzSource) and src.condition == "theta" and src.theta_dim == 2
    ref_x, ref_y = load_npz(tmp_path / "fields.npz").arrays()
    ds = open_stream(tmp_path / "fields.npz", seed=1)
    assert ds.image_shape == (4, 4, 1)
    batches = list(ds.iterator(2, num_epochs=1))
    got_x = np.concatenate([b["x"] for b in batches])
    got_y = np.concatenate([b["y"] for b in batches])
    order = np.argsort(got_y[:, 0])
    np.testing.assert_array_equal(got_x[order], ref_x)  # stored values, unscaled
    np.testing.assert_array_equal(got_y[order], ref_y)
    with pytest.raises(ValueError, match="resolution and channels apply to images only"):
        open_stream(tmp_path / "fields.npz", resolution=4)

"""Tests for pixeldit.data.stream.pipeline: resume, seeded order, host shards, corrupt files."""

import json

import numpy as np
import pytest

from pixeldit.data import DataError
from pixeldit.data.stream import open_stream
from stream_fixtures import class_folder, image_ids

N = 12


@pytest.fixture
def folder(tmp_path):
    class_folder(tmp_path / "tiny", (5, 7))
    return tmp_path / "tiny"


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(p["x"], q["x"]) and np.array_equal(p["y"], q["y"]) for p, q in zip(a, b, strict=True))


def test_resume_from_saved_state(folder):
    ds = open_stream(folder, flip=True, seed=7)
    straight = _take(ds.iterator(5), 9)  # crosses epoch boundaries (12 images)
    it = ds.iterator(5)
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))  # the state survives a JSON checkpoint
    resumed = ds.iterator(5)
    resumed.set_state(state)
    assert _same(_take(resumed, 5), straight[4:])


def test_order_is_set_by_the_seed(folder):
    a = open_stream(folder, seed=3)
    first = _take(a.iterator(4), 6)
    assert _same(first, _take(open_stream(folder, seed=3).iterator(4), 6))
    other = _take(open_stream(folder, seed=4).iterator(4), 6)
    assert not _same(first, other)
    ids = [i for b in first for i in image_ids(b["x"])]
    assert sorted(ids[:N]) == list(range(N)) and sorted(ids[N:]) == list(range(N))  # each epoch once
    assert ids[:N] != ids[N:]  # and a new order each epoch


def test_flip_is_seeded(folder):
    import PIL.Image

    # a left-right asymmetric image shows whether a record was flipped
    for p in sorted(folder.glob("*/*.png")):
        a = np.asarray(PIL.Image.open(p)).copy()
        a[:, 0] = 0
        PIL.Image.fromarray(a).save(p)

    def flipped(seed):  # column 0 is black unless the record was flipped
        batches = _take(open_stream(folder, flip=True, seed=seed).iterator(6), 4)
        return [bool(b["x"][j, 0, 0, 0] > -1) for b in batches for j in range(6)]

    assert flipped(1) == flipped(1) and 0 < sum(flipped(1)) < 24


@pytest.mark.parametrize("count", [2, 3, 5])
def test_host_shards_disjoint_and_complete(folder, count):
    ds = open_stream(folder, seed=11)
    shards = []
    for index in range(count):
        batches = list(ds.iterator(1, shard=(index, count), num_epochs=1))
        shards.append([i for b in batches for i in image_ids(b["x"])])
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(N))  # complete and disjoint
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="shard must be"):
        ds.iterator(1, shard=(count, count))


def test_corrupt_file_skip_or_stop(folder):
    bad = folder / "c1" / "img099.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.warns(UserWarning, match=r"skipping unreadable record: cannot read image '.*c1/img099\.png'"):
        ids = [i for b in open_stream(folder, on_corrupt="skip").iterator(4, num_epochs=1) for i in image_ids(b["x"])]
    assert sorted(ids) == list(range(N))  # the 12 good images, batches stay full
    it = open_stream(folder, on_corrupt="stop", seed=0).iterator(4)
    with pytest.raises(DataError, match=r"cannot read image '.*c1/img099\.png'"):
        _take(it, 4)


def test_probe_errors(folder):
    with pytest.raises(ValueError, match="on_corrupt must be one of"):
        open_stream(folder, on_corrupt="maybe")
    with pytest.raises(DataError, match="not divisible by patch_size=3"):
        open_stream(folder, patch_size=3)
    ds = open_stream(folder, resolution=4, channels=1)
    assert ds.image_shape == (4, 4, 1) and ds.metadata()["streaming"]["resolution"] == 4
    (folder / "c0" / "img000.png").write_bytes(b"garbage")  # the record that sets the image shape
    with pytest.raises(DataError, match=r"cannot read image '.*c0/img000\.png'"):
        open_stream(folder)
    assert open_stream(folder, on_corrupt="skip").image_shape == (8, 8, 3)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(folder):
    (folder / "c0" / "img098.png").write_bytes(b"not an image")  # a skipped record must not shift workers
    ds = open_stream(folder, seed=5, flip=True, on_corrupt="skip")
    with pytest.warns(UserWarning):
        expected = _take(ds.iterator(4), 6)
    it = ds.iterator(4, workers=2)
    try:
        got = _take(it, 3)
        state = it.get_state()
        got += _take(it, 3)
    finally:
        it.close()
    assert _same(got, expected)
    resumed = ds.iterator(4, workers=2)
    try:
        resumed.set_state(state)
        assert _same(_take(resumed, 3), expected[3:])
    finally:
        resumed.close()

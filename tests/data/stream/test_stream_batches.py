"""Tests for pixeldit.data.stream.batches: the trainer's view of a stream."""

import json

import numpy as np
import pytest

from pixeldit.data.stream import StreamBatches, open_stream
from stream_fixtures import class_folder


@pytest.fixture
def stream(tmp_path):
    class_folder(tmp_path / "tiny", (4, 5))
    return open_stream(tmp_path / "tiny", seed=2, flip=True)


def test_steps_in_order_equal_the_iterator(stream):
    it = stream.iterator(4)
    expected = [next(it) for _ in range(5)]
    sb = StreamBatches(stream)
    got = [sb.get_batch(s, 4) for s in range(5)]
    assert all(np.array_equal(a["x"], b["x"]) and np.array_equal(a["y"], b["y"]) for a, b in zip(got, expected))
    assert sb.image_shape == stream.image_shape and sb.num_classes == 2
    with pytest.raises(ValueError, match="the stream is at step 5 but step 7 was asked for"):
        sb.get_batch(7, 4)
    with pytest.raises(ValueError, match="batch size changed from 4 to 8"):
        sb.get_batch(5, 8)
    sb.close()


def test_state_resumes_the_same_batches(stream):
    straight = StreamBatches(stream)
    expected = [straight.get_batch(s, 4) for s in range(7)]
    first = StreamBatches(stream)
    for s in range(3):
        first.get_batch(s, 4)
    state = json.loads(json.dumps(first.get_state()))  # as stored in a checkpoint
    first.close()
    resumed = StreamBatches(stream)
    resumed.set_state(state)
    got = [resumed.get_batch(s, 4) for s in range(3, 7)]
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(got, expected[3:]))
    with pytest.raises(ValueError, match="the stream is at step 7 but step 3"):
        resumed.get_batch(3, 4)
    other = StreamBatches(open_stream(stream.source.root, seed=3))
    with pytest.raises(ValueError, match="saved with seed=2 but this stream has seed=3"):
        other.set_state(state)


def test_host_rows(stream):
    sb = StreamBatches(stream, shard=(1, 2))
    assert sb.get_batch(0, 4)["x"].shape[0] == 2  # this host's half of the global batch
    with pytest.raises(ValueError, match="batch size 5 does not split over 2 hosts"):
        StreamBatches(stream, shard=(0, 2)).get_batch(0, 5)

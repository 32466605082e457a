"""Tests for pixeldit.training.datastate: a streaming run resumes with the same batches."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from pixeldit import training as T
from pixeldit.data.stream import StreamBatches, open_stream
from pixeldit.model import C2IConfig
from pixeldit.training.datastate import DATA_STATE_KEY, stream_of

# the numerics of tests/training/test_loop.py, so that one compiled step serves both
CFG = C2IConfig(
    in_channels=1, patch_size=4, hidden_size=32, num_groups=2, patch_depth=2, pixel_depth=1, pixel_hidden_size=8, num_classes=10
)
BASE = T.TrainConfig(batch_size=16, steps=6, lr=3e-3, warmup_steps=10, ema_decay=0.9, p_uncond=0.1, grad_clip=1.0,
                     log_every=1, checkpoint_every=2, keep_checkpoints=3)


def tc(**kw) -> T.TrainConfig:
    return dataclasses.replace(BASE, **kw)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(11):
        d = tmp_path / "imgs" / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(d / f"{i}.png")
    return tmp_path / "imgs"


def stream(folder):
    return StreamBatches(open_stream(folder, seed=4, flip=True))


def test_interrupted_streaming_run_resumes_the_same_loss_curve(folder, tmp_path):
    straight = T.train(CFG, tc(steps=7), stream(folder), tmp_path / "a", progress=False).summary
    first = T.train(CFG, tc(steps=3, checkpoint_every=100), stream(folder), tmp_path / "b", progress=False).summary
    meta = T.read_checkpoint_meta(tmp_path / "b")
    assert meta[DATA_STATE_KEY][0]["step"] == 3  # one position per process, stored with the checkpoint
    second = T.train(CFG, tc(steps=7), stream(folder), tmp_path / "b", progress=False).summary
    assert second["start_step"] == 3
    assert straight["losses"] == first["losses"] + second["losses"]  # identical, not just close


def test_stream_without_stored_position_is_refused(folder, tmp_path):
    T.train(CFG, tc(steps=2), _InMemoryLike(stream(folder)), tmp_path, progress=False, check_dataset=False)
    with pytest.raises(ValueError, match="checkpoint at step 2 has no data-stream position"):
        T.train(CFG, tc(steps=3), stream(folder), tmp_path, progress=False, check_dataset=False)


def test_stream_of_sees_through_wrappers(folder):
    sb = stream(folder)
    assert stream_of(sb) is sb and stream_of(_Wrapper(sb)) is sb and stream_of(object()) is None


class _Wrapper:
    def __init__(self, dataset):
        self.dataset = dataset


class _InMemoryLike:
    """The stream's batches without get_state: a checkpoint written with no stream position."""

    def __init__(self, sb):
        self._sb = sb
        self.image_shape = sb.image_shape

    def get_batch(self, step, batch_size):
        return self._sb.get_batch(step, batch_size)


def test_positions_of_several_processes_round_trip(monkeypatch):
    from pixeldit.training import datastate

    states = [{"step": 3, "iterator": {"next_index": 48}}, {"step": 3, "iterator": {"next_index": 1234567}}]

    def allgather(x):  # two processes whose JSON encodings differ in length: padded, then cut back
        x = np.asarray(x)
        if x.dtype == np.int32:
            return np.array([[len(json.dumps(s).encode())] for s in states], np.int32)
        rows = [np.frombuffer(json.dumps(s).encode(), np.uint8) for s in states]
        return np.stack([np.pad(r, (0, x.size - r.size)) for r in rows])

    class Fake:
        def get_state(self):
            return states[1]  # this is process 1

        def set_state(self, state):
            self.got = state

    monkeypatch.setattr(datastate.jax, "process_count", lambda: 2)
    monkeypatch.setattr(datastate.jax, "process_index", lambda: 1)
    monkeypatch.setattr(datastate.multihost_utils, "process_allgather", allgather)
    meta = datastate.with_data_state({"step": 3}, Fake())
    assert meta[DATA_STATE_KEY] == states
    fake = Fake()
    datastate.restore_data_state(fake, meta, 3)
    assert fake.got == states[1]  # each process takes its own position
    with pytest.raises(ValueError, match="positions of 1 processes, this run has 2"):
        datastate.restore_data_state(fake, {DATA_STATE_KEY: states[:1]}, 3)

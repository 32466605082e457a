"""TensorBoard and W&B (offline) loggers: scalars and a sample grid of a tiny training run.

Both backends are in the ``test`` extra (``pip install -e '.[test]'``), so these tests run in CI
and fail, rather than skip, where tensorboardX or wandb is missing: that is a broken test setup.
W&B runs offline (``WANDB_MODE=offline``): no account or network is needed.
"""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from pixeldit import training as T
from pixeldit.model import C2IConfig
from pixeldit.training.loggers import MetricsLogger, open_logger

CFG = C2IConfig(in_channels=1, patch_size=4, hidden_size=16, num_groups=2, patch_depth=1, pixel_depth=1,
                pixel_hidden_size=8, num_classes=4)
TC = T.TrainConfig(batch_size=4, steps=2, lr=1e-3, log_every=1, checkpoint_every=2)


class Data:
    def get_batch(self, step, batch_size):
        rng = np.random.default_rng(step)
        return {"x": rng.uniform(-1, 1, (batch_size, 8, 8, 1)).astype(np.float32), "y": np.arange(batch_size) % 4}


def grid(tmp_path):
    path = tmp_path / "grid.png"
    Image.fromarray(np.full((6, 10, 3), 200, np.uint8)).save(path)
    return path


def read_events(logdir):
    """``[(step, tag, value or "image")]`` of every TFRecord event file in ``logdir``."""
    from tensorboardX.proto import event_pb2  # noqa: PLC0415 (optional package)

    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):  # record: uint64 length, uint32 crc, payload, uint32 crc
            n = int.from_bytes(data[pos:pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 16 + n
            for v in event.summary.value:
                out.append((event.step, v.tag, "image" if v.HasField("image") else v.simple_value))
    return out


def test_tensorboard_logs_the_train_scalars_and_a_grid(tmp_path):
    T.train(CFG, dataclasses.replace(TC, logger="tensorboard"), Data(), tmp_path, progress=False)
    logger = open_logger("tensorboard", tmp_path)
    logger.image(2, "samples", grid(tmp_path))
    logger.close()
    events = read_events(tmp_path / "tensorboard")
    assert {"train/loss", "train/grad_norm", "train/lr", "train/steps_per_sec"} <= {tag for _, tag, _ in events}
    losses = [(step, v) for step, tag, v in events if tag == "train/loss"]
    assert losses == [(m["step"], pytest.approx(m["loss"])) for m in T.read_metrics(tmp_path)]
    assert (2, "samples", "image") in events


def test_wandb_offline_logs_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    import wandb  # noqa: PLC0415 (optional package)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = open_logger("wandb", tmp_path, {"lr": 1e-3})
    logger.scalars(1, {"loss": 0.5, "repa_loss": 0.25})
    logger.image(1, "samples", grid(tmp_path))
    run_id = logger.run.id
    logger.close()
    wandb.teardown()  # the wandb-core service writes the record file; stopping it flushes that file
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    # offline, the run is a record file to `wandb sync` later (wandb 0.31 ships no Python reader for it):
    # its history records hold the keys and JSON values, the grid goes to the run's media folder
    (records,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = records.read_bytes()
    assert b"train/loss" in data and b"train/repa_loss" in data and b"0.25" in data
    assert list(records.parent.glob("files/media/images/samples_1_*.png"))
    again = open_logger("wandb", tmp_path)
    assert again.run.id == run_id
    again.close()


def test_jsonl_logger_and_bad_names(tmp_path):
    assert type(open_logger("jsonl", tmp_path)) is MetricsLogger
    with pytest.raises(ValueError, match="train.logger must be one of jsonl, tensorboard, wandb, got 'csv'"):
        open_logger("csv", tmp_path)
    with pytest.raises(ValueError, match='logger must be "jsonl", "tensorboard" or "wandb"'):
        T.TrainConfig(logger="csv")

"""The data scale of :mod:`pixeldit.conditions` and its path through runs: fields / scale in
training, samples * scale back in data units."""

from __future__ import annotations

import numpy as np
import pytest

from pixeldit import conditions, runconfig, runs
from pixeldit.data import load_dataset


def test_grf_data_scale_is_the_prior_pixel_std():
    # sqrt(E[exp(2a)]) for a ~ U[-1, 1] is sqrt(sinh(2) / 2); the simulator's fields agree
    assert conditions.grf_data_scale(-1.0, 1.0) == pytest.approx(np.sqrt(np.sinh(2.0) / 2.0), rel=1e-12)
    assert conditions.grf_data_scale(-1.0, 1.0) == pytest.approx(1.3466, abs=1e-4)
    assert conditions.grf_data_scale(0.5, 0.5) == pytest.approx(np.exp(0.5))
    x = load_dataset("grf", size=16, seed=3).get_batch(0, 4096)["x"]
    assert float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2))) == pytest.approx(1.3466, rel=0.03)


class Arrays:
    name = "arrays"

    def __init__(self, x):
        self.x = x
        self.image_shape = x.shape[1:]

    def get_batch(self, step, batch_size):
        return {"x": self.x[:batch_size], "y": np.arange(batch_size, dtype=np.int32)}

    def arrays(self):
        return self.x, np.zeros(len(self.x), np.int32)

    def metadata(self):
        return {"name": self.name}


def test_scaled_dataset_divides_x_and_records_the_scale():
    x = np.random.default_rng(0).normal(size=(5, 4, 4, 1)).astype(np.float32) * 3.0
    ds = conditions.ScaledDataset(Arrays(x), 2.5)
    b = ds.get_batch(0, 3)
    np.testing.assert_allclose(b["x"], x[:3] / 2.5, rtol=1e-6)
    np.testing.assert_array_equal(b["y"], [0, 1, 2])
    assert b["x"].dtype == np.float32 and ds.image_shape == (4, 4, 1)  # other attributes pass through
    assert ds.metadata() == {"name": "arrays", "data_scale": 2.5}
    assert conditions.data_scale_of({"dataset": ds.metadata()}) == 2.5
    assert conditions.data_scale_of({"dataset": {"name": "grf"}}) == 1.0  # checkpoints without one
    with pytest.raises(ValueError, match="data scale must be a finite number > 0"):
        conditions.ScaledDataset(Arrays(x), 0.0)


def test_auto_data_scale():
    x = np.random.default_rng(1).normal(size=(64, 4, 4, 1)) * 0.7 + 0.2
    assert conditions.auto_data_scale(Arrays(x)) == pytest.approx(np.std(x), rel=1e-12)
    grf = load_dataset("grf", size=8, prior_low=[-0.5, 1.0], prior_high=[0.5, 4.0])
    assert conditions.auto_data_scale(grf) == pytest.approx(conditions.grf_data_scale(-0.5, 0.5))

    class Streamed:
        def metadata(self):
            return {"name": "shards"}

    with pytest.raises(runconfig.ConfigError, match="give data.scale as a number"):
        conditions.auto_data_scale(Streamed())


@pytest.mark.parametrize("value", ["auto", 2, 0.5])
def test_data_scale_setting(value):
    run = runconfig.load_run_config("grf", [f"data.scale={value!r}" if isinstance(value, str) else f"data.scale={value}"])
    assert run.data.scale == value
    ds = runs.load_run_dataset(run)
    want = conditions.grf_data_scale(-1.0, 1.0) if value == "auto" else float(value)
    assert runs.run_data_scale(run, ds, {}) == pytest.approx(want)
    # a resumed "auto" run keeps the scale its checkpoint recorded
    assert runs.run_data_scale(run, ds, {"dataset": {"data_scale": 1.25}}) == (1.25 if value == "auto" else value)


@pytest.mark.parametrize("value", ["'big'", "0", "-1.5"])
def test_data_scale_setting_rejects(value):
    with pytest.raises(runconfig.ConfigError, match='data.scale must be "auto" or a number > 0'):
        runconfig.load_run_config("grf", [f"data.scale={value}"])


@pytest.mark.slow  # one tiny training and sampling (~20 s on 2 cores)
def test_scaled_run_trains_scaled_and_samples_in_data_units(tmp_path):
    from pixeldit.training import load_checkpoint

    tiny = ["model.hidden_size=16", "model.num_groups=2", "model.patch_depth=1", "model.pixel_depth=1",
            "model.pixel_hidden_size=4", "data.size=8", "train.batch_size=4", "train.sample_every=0",
            "train.steps=2", "sample.steps=2", "sample.num_samples=3", "sample.batch_size=3", "data.scale=2.0"]
    runs.train_run(runconfig.load_run_config("grf", tiny), tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path)
    assert conditions.data_scale_of(ckpt) == 2.0
    out = runs.sample_run(tmp_path, progress=False)
    with np.load(out["npz"]) as f:
        x, theta = f["x"], f["theta"]
    s = runconfig.read_run_config(tmp_path).sample
    raw = conditions.draw_samples(ckpt.model, ckpt.model_config, (8, 8), theta, np.full_like(theta, np.nan),
                                  method=s.method, steps=s.steps, guidance=1.0, seed=s.seed, batch_size=3)
    np.testing.assert_allclose(x, 2.0 * np.asarray(raw), rtol=1e-6, atol=1e-7)  # model units times the scale
    assert np.abs(raw).max() > 0  # (a trained model's samples are not all zero)

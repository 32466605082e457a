"""Library side of ``pixeldit infer``: the emulator built from a checkpoint, the prior box, observed fields."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pixeldit.data import DataError
from pixeldit.infer_run import _theta_box, emulator_from_checkpoint, read_observed
from pixeldit.model import ThetaConfig
from pixeldit.runconfig import ConfigError

ENCODING = {"kind": "affine", "center": [0.0, 2.5], "scale": [1.0, 1.5]}


def checkpoint(config, meta):
    return SimpleNamespace(model=object(), model_config=config, meta=meta)


def test_model_that_encodes_theta_itself_gets_raw_theta():
    cfg = ThetaConfig(theta_dim=2).with_encoding([-1, 1], [1, 4])
    emu = emulator_from_checkpoint(checkpoint(cfg, {"dataset": {"name": "grf", "theta_encoding": ENCODING}}))
    assert emu.theta_encoding is None and emu.data_scale == 1.0 and emu.mean_mode == "zero_mean"
    np.testing.assert_array_equal(emu.encode(np.array([[0.5, 2.0]])), [[0.5, 2.0]])


def test_encoding_recorded_beside_the_data_is_applied():
    emu = emulator_from_checkpoint(checkpoint(ThetaConfig(theta_dim=2, theta_channels=2),
                                              {"dataset": {"name": "fields.npz", "theta_encoding": ENCODING}}))
    assert emu.mean_mode == "full"
    np.testing.assert_allclose(emu.encode(np.array([[0.5, 4.0]])), [[[0.5, 1.0], [1.0, 1.0]]])


def test_data_scale_from_the_checkpoint_meta():
    cfg = ThetaConfig(theta_dim=2)
    assert emulator_from_checkpoint(checkpoint(cfg, {"dataset": {"data_scale": 1.35}})).data_scale == 1.35
    assert emulator_from_checkpoint(checkpoint(cfg, {"dataset": {}})).data_scale == 1.0  # runs without a scale


def test_theta_box_from_prior_or_encoding():
    cfg = ThetaConfig(theta_dim=2).with_encoding([0, 1], [2, 5])
    low, high = _theta_box(cfg, {"prior_low": [-1, 1], "prior_high": [1, 4]})
    np.testing.assert_array_equal(np.stack([low, high]), [[-1, 1], [1, 4]])
    low, high = _theta_box(cfg, {})
    np.testing.assert_allclose(np.stack([low, high]), [[0, 1], [2, 5]])
    low, high = _theta_box(ThetaConfig(theta_dim=2), {"theta_encoding": ENCODING})
    np.testing.assert_allclose(np.stack([low, high]), [[-1, 1], [1, 4]])
    with pytest.raises(ConfigError, match="records no theta box"):
        _theta_box(ThetaConfig(theta_dim=2), {})


def test_read_observed_adds_the_channel_and_keeps_the_truth(tmp_path):
    np.savez(tmp_path / "o.npz", x=np.ones((3, 8, 8)), theta=np.zeros((3, 2)))
    x, theta = read_observed(tmp_path / "o.npz", (8, 8, 1))
    assert x.shape == (3, 8, 8, 1) and x.dtype == np.float32 and theta.shape == (3, 2)
    np.savez(tmp_path / "o.npz", x=np.ones((3, 8, 8)), theta=np.zeros((2, 2)))
    assert read_observed(tmp_path / "o.npz", (8, 8, 1))[1] is None  # not one theta per field: no truth
    np.savez(tmp_path / "o.npz", x=np.array([["a"] * 8] * 8)[None])
    with pytest.raises(DataError, match="numeric"):
        read_observed(tmp_path / "o.npz", (8, 8, 1))
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        read_observed(tmp_path / "bad.npz", (8, 8, 1))

"""The timing helpers run and report consistent fields."""

import numpy as np

from pixeldit.inference import Emulator
from pixeldit.inference.timing import GRF_PRESET, grf_emulator, time_grid_posterior, time_log_prob

from test_likelihood import grf_velocity


def test_time_log_prob_reports_rates():
    emu = Emulator(grf_velocity, mean_mode="zero_mean")
    out = time_log_prob(emu, 8, divergence="hutchinson", probes=2, fields=2, thetas=2, repeats=1)
    assert out["pairs"] == 4 and out["seconds"] > 0 and out["mean_steps"] > 1 and out["probes"] == 2
    np.testing.assert_allclose(out["pairs_per_s"], 4 / out["seconds"])


def test_time_grid_posterior_and_preset():
    out = time_grid_posterior(Emulator(grf_velocity, mean_mode="zero_mean"), 8, coarse=5, fine=5, max_zoom=2)
    assert out["seconds"] > 0 and out["evaluations"] >= 2 * 25  # one shape: one compile
    emu = grf_emulator()
    assert emu.model.config.hidden_size == GRF_PRESET["hidden_size"] and emu.encode(np.zeros((1, 2))).shape == (1, 2, 2)

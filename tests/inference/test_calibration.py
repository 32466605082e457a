"""SBC, TARP, PPC and exact-GRF scores on posteriors whose calibration is known."""

import jax
import numpy as np
import pytest

from pixeldit.data import grf
from pixeldit.inference import Emulator
from pixeldit.inference.calibration import (calibrate, exact_grf_posterior, exact_grf_scores, posterior_scores,
                                            ppc_spectrum, sbc_ks, sbc_ranks, tarp_coverage)
from pixeldit.inference.plots import corner_plot, ppc_plot, rank_histograms, tarp_plot

from test_likelihood import grf_velocity


def conjugate_case(n, s, width=1.0, seed=0):
    """theta ~ N(0, 1) in 2-D, x = theta + N(0, 0.5^2): exact posterior N(0.8 x, 0.2), draws scaled by width."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n, 2))
    x = theta + 0.5 * rng.normal(size=(n, 2))
    mean, std = 0.8 * x, np.sqrt(0.2)
    samples = mean[:, None, :] + width * std * rng.normal(size=(n, s, 2))
    return samples, theta


def test_calibrated_posterior_passes():
    samples, theta = conjugate_case(2000, 100)
    cal = calibrate(samples, theta, [-5, -5], [5, 5])
    assert cal.ranks.shape == (2000, 2) and cal.ranks.min() >= 0 and cal.ranks.max() <= 100
    assert np.all(cal.ks_p > 0.01), cal.ks_p
    assert cal.tarp_deviation < 0.05
    report = cal.report(["a", "b"])
    assert report["passed"] and len(report["checks"]) == 3


@pytest.mark.parametrize("width", [0.6, 1.6])
def test_miscalibrated_posterior_fails(width):
    samples, theta = conjugate_case(2000, 100, width=width)
    cal = calibrate(samples, theta, [-5, -5], [5, 5])
    assert np.all(cal.ks_p < 1e-4), cal.ks_p
    assert cal.tarp_deviation > 0.1
    assert not cal.report()["passed"]


def test_ranks_and_ks_by_hand():
    samples = np.array([[[0.0], [1.0], [2.0]], [[5.0], [6.0], [7.0]]])
    np.testing.assert_array_equal(sbc_ranks(samples, np.array([[1.5], [4.0]])), [[2], [0]])
    uniform = np.arange(1000)[:, None] % 11  # ranks spread evenly over 0..10
    assert sbc_ks(uniform, 10)[0] > 0.1
    assert sbc_ks(np.zeros((1000, 1), int), 10)[0] < 1e-10


def test_tarp_with_given_references_by_hand():
    # one simulation: the true theta at distance 0.5 from the reference, draws at 0.25 and 1.0
    samples = np.array([[[0.25], [1.0]]])
    alpha, ecp = tarp_coverage(samples, np.array([[0.5]]), [0.0], [2.0], references=np.array([[0.0]]), num_alpha=5)
    np.testing.assert_array_equal(alpha, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(ecp, [0, 0, 0, 1, 1])  # f = 1/2: covered from alpha > 0.5


def test_ppc_spectrum_tells_right_from_wrong_theta():
    theta = np.array([0.0, 2.5])
    observed = grf.simulate(theta, 1, 32)
    right = ppc_spectrum(observed, grf.simulate(np.tile(theta, (200, 1)), 2, 32))
    wrong = ppc_spectrum(observed, grf.simulate(np.tile([0.0, 3.5], (200, 1)), 2, 32))
    assert right["inside95"] >= 0.8 and np.all(np.abs(right["z"]) < 4)
    assert wrong["inside95"] < 0.5
    with pytest.raises(ValueError, match="observed field's size"):
        ppc_spectrum(observed, grf.simulate(np.tile(theta, (4, 1)), 2, 16))


def test_emulator_draws_follow_the_exact_spectrum():
    theta = np.tile([0.2, 2.0], (64, 1))
    draws = Emulator(grf_velocity).sample(theta, jax.random.key(0), (16, 16, 1), method="adaptive", num_steps=8)
    _, p = grf.radial_power_spectrum(draws)
    _, expected = grf.expected_power_spectrum(theta[0], 16)
    np.testing.assert_allclose(p.mean(axis=0), expected, rtol=0.35)  # 64 draws: ~15 % noise per bin


def test_posterior_scores_thresholds():
    exact_mean, exact_std = np.zeros((4, 1)), np.ones((4, 1))
    mean = np.array([[0.1], [0.29], [0.31], [0.0]])
    std = np.array([[1.0], [0.81], [1.0], [1.3]])
    s = posterior_scores(mean, std, exact_mean, exact_std)
    np.testing.assert_array_equal(s["ok"][:, 0], [True, True, False, False])
    assert s["fraction_ok_all"] == 0.5 and not s["passed"]
    with pytest.raises(ValueError, match="must all be"):
        posterior_scores(mean, std[:2], exact_mean, exact_std)


def test_exact_grf_scores_pass_for_the_exact_posterior_and_fail_for_a_biased_one():
    fields = grf.simulate(np.array([[0.0, 2.5], [0.5, 3.0], [-0.5, 3.5]]), 3, 16)
    assert exact_grf_scores(fields, lambda f: exact_grf_posterior(f, fine=24))["passed"]
    # a prior cut at slope 2 (far below every true slope) biases every slope posterior
    biased = exact_grf_scores(fields, lambda f: exact_grf_posterior(f, low=(-1.0, 1.0), high=(1.0, 2.0)))
    assert biased["fraction_ok"][1] == 0 and not biased["passed"]


def test_plots_write_files(tmp_path):
    samples, theta = conjugate_case(200, 50)
    cal = calibrate(samples, theta, [-5, -5], [5, 5])
    corner_plot(samples[0], names=["a", "b"], truth=theta[0], exact_samples=samples[1] - samples[1].mean(0)
                + samples[0].mean(0), path=tmp_path / "corner.png", title="obs 0")
    rank_histograms(cal.ranks, cal.num_draws, names=["a", "b"], path=tmp_path / "ranks.png")
    tarp_plot(cal.alpha, cal.ecp, path=tmp_path / "tarp.png")
    observed = grf.simulate([0.0, 2.5], 1, 16)
    ppc_plot(ppc_spectrum(observed, grf.simulate(np.tile([0.0, 2.5], (20, 1)), 2, 16)), path=tmp_path / "ppc.png")
    for name in ("corner", "ranks", "tarp", "ppc"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_likelihood_correlation_of_the_exact_velocity_is_one():
    from pixeldit.inference.calibration import likelihood_correlation

    fields = grf.simulate(np.array([[0.0, 2.5], [0.4, 1.5]]), 4, 8)
    out = likelihood_correlation(Emulator(grf_velocity, mean_mode="zero_mean"), fields, points=3)
    assert out["thetas"].shape == (2, 9, 2)
    assert out["mean_r"] > 0.9999, out["r"]
    np.testing.assert_allclose(out["learned"], out["exact"], atol=64e-3)  # 1e-3 nats per dimension

"""Grid and MCMC posteriors against analytic posteriors and a brute-force grid of the exact GRF likelihood."""

import numpy as np
import pytest
from scipy.special import logsumexp

from pixeldit.data import grf
from pixeldit.inference.posterior import grid_posterior, mcmc_posterior, prior_box


def gaussian_log_likelihood(mu, cov):
    mu, prec = np.asarray(mu, np.float64), np.linalg.inv(cov)
    norm = -0.5 * np.linalg.slogdet(2 * np.pi * np.asarray(cov))[1]

    def ll(theta):
        d = np.asarray(theta, np.float64) - mu
        return norm - 0.5 * np.einsum("mi,ij,mj->m", d, prec, d)

    return ll


def test_grid_finds_a_needle_in_a_wide_prior():
    # posterior std 1e-3 in a prior of width 10: the coarse grid cell is 800 stds wide
    post = grid_posterior(gaussian_log_likelihood([3.21], [[1e-6]]), [0.0], [10.0], num_samples=4000)
    np.testing.assert_allclose(post.mean, [3.21], atol=2e-5)
    np.testing.assert_allclose(post.std, [1e-3], rtol=0.01)
    # the likelihood is a normalised density in theta, so the evidence is 1 / prior width
    np.testing.assert_allclose(post.log_evidence, -np.log(10.0), atol=1e-3)
    # intervals come from draws spread uniformly over each cell (variance + cell^2 / 12): 0.1 std
    np.testing.assert_allclose(post.intervals[0.68][0], [3.21 - 1e-3, 3.21 + 1e-3], atol=1e-4)
    np.testing.assert_allclose(post.intervals[0.95][0], [3.21 - 1.96e-3, 3.21 + 1.96e-3], atol=1e-4)
    assert post.extra["converged"]
    np.testing.assert_allclose(post.samples.mean(axis=0), [3.21], atol=1e-4)
    assert post.samples.shape == (4000, 1)


def test_grid_correlated_2d_and_3d():
    cov2 = np.array([[0.04, 0.03], [0.03, 0.09]]) * 1e-2
    post = grid_posterior(gaussian_log_likelihood([0.3, 2.0], cov2), [-1, 1], [1, 4])
    np.testing.assert_allclose(post.mean, [0.3, 2.0], atol=0.02 * 0.02)
    np.testing.assert_allclose(post.std, np.sqrt(np.diag(cov2)), rtol=0.02)
    np.testing.assert_allclose(post.log_evidence, -np.log(6.0), atol=0.01)
    cov3 = np.diag([0.01, 0.02, 0.03]) ** 2
    post = grid_posterior(gaussian_log_likelihood([0.1, 0.2, 0.3], cov3), [-1, -1, -1], [1, 1, 1], fine=24)
    np.testing.assert_allclose(post.std, [0.01, 0.02, 0.03], rtol=0.03)


def test_grid_matches_brute_force_on_the_exact_grf_likelihood():
    size = 16
    theta_true = np.array([0.2, 2.5])
    field = grf.simulate(theta_true, 5, size)
    low, high = np.array(grf.PRIOR_LOW), np.array(grf.PRIOR_HIGH)
    post = grid_posterior(lambda th: grf.grf_log_likelihood(field, th), low, high)
    # brute force: one 400 x 400 grid over the whole prior, midpoint rule
    a = low[0] + (np.arange(400) + 0.5) * (high[0] - low[0]) / 400
    b = low[1] + (np.arange(400) + 0.5) * (high[1] - low[1]) / 400
    mesh = np.stack(np.meshgrid(a, b, indexing="ij"), -1).reshape(-1, 2)
    ll = np.concatenate([grf.grf_log_likelihood(field, c) for c in np.array_split(mesh, 16)])
    w = np.exp(ll - logsumexp(ll))
    mean = w @ mesh
    std = np.sqrt(w @ (mesh - mean) ** 2)
    evidence = logsumexp(ll) - np.log(400 * 400)
    assert post.num_evaluations < 4000
    np.testing.assert_allclose(post.mean, mean, atol=0.02 * std.min())
    np.testing.assert_allclose(post.std, std, rtol=0.02)
    np.testing.assert_allclose(post.log_evidence, evidence, atol=0.02)


def test_mcmc_matches_an_analytic_4d_posterior():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    cov = (a @ a.T + 4 * np.eye(4)) * 1e-3
    mu = np.array([0.1, -0.2, 0.3, 0.0])
    post = mcmc_posterior(gaussian_log_likelihood(mu, cov), -np.ones(4), np.ones(4), warmup=600, steps=1500)
    std = np.sqrt(np.diag(cov))
    assert 0.1 < post.extra["acceptance"] < 0.6
    np.testing.assert_allclose(post.mean, mu, atol=0.15 * std.max())
    np.testing.assert_allclose(post.std, std, rtol=0.15)
    assert post.log_evidence is None and post.samples.shape == (1000, 4)


def test_bad_arguments():
    ll = gaussian_log_likelihood([0.0], [[1.0]])
    with pytest.raises(ValueError, match="prior box"):
        prior_box([1.0], [0.0])
    with pytest.raises(ValueError, match="1-3 parameters"):
        grid_posterior(ll, np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match="not finite anywhere"):
        grid_posterior(lambda th: np.full(len(th), np.nan), [0.0], [1.0])


def test_emulator_log_likelihood_pads_chunks_without_changing_values():
    from pixeldit.inference import Emulator, emulator_log_likelihood, log_prob

    from test_likelihood import grf_velocity

    emu = Emulator(grf_velocity, mean_mode="zero_mean")
    field = grf.simulate(np.array([0.0, 2.5]), 0, 8)
    theta = grf.sample_prior(1, 5).astype(np.float32)
    ll = emulator_log_likelihood(emu, field, chunk=2)(theta)
    np.testing.assert_allclose(ll, log_prob(emu, field, theta).value[0], rtol=1e-5)
    with pytest.raises(ValueError, match="one field"):
        emulator_log_likelihood(emu, field[None])

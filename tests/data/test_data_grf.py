"""Tests for the Gaussian-random-field simulator, likelihood and stream."""

import numpy as np
import pytest

from pixeldit.data import (
    PRIOR_HIGH,
    PRIOR_LOW,
    DataError,
    GRFDataset,
    expected_power_spectrum,
    grf_log_likelihood,
    load_dataset,
    power_spectrum,
    radial_power_spectrum,
    sample_prior,
    simulate,
    whitened_chi2,
)


def test_spectrum_normalisation_is_exact():
    theta = np.array([[0.3, 2.0], [-1.0, 4.0], [1.0, 1.0]])
    for n in (4, 5, 32):
        s = power_spectrum(theta, n)
        assert s.shape == (3, n, n)
        assert (s[:, 0, 0] == 0).all()
        np.testing.assert_allclose(s.mean(axis=(1, 2)), np.exp(2 * theta[:, 0]), rtol=1e-12)
        # symmetric under k -> -k, as needed for real fields
        np.testing.assert_allclose(s, np.roll(s[:, ::-1, ::-1], 1, axis=(1, 2)))


@pytest.mark.parametrize("theta", [(0.4, 2.0), (-0.7, 4.0)])
def test_empirical_pixel_variance_and_zero_mean(theta):
    f = simulate(np.tile(theta, (1500, 1)), np.random.default_rng(1), size=16)[..., 0].astype(np.float64)
    assert f.shape == (1500, 16, 16)
    np.testing.assert_allclose(f.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.mean(f**2), np.exp(2 * theta[0]), rtol=0.05)


def test_simulate_shapes_and_seeding():
    a = simulate((0.0, 2.0), 7)
    assert a.shape == (32, 32, 1) and a.dtype == np.float32
    np.testing.assert_array_equal(a, simulate((0.0, 2.0), np.random.default_rng(7)))
    assert not np.array_equal(a, simulate((0.0, 2.0), 8))
    assert simulate(np.zeros((3, 2)) + [0, 2], 0, size=8).shape == (3, 8, 8, 1)


def _dense_covariance(theta, n):
    """Pixel covariance C = F^-1 diag(S) F built explicitly from the spectrum."""
    s = power_spectrum(theta, n).reshape(-1)
    # DFT matrix over the flattened 2-D index: F[k, x] = exp(-2 pi i k.x / n)
    k = np.array([(a, b) for a in range(n) for b in range(n)])
    phase = np.exp(-2j * np.pi * (k @ k.T) / n)
    return np.real(phase.conj().T @ np.diag(s) @ phase) / n**2


def test_simulated_covariance_matches_dense_covariance():
    theta = np.array([0.1, 2.0])
    f = simulate(np.tile(theta, (20000, 1)), 5, size=4).reshape(20000, 16).astype(np.float64)
    emp = f.T @ f / len(f)
    cov = _dense_covariance(theta, 4)
    np.testing.assert_allclose(emp, cov, atol=0.04 * cov.max())
    np.testing.assert_allclose(cov.sum(axis=1), 0.0, atol=1e-12)  # zero mode has zero variance


def _brute_force_loglik(field, theta, n):
    """Dense Gaussian log density restricted to the zero-mean subspace."""
    cov = _dense_covariance(theta, n)
    # orthonormal basis of the zero-mean subspace
    u, _, _ = np.linalg.svd(np.eye(n * n) - 1.0 / (n * n))
    q = u[:, : n * n - 1]
    c = q.T @ cov @ q
    z = q.T @ field.reshape(-1)
    sign, logdet = np.linalg.slogdet(c)
    assert sign > 0
    return -0.5 * (z @ np.linalg.solve(c, z) + logdet + (n * n - 1) * np.log(2 * np.pi))


@pytest.mark.parametrize("n", [4, 5])
def test_log_likelihood_matches_dense_gaussian(n):
    rng = np.random.default_rng(0)
    for theta in [(0.2, 2.5), (-0.8, 1.2), (0.9, 3.7)]:
        f = simulate(theta, rng, size=n)[..., 0].astype(np.float64)
        ref = _brute_force_loglik(f, np.array(theta), n)
        np.testing.assert_allclose(grf_log_likelihood(f, theta), ref, rtol=1e-9, atol=1e-8)
        # a random (not simulated) field with its mean removed also matches
        g = rng.normal(size=(n, n))
        g -= g.mean()
        np.testing.assert_allclose(grf_log_likelihood(g, theta), _brute_force_loglik(g, np.array(theta), n), rtol=1e-9)
        # the mean (degenerate zero mode) is ignored
        np.testing.assert_allclose(grf_log_likelihood(g + 3.0, theta), grf_log_likelihood(g, theta), rtol=1e-12)


def test_log_likelihood_batched_and_peaks_near_truth():
    theta = np.array([0.3, 2.5])
    f = simulate(np.tile(theta, (20, 1)), 3, size=16)
    ll = grf_log_likelihood(f, np.tile(theta, (20, 1)))
    assert ll.shape == (20,)
    np.testing.assert_allclose(ll[4], grf_log_likelihood(f[4], theta))
    total = lambda t: grf_log_likelihood(f, t).sum()  # noqa: E731
    assert total(theta) > total(theta + [0, 0.5]) and total(theta) > total(theta - [0, 0.5])
    assert total(theta) > total(theta + [0.3, 0]) and total(theta) > total(theta - [0.3, 0])
    np.testing.assert_allclose(whitened_chi2(f, theta).mean(), 1.0, atol=0.05)


def test_expected_power_spectrum_matches_simulation():
    theta = np.array([0.5, 3.0])
    k, p_exp = expected_power_spectrum(theta, 32)
    assert k.shape == p_exp.shape == (16,)
    np.testing.assert_array_equal(k, np.arange(1, 17))
    f = simulate(np.tile(theta, (400, 1)), 11, size=32)
    k2, p = radial_power_spectrum(f)
    np.testing.assert_array_equal(k, k2)
    assert p.shape == (400, 16)
    np.testing.assert_allclose(p.mean(axis=0), p_exp, rtol=0.1)
    # decreasing power law with the requested slope (away from binning effects)
    fit = np.polyfit(np.log(k[3:]), np.log(p_exp[3:]), 1)[0]
    assert abs(fit + 3.0) < 0.15
    assert expected_power_spectrum(np.tile(theta, (3, 1)), 32)[1].shape == (3, 16)


def test_prior_and_stream():
    th = sample_prior(np.random.default_rng(0), 2000)
    assert th.shape == (2000, 2)
    assert (th >= PRIOR_LOW).all() and (th <= PRIOR_HIGH).all()
    assert PRIOR_LOW == (-1.0, 1.0) and PRIOR_HIGH == (1.0, 4.0)
    ds = load_dataset("grf", seed=4)
    assert ds.name == "grf" and ds.image_shape == (32, 32, 1)
    assert ds.condition == "theta" and ds.theta_dim == 2 and ds.num_classes is None
    b1 = ds.get_batch(10, 6)
    b2 = GRFDataset(seed=4).get_batch(10, 6)
    np.testing.assert_array_equal(b1["x"], b2["x"])
    np.testing.assert_array_equal(b1["y"], b2["y"])
    assert b1["x"].shape == (6, 32, 32, 1) and b1["x"].dtype == np.float32
    assert b1["y"].shape == (6, 2) and b1["y"].dtype == np.float32
    assert not np.array_equal(b1["x"], ds.get_batch(11, 6)["x"])
    assert not np.array_equal(b1["y"], GRFDataset(seed=5).get_batch(10, 6)["y"])
    assert load_dataset("grf", resolution=16).image_shape == (16, 16, 1)
    with pytest.raises(DataError, match="patch_size=3"):
        GRFDataset(size=16, patch_size=3)

"""Probability-flow log-likelihood against closed-form Gaussian densities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixeldit.data import grf
from pixeldit.inference import Emulator, log_prob
from pixeldit.model import PixelDiTTheta, ThetaConfig

N = 8  # field side for the analytic GRF cases


def _grf_spectrum(theta, size):
    """Exact GRF spectrum S(k) (grf.power_spectrum) in jax, theta (B, 2) -> (B, N, N)."""
    k = np.fft.fftfreq(size) * size
    kmag = jnp.asarray(np.sqrt(k[:, None] ** 2 + k[None, :] ** 2), jnp.float32)
    nonzero = kmag > 0
    shape = jnp.where(nonzero, jnp.where(nonzero, kmag, 1.0)[None] ** (-theta[:, 1, None, None]), 0.0)
    norm = jnp.exp(2.0 * theta[:, 0]) * size**2 / jnp.sum(shape, axis=(1, 2))
    return shape * norm[:, None, None]


def grf_velocity(x, t, theta):
    """Exact rectified-flow velocity of zero-mean GRF data, written per Fourier mode.

    Mode k of x_t = t x + (1 - t) eps has variance t^2 S(k) + (1 - t)^2, so
    E[x - eps | x_t] = (t S - (1 - t)) / (t^2 S + (1 - t)^2) * x_t mode by mode.  The mean mode
    (S = 0) is set to zero velocity: the zero-mean subspace is invariant.
    """
    spec = _grf_spectrum(theta, x.shape[1])  # (B, N, N)
    tt = t[:, None, None]
    coef = (tt * spec - (1 - tt)) / (tt**2 * spec + (1 - tt) ** 2)
    coef = jnp.where(spec > 0, coef, 0.0)
    f = jnp.fft.fft2(x[..., 0])
    return jnp.real(jnp.fft.ifft2(coef * f))[..., None].astype(jnp.float32)


def diag_velocity(s2):
    """Exact velocity for x ~ N(0, theta_0 * diag(s2)), theta (B, 1)."""

    def velocity(x, t, theta):
        s = s2[None] * theta[:, 0, None, None, None]
        tt = t[:, None, None, None]
        return (tt * s - (1 - tt)) / (tt**2 * s + (1 - tt) ** 2) * x

    return velocity


def _diag_density(x, s):
    x = np.asarray(x, np.float64)
    return -0.5 * np.sum(x**2 / s + np.log(2 * np.pi * s), axis=(-3, -2, -1))


@pytest.fixture(scope="module")
def grf_case():
    theta = np.array([[0.0, 2.5], [0.5, 1.5], [-0.5, 3.5]], np.float32)
    x = grf.simulate(theta, 0, N)
    return x, theta


def test_diagonal_gaussian_matches_density():
    rng = np.random.default_rng(0)
    s2 = rng.uniform(0.2, 3.0, (4, 4, 1)).astype(np.float32)
    theta = np.array([[1.0], [1.5], [0.7]], np.float32)
    x = (rng.normal(size=(2, 4, 4, 1)) * np.sqrt(s2)).astype(np.float32)
    r = log_prob(diag_velocity(jnp.asarray(s2)), x, theta)
    true = np.array([[_diag_density(xi, s2 * th[0]) for th in theta] for xi in x])
    assert r.value.shape == (2, 3) and r.dim == 16
    np.testing.assert_allclose(r.value, true, atol=16e-3 * 0.1)  # well inside 1e-3 nats/dim
    np.testing.assert_allclose(r.nats_per_dim, -true / 16, atol=1e-3)
    np.testing.assert_allclose(r.bits_per_dim, -true / (16 * np.log(2)), atol=1e-3)


def test_grf_zero_mean_matches_exact_likelihood(grf_case):
    x, theta = grf_case
    r = log_prob(Emulator(grf_velocity, mean_mode="zero_mean"), x, theta)
    exact = np.stack([grf.grf_log_likelihood(xi, theta) for xi in x])  # (N, M)
    assert r.dim == N * N - 1
    per_dim = np.abs(r.value - exact) / r.dim
    assert per_dim.max() < 1e-3, per_dim


def test_zero_mean_ignores_the_field_mean(grf_case):
    x, theta = grf_case
    emu = Emulator(grf_velocity, mean_mode="zero_mean")
    a = log_prob(emu, x[:1], theta).value
    b = log_prob(emu, x[:1] + 3.0, theta).value
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_field_alone_equals_field_in_batch(grf_case):
    x, theta = grf_case
    emu = Emulator(grf_velocity, mean_mode="zero_mean")
    batch = log_prob(emu, x, theta)
    assert len(np.unique(batch.num_steps)) > 1  # the pairs really took different step counts
    for i in range(len(x)):
        for j in range(len(theta)):
            alone = log_prob(emu, x[i:i + 1], theta[j:j + 1])
            np.testing.assert_allclose(alone.value[0, 0], batch.value[i, j], rtol=1e-5)
            assert alone.num_steps[0, 0] == batch.num_steps[i, j]


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])  # spectral: exact here, see test_probes.py
def test_hutchinson_is_unbiased(grf_case, probe):
    x, theta = grf_case
    emu = Emulator(grf_velocity, mean_mode="zero_mean")
    exact = log_prob(emu, x[:1], theta[:2]).value
    est = log_prob(emu, x[:1], theta[:2], divergence="hutchinson", probes=256, probe=probe, key=jax.random.key(3))
    assert np.all(est.stderr > 0)
    z = (est.value - exact) / est.stderr
    assert np.all(np.abs(z) < 4.0), z


def test_common_random_numbers_reduce_the_variance_of_differences(grf_case):
    x, _ = grf_case
    theta = np.array([[0.0, 2.5], [0.05, 2.6]], np.float32)
    reps = 24
    xs = np.repeat(x[:1], reps, axis=0)
    keys = jax.random.split(jax.random.key(7), reps)
    r = log_prob(Emulator(grf_velocity, mean_mode="zero_mean"), xs, theta, divergence="hutchinson", probes=2,
                 probe="rademacher", key=keys)  # spectral probes are exact for this stationary velocity: no noise
    crn = r.value[:, 0] - r.value[:, 1]  # same probes at both thetas
    independent = r.value[:, 0] - np.roll(r.value[:, 1], 1)  # probes of another repetition
    assert np.var(crn) < 0.1 * np.var(independent), (np.var(crn), np.var(independent))


def test_emulator_units_and_theta_encoding():
    s2 = jnp.asarray(np.linspace(0.5, 2.0, 16).reshape(4, 4, 1), jnp.float32)
    center, scale, data_scale = np.array([2.0]), np.array([0.5]), 1.7
    inner = diag_velocity(s2)

    def model(x, t, theta_enc):  # sees ((theta - center) / scale, 1): undo it to recover theta
        assert theta_enc.shape[1:] == (1, 2)
        return inner(x, t, theta_enc[..., 0] * scale[0] + center[0])

    emu = Emulator(model, theta_encoding={"kind": "affine", "center": center, "scale": scale}, data_scale=data_scale)
    theta = np.array([[1.0], [2.5]], np.float32)
    x = np.random.default_rng(1).normal(size=(1, 4, 4, 1)).astype(np.float32)
    r = emu.log_prob(x, theta)
    true = [_diag_density(x[0], data_scale**2 * np.asarray(s2) * th[0]) for th in theta]
    np.testing.assert_allclose(r.value[0], true, atol=1e-3)


@pytest.mark.slow  # two diffrax + model compiles (~30 s on 2 cores)
def test_pixeldit_theta_model_runs_and_is_batch_independent():
    cfg = ThetaConfig(hidden_size=16, num_groups=2, patch_depth=1, pixel_depth=1, pixel_hidden_size=4, patch_size=2,
                      theta_channels=2)
    model = PixelDiTTheta(cfg, rngs=nnx.Rngs(0))
    emu = Emulator(model, theta_encoding={"kind": "affine", "center": [0.0, 2.5], "scale": [1.0, 1.5]},
                   mean_mode="zero_mean")
    x = grf.simulate(np.array([[0.0, 2.0], [0.3, 3.0]]), 1, 4)
    theta = np.array([[0.0, 2.0], [0.5, 3.0]], np.float32)
    batch = log_prob(emu, x, theta, divergence="hutchinson", probes=2, key=jax.random.key(0))
    alone = log_prob(emu, x[:1], theta[1:], divergence="hutchinson", probes=2, key=jax.random.key(0))
    assert np.all(np.isfinite(batch.value))
    np.testing.assert_allclose(alone.value[0, 0], batch.value[0, 1], rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"guidance": 2.0}, "guided"),
        ({"divergence": "hutchinson"}, "PRNG key"),
        ({"divergence": "trace"}, "divergence must be"),
        ({"divergence": "hutchinson", "probes": 0, "key": jax.random.key(0)}, "probes"),
        ({"probe": "uniform"}, "probe must be"),
    ],
)
def test_bad_options(kwargs, match):
    x = np.zeros((1, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match=match):
        log_prob(diag_velocity(jnp.ones((4, 4, 1))), x, np.ones((1, 1), np.float32), **kwargs)


@pytest.mark.parametrize(
    "x, theta, match",
    [
        (np.zeros((4, 4), np.float32), np.ones((1, 1)), "x must be fields"),
        (np.full((1, 4, 4, 1), np.nan, np.float32), np.ones((1, 1)), "NaN"),
        (np.zeros((2, 4, 4, 1), np.float32), np.ones((3, 1, 1)), "theta must be"),
        (np.zeros((1, 4, 4, 1), np.float32), np.full((1, 1), np.nan), "null condition"),
    ],
)
def test_bad_inputs(x, theta, match):
    with pytest.raises(ValueError, match=match):
        log_prob(diag_velocity(jnp.ones((4, 4, 1))), x, theta)


def test_bad_emulator_settings():
    with pytest.raises(ValueError, match="data_scale"):
        Emulator(lambda x, t, y: x, data_scale=0.0)
    with pytest.raises(ValueError, match="mean_mode"):
        Emulator(lambda x, t, y: x, mean_mode="none")

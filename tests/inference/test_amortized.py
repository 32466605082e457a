"""Amortised posterior draws and exact log-density (``pixeldit.inference.amortized``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from pixeldit.inference.amortized import posterior_log_prob, sample_posterior
from pixeldit.posterior_model import AmortizedPosterior, PosteriorConfig, standardize, unstandardize


@pytest.fixture(scope="module")
def fields():
    return np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), np.float32)


@pytest.fixture(scope="module")
def identity_flow():
    """Untrained model: zero velocity, so the posterior is exactly the Gaussian stage."""
    return AmortizedPosterior(PosteriorConfig.preset("tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def curved_flow():
    """Untrained model with a non-zero, non-linear velocity (random final layer)."""
    model = AmortizedPosterior(PosteriorConfig.preset("tiny"), rngs=nnx.Rngs(0))
    layer = model.velocity.final_layer
    kernel = 0.5 * jax.random.normal(jax.random.key(7), layer.kernel.get_value().shape)
    layer.kernel.set_value(kernel)
    layer.bias.set_value(jnp.asarray([0.3, -0.2]))
    return model


def test_draws_shape_and_determinism(curved_flow, fields):
    a = sample_posterior(curved_flow, fields, 50, jax.random.key(1))
    b = sample_posterior(curved_flow, fields, 50, jax.random.key(1))
    c = sample_posterior(curved_flow, fields, 50, jax.random.key(2))
    assert a.shape == (2, 50, 2) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_identity_flow_draws_are_the_gaussian_stage(identity_flow, fields):
    key = jax.random.key(3)
    draws = sample_posterior(identity_flow, fields, 20, key, steps=4)
    mu, chol = identity_flow.gaussian(identity_flow.encode(jnp.asarray(fields)))
    z0 = jax.random.normal(key, (2, 20, 2))
    expect = unstandardize(mu[:, None, :] + jnp.einsum("nij,nsj->nsi", chol, z0), identity_flow.config)
    np.testing.assert_allclose(draws, expect, rtol=1e-5, atol=1e-6)


def test_identity_flow_log_prob_is_the_gaussian_density(identity_flow, fields):
    cfg = identity_flow.config
    theta = jnp.asarray(np.random.default_rng(0).uniform([-1, 1], [1, 4], (2, 7, 2)), jnp.float32)
    lp = posterior_log_prob(identity_flow, theta, fields)
    mu, chol = identity_flow.gaussian(identity_flow.encode(jnp.asarray(fields)))
    u = standardize(theta, cfg)
    jac = np.log(2.0 / 2.0) + np.log(2.0 / 3.0)  # du / dtheta of the box (-1, 1) x (1, 4)
    for i in range(2):
        cov = np.asarray(chol[i] @ chol[i].T, np.float64)
        expect = stats.multivariate_normal(np.asarray(mu[i]), cov).logpdf(np.asarray(u[i])) + jac
        np.testing.assert_allclose(lp[i], expect, rtol=1e-5, atol=1e-4)


def _grid(model, field, half_width=9.0, n=55):
    """Grid in theta covering the Gaussian stage's mass +- half_width scales; returns (theta (n*n, 2), cell area)."""
    mu, chol = model.gaussian(model.encode(jnp.asarray(field[None])))
    scale = np.sqrt(np.diag(np.asarray(chol[0] @ chol[0].T)))
    axes = [np.linspace(m - half_width * s, m + half_width * s, n) for m, s in zip(np.asarray(mu[0]), scale)]
    uu = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    theta = np.asarray(unstandardize(jnp.asarray(uu), model.config))
    cell = np.prod([(a[1] - a[0]) for a in axes]) / np.exp(np.log(2.0 / 2.0) + np.log(2.0 / 3.0))
    return theta, cell


def test_log_prob_normalises_and_matches_the_draws(curved_flow, fields):
    """exp(log_prob) integrates to 1 on a grid, and its mean is the mean of the sampler's draws."""
    theta, cell = _grid(curved_flow, fields[0])
    lp = np.asarray(posterior_log_prob(curved_flow, theta[None], fields[:1]))[0]
    p = np.exp(lp)
    assert np.sum(p) * cell == pytest.approx(1.0, abs=2e-3)
    grid_mean = (p[:, None] * theta).sum(0) / p.sum()
    draws = np.asarray(sample_posterior(curved_flow, fields[:1], 20000, jax.random.key(5), steps=64))[0]
    gauss_mean = np.asarray(unstandardize(curved_flow.gaussian(curved_flow.encode(jnp.asarray(fields[:1])))[0], curved_flow.config))[0]
    assert np.abs(grid_mean - gauss_mean).max() > 0.05  # the flow moved the mass
    np.testing.assert_allclose(draws.mean(0), grid_mean, atol=0.02)


def test_log_prob_of_a_pair_does_not_depend_on_its_batch(curved_flow, fields):
    rng = np.random.default_rng(1)
    theta = rng.uniform([-1, 1], [1, 4], (2, 6, 2)).astype(np.float32)
    batch = np.asarray(posterior_log_prob(curved_flow, theta, fields))
    alone = np.asarray(posterior_log_prob(curved_flow, theta[1:, 4:5], fields[1:]))
    np.testing.assert_allclose(alone[0, 0], batch[1, 4], rtol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, x: sample_posterior(m, x[0], 5, jax.random.key(0)), r"fields must have shape \(N, 8, 8, 1\)"),
        (lambda m, x: sample_posterior(m, np.zeros((1, 16, 16, 1)), 5, jax.random.key(0)), "got \\(1, 16, 16, 1\\)"),
        (lambda m, x: sample_posterior(m, np.where(x > 1, np.nan, x), 5, jax.random.key(0)), "must be finite"),
        (lambda m, x: sample_posterior(m, x, 0, jax.random.key(0)), "num_samples must be >= 1"),
        (lambda m, x: posterior_log_prob(m, np.zeros((2, 3, 3)), x), r"theta must have shape \(2, M, 2\)"),
        (lambda m, x: posterior_log_prob(m, np.full((2, 3, 2), np.nan), x), "theta must be finite"),
    ],
)
def test_bad_inputs_raise_one_line_errors(identity_flow, fields, call, match):
    with pytest.raises(ValueError, match=match) as info:
        call(identity_flow, fields)
    assert "\n" not in str(info.value)

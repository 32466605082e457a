"""Hutchinson probe fields: identity second moment, and the spectral probe's exact trace for convolutions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldit.data import grf
from pixeldit.inference import Emulator, log_prob
from pixeldit.inference.probes import PROBES, draw_probes

from test_likelihood import grf_velocity


@pytest.mark.parametrize("shape", [(4, 4, 1), (5, 3, 2), (6, 4, 1)])
@pytest.mark.parametrize("kind", PROBES)
def test_probes_have_identity_second_moment(shape, kind):
    n = 40_000
    z = np.asarray(draw_probes(jax.random.key(0), shape, n, kind), np.float64).reshape(n, -1)
    d = z.shape[1]
    cov = z.T @ z / n
    # entries of a mean of n products of unit-variance terms: standard error about sqrt(2 / n) or less
    np.testing.assert_allclose(cov, np.eye(d), atol=6 * np.sqrt(3.0 / n))


@pytest.mark.parametrize("kind", ["rademacher", "spectral"])
def test_probes_have_the_squared_norm_of_the_dimension(kind):
    z = np.asarray(draw_probes(jax.random.key(1), (6, 5, 2), 8, kind), np.float64)
    np.testing.assert_allclose(np.sum(z**2, axis=(1, 2, 3)), 60.0, rtol=1e-5)


def _circular_convolution(kernel):
    """J x = kernel (*) x per channel, circular; tr J = H * W * kernel[0, 0]."""
    fk = jnp.fft.fft2(kernel)

    def apply(x):  # (H, W, 1)
        return jnp.real(jnp.fft.ifft2(fk * jnp.fft.fft2(x[..., 0])))[..., None]

    return apply


def test_one_spectral_probe_gives_the_exact_trace_of_a_convolution():
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)  # not symmetric: complex eigenvalues
    apply = _circular_convolution(kernel)
    trace = 64 * float(kernel[0, 0])
    for kind, exact in (("spectral", True), ("rademacher", False)):
        z = draw_probes(jax.random.key(2), (8, 8, 1), 16, kind)
        est = np.asarray(jax.vmap(lambda zz: jnp.sum(zz * apply(zz)))(z))
        if exact:
            np.testing.assert_allclose(est, trace, atol=1e-3 * max(1.0, abs(trace)))
        else:
            assert np.std(est) > 1.0  # the pixel-basis probe sees the kernel's off-diagonal mass


def test_spectral_probe_is_unbiased_for_a_non_stationary_matrix():
    rng = np.random.default_rng(3)
    mat = jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)
    z = np.asarray(draw_probes(jax.random.key(4), (4, 4, 1), 20_000, "spectral"), np.float64).reshape(20_000, 16)
    q = np.einsum("pi,ij,pj->p", z, np.asarray(mat, np.float64), z)
    se = q.std() / np.sqrt(len(q))
    assert se > 0.05  # a dense matrix is not diagonal in the Fourier basis: the probe is noisy here
    assert abs(q.mean() - float(jnp.trace(mat))) < 4 * se


def test_spectral_hutchinson_likelihood_is_exact_for_the_stationary_grf_velocity():
    theta = np.array([[0.3, 3.5], [-0.5, 1.5]], np.float32)
    x = grf.simulate(theta[:1], 5, 16)
    emu = Emulator(grf_velocity, mean_mode="zero_mean")
    exact = log_prob(emu, x, theta).value
    one = log_prob(emu, x, theta, divergence="hutchinson", probes=1, probe="spectral", key=jax.random.key(0)).value
    np.testing.assert_allclose(one, exact, atol=2e-3)
    rad = log_prob(emu, x, theta, divergence="hutchinson", probes=1, probe="rademacher", key=jax.random.key(0)).value
    assert np.max(np.abs(rad - exact)) > 0.1  # while one Rademacher probe is off by nats

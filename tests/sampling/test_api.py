"""Tests for pixeldit.sampling.api: compilation caching, reproducibility, trajectories."""

import jax.numpy as jnp
import numpy as np
import pytest

from analytic_fields import MU, S, GaussianFlow, make_noise
from pixeldit.sampling import METHODS, sample, sample_trajectory, timesteps


def test_no_retrace_on_second_call():
    model = GaussianFlow()
    noise = make_noise(b=2, h=2, w=2)
    y, y_null = jnp.array([0, 1]), jnp.array([2, 2])
    kw = dict(method="flow_dpm", num_steps=3)
    GaussianFlow.trace_count = 0
    sample(model, noise, y, y_null, guidance=2.0, **kw)
    first = GaussianFlow.trace_count
    assert first == 1
    # same shapes, different guidance / interval / shift / noise values: no retrace
    sample(model, noise + 1, y, y_null, guidance=3.0, timeshift=2.0,
           guidance_interval=(0.1, 0.9), **kw)
    sample(GaussianFlow(), noise, y, y_null, guidance=2.0, **kw)  # a fresh equal module
    assert GaussianFlow.trace_count == first

    traces = {"n": 0}

    def fn(x, t, y):
        traces["n"] += 1
        return x

    sample(fn, noise, y, method="euler", num_steps=3)
    sample(fn, noise * 2, y, method="euler", num_steps=3, timeshift=4.0)
    assert traces["n"] == 1


def test_reproducible():
    model = GaussianFlow()
    noise = make_noise()
    y, y_null = jnp.array([0, 1]), jnp.array([2, 2])
    for method in ("heun", "dpm_solver_2m"):
        a = sample(model, noise, y, y_null, method=method, num_steps=4, guidance=2.0)
        b = sample(model, noise, y, y_null, method=method, num_steps=4, guidance=2.0)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("method", METHODS)
def test_trajectory(method):
    model = GaussianFlow()
    noise = make_noise(b=1, h=2, w=2)
    y = jnp.array([1])
    kw = dict(method=method, num_steps=3, timeshift=2.0)
    if method == "adaptive":
        kw.update(rtol=1e-6, atol=1e-6)
    final, xs, ts = sample_trajectory(model, noise, y, **kw)
    assert xs.shape == (4, 1, 2, 2, 1)
    np.testing.assert_array_equal(ts, timesteps(3, 2.0))
    np.testing.assert_array_equal(np.asarray(xs[0]), np.asarray(noise))
    np.testing.assert_array_equal(np.asarray(xs[-1]), np.asarray(final))
    direct = sample(model, noise, y, **kw)
    if method == "adaptive":
        np.testing.assert_allclose(np.asarray(final), np.asarray(direct), atol=1e-5)
        # intermediate states lie on the exact path x_t = t mu + sqrt(var_t) eps
        t = ts[:, None, None, None, None].astype(np.float64)
        path = t * float(MU[1]) + np.sqrt(t**2 * S**2 + (1 - t) ** 2) * np.asarray(noise)
        np.testing.assert_allclose(np.asarray(xs), path, atol=1e-5)
    else:
        np.testing.assert_allclose(np.asarray(final), np.asarray(direct), atol=1e-6)

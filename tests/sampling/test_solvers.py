"""Tests for pixeldit.sampling.solvers: accuracy and order of every method on an analytic Gaussian field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analytic_fields import MU, GaussianFlow, exact_endpoint, gaussian_velocity, make_noise
from pixeldit.sampling import sample, solve_adaptive


FIXED = ["euler", "heun", "heun_exact", "flow_dpm", "dpm_solver_2m"]


def _errors(method, steps, shift=1.0):
    model = GaussianFlow()
    noise = make_noise()
    y = jnp.array([0, 1])
    ref = exact_endpoint(noise, y)
    out = []
    for n in steps:
        x = sample(model, noise, y, method=method, num_steps=n, timeshift=shift)
        out.append(float(np.max(np.abs(np.asarray(x) - ref))))
    return np.array(out)


@pytest.fixture(scope="module")
def convergence():
    return {m: _errors(m, [8, 16, 32]) for m in FIXED}


@pytest.mark.parametrize("method", FIXED)
def test_fixed_step_converges(method, convergence):
    err = convergence[method]
    assert np.all(np.diff(err) < 0), err
    order = np.log2(err[-2] / err[-1])
    expected = {"euler": 1.0, "dpm_solver_2m": 0.7}.get(method, 2.0)
    assert order > expected - 0.35, (method, err, order)
    assert err[-1] < {"euler": 6e-2, "dpm_solver_2m": 1e-2}.get(method, 2.5e-3), err


def test_dpm_solver_2m_second_order_asymptotically():
    # On the uniform-in-t grid the last steps are long in lambda = log(t / (1 - t)), so the
    # 2M order only approaches 2 with many steps (the reference t2i recipe shows the same).
    err = _errors("dpm_solver_2m", [64, 128])
    assert np.log2(err[0] / err[1]) > 1.5, err


@pytest.mark.parametrize("method", [m for m in FIXED if m != "euler"])
def test_higher_order_beats_euler(method, convergence):
    assert np.all(convergence[method] < convergence["euler"]), convergence


@pytest.mark.parametrize("method", FIXED)
def test_converges_with_time_shift(method):
    err = _errors(method, [8, 32], shift=3.0)
    assert err[1] < err[0]
    assert err[1] < (0.12 if method == "euler" else 2.5e-2), err


def test_adaptive_accuracy_and_tolerance():
    model = GaussianFlow()
    noise = make_noise()
    y = jnp.array([0, 2])
    ref = exact_endpoint(noise, y)
    x_loose, info_loose = solve_adaptive(model, noise, y, rtol=1e-3, atol=1e-3)
    x_tight, info_tight = solve_adaptive(model, noise, y, rtol=1e-7, atol=1e-7)
    e_loose = np.max(np.abs(np.asarray(x_loose) - ref))
    e_tight = np.max(np.abs(np.asarray(x_tight) - ref))
    assert e_tight < 2e-5, e_tight
    assert e_tight < e_loose
    assert info_tight["nfe"] > info_loose["nfe"] >= 7
    assert info_tight["nfe"] == 1 + 6 * (info_tight["accepted"] + info_tight["rejected"])
    x = sample(model, noise, y, method="adaptive", num_steps=4, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(np.asarray(x), ref, atol=2e-5)


def test_adaptive_max_steps_raises():
    with pytest.raises(RuntimeError, match="max_steps"):
        sample(GaussianFlow(), make_noise(), jnp.array([0, 1]), method="adaptive",
               num_steps=4, rtol=1e-9, atol=1e-9, max_steps=3)


def test_point_mass_dpm_and_euler_exact():
    """Point-mass data: straight paths, constant data prediction; Euler and DPM++ are exact."""
    mu = 0.7

    def point_mass(x, t, y):
        return (mu - x) / (1 - t)[:, None, None, None]

    noise = make_noise()
    y = jnp.zeros((2,), jnp.int32)
    for method in ("euler", "dpm_solver_2m"):
        x = sample(point_mass, noise, y, method=method, num_steps=3, timeshift=2.0)
        np.testing.assert_allclose(np.asarray(x), mu, atol=1e-5)


def test_reference_heun_reuses_predictor_velocity():
    """heun (reference) evaluates N times and differs from heun_exact (2N - 1 evaluations)."""
    calls = {"n": 0}

    def counting(x, t, y):
        jax.debug.callback(lambda: calls.__setitem__("n", calls["n"] + 1))
        return gaussian_velocity(x, t, MU[y])

    noise = make_noise()
    y = jnp.array([0, 1])
    a = sample(counting, noise, y, method="heun", num_steps=5)
    jax.block_until_ready(a)
    n_heun = calls["n"]
    calls["n"] = 0
    b = sample(counting, noise, y, method="heun_exact", num_steps=5)
    jax.block_until_ready(b)
    assert (n_heun, calls["n"]) == (5, 9)
    assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_reference_heun_equals_ab2_on_uniform_grid():
    """Documented fact: the reference Heun's predictor points follow flow_dpm's recursion."""
    model = GaussianFlow()
    noise = make_noise()
    y = jnp.array([0, 1])
    a = sample(model, noise, y, method="heun", num_steps=6)
    b = sample(model, noise, y, method="flow_dpm", num_steps=6)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)

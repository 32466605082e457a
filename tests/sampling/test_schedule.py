"""Tests for pixeldit.sampling.schedule: the float32 time grid, the time shift, DPM-Solver++(2M) coefficients."""

import jax.numpy as jnp
import numpy as np

from pixeldit.sampling import dpm_solver_2m_coefficients, time_shift, timesteps


def test_timesteps_values():
    ts = timesteps(5)
    assert ts.dtype == np.float32 and ts.shape == (6,)
    np.testing.assert_array_equal(ts, np.array([0, 0.2, 0.4, 0.6, 0.8, 1.0], np.float32))
    np.testing.assert_array_equal(timesteps(1), np.array([0.0, 1.0], np.float32))
    ts = timesteps(6, 2.0)
    base = np.linspace(0, 1, 7)
    np.testing.assert_allclose(ts, base / (base + (1 - base) * 2.0), rtol=0, atol=1e-7)
    assert ts[0] == 0.0 and ts[-1] == 1.0 and np.all(np.diff(ts) > 0)
    # t_start > 0: linspace(t_start, 1, N + 1), shifted
    ts = timesteps(4, 3.0, t_start=0.001)
    base = np.linspace(0.001, 1, 5)
    np.testing.assert_allclose(ts, base / (base + (1 - base) * 3.0), atol=1e-7)


def test_timesteps_float32_op_order():
    # step by step float32, as torch computes it (the golden test checks bit equality)
    for n, s in [(7, 1.5), (6, 2.0), (10, 3.0)]:
        f = np.float32
        end = f(1 - 1.0 / n)
        step = f(end / f(n - 1))
        lin = [f(step * f(i)) if i < n // 2 else f(end - step * f(n - 1 - i)) for i in range(n)]
        t = np.array(lin + [1.0], np.float32)
        expect = t / (t + (f(1) - t) * f(s))
        np.testing.assert_array_equal(timesteps(n, s), expect)


def test_time_shift_numpy_and_jax_agree():
    t = np.linspace(0, 1, 9).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(time_shift(jnp.asarray(t), 2.5)), time_shift(t, 2.5))


def test_dpm_coefficients():
    ts = timesteps(6, 3.0, t_start=0.01)
    co = dpm_solver_2m_coefficients(ts).astype(np.float64)
    t = ts.astype(np.float64)
    lam = np.log(t[:-1] / (1 - t[:-1]))
    # interior steps
    for i in range(5):
        h = np.log(t[i + 1] / (1 - t[i + 1])) - lam[i]
        a = (1 - t[i + 1]) / (1 - t[i])
        b = t[i + 1] * (1 - np.exp(-h))
        np.testing.assert_allclose(co[i, :2], [a, b], rtol=1e-6)
        if i > 0:
            h_prev = lam[i] - lam[i - 1]
            np.testing.assert_allclose(co[i, 2], h / (2 * h_prev), rtol=1e-5)
    assert co[0, 2] == 0.0
    np.testing.assert_array_equal(co[-1], [0.0, 1.0, 0.0])  # final step returns x0
    co0 = dpm_solver_2m_coefficients(timesteps(4))
    np.testing.assert_allclose(co0[0], [0.75, 0.25, 0.0], atol=1e-7)  # DDIM from t = 0
    assert co0[1, 2] == 0.0  # previous h infinite: first order

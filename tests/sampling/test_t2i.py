"""Tests for pixeldit.sampling.t2i: the reference text-to-image time convention with these samplers."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from analytic_fields import make_noise
from pixeldit.sampling import ReferenceT2ITime, sample, timesteps


def test_t2i_sigma_shift_identity():
    """The reference t2i shifted sigma equals 1 - (this module's shifted t), same s."""
    for s in (1.0, 3.0, 4.0):
        sig = np.linspace(0.0, 1.0, 101)
        t = 1.0 - sig
        ref = s * sig / (1 + (s - 1) * sig)
        ours = 1.0 - t / (t + (1 - t) * s)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-15)
        # and on the float32 sampler grid
        n = 12
        sig_grid = 1.0 - np.linspace(0.0, 1.0, n + 1)
        ref32 = s * sig_grid / (1 + (s - 1) * sig_grid)
        np.testing.assert_allclose(1.0 - timesteps(n, s).astype(np.float64), ref32, atol=2e-7)


MU_T2I, S_T2I = 0.8, 0.6


def t2i_velocity(x, timestep, y):
    """Reference t2i convention: x = (1 - sigma) d + sigma n, input sigma * 1000, v = n - d."""
    sigma = (timestep / 1000.0)[:, None, None, None]
    a = 1 - sigma
    var = a * a * S_T2I**2 + sigma * sigma
    r = x - a * MU_T2I
    e_noise = sigma / var * r
    e_data = MU_T2I + a * S_T2I**2 / var * r
    return e_noise - e_data


class ToyT2I(nnx.Module):
    def __init__(self):
        self.scale = nnx.Param(jnp.ones(()))

    def __call__(self, x, timestep, y):
        return self.scale[...] * t2i_velocity(x, timestep, y)


def test_t2i_wrapper_euler_matches_sigma_integration():
    s, n = 3.0, 8
    noise = make_noise()
    y = jnp.zeros((2, 4, 8))  # token condition (unused by the toy)
    x = sample(ReferenceT2ITime(ToyT2I()), noise, y, method="euler", num_steps=n, timeshift=s)
    # direct integration in sigma with the reference's shifted sigma schedule
    sig = 1.0 - np.linspace(0.0, 1.0, n + 1)
    sig = s * sig / (1 + (s - 1) * sig)
    z = np.asarray(noise, np.float64)
    for i in range(n):
        v = np.asarray(t2i_velocity(jnp.asarray(z, jnp.float32), jnp.full((2,), sig[i] * 1000.0), y))
        z = z + (sig[i + 1] - sig[i]) * v
    np.testing.assert_allclose(np.asarray(x), z, atol=2e-5)
    # and it converges to the t2i data distribution's exact map noise -> mu + s * noise
    x = sample(ReferenceT2ITime(t2i_velocity), noise, y, method="adaptive", num_steps=n,
               rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(np.asarray(x), MU_T2I + S_T2I * np.asarray(noise), atol=2e-5)


def _reference_t2i_dpmpp_2m(noise, y, cond_fn, n, s):
    """The reference t2i DPM-Solver++(2M) (multistep, lower_order_final) in sigma, float64."""
    betas = np.linspace(1.0, 0.001, n + 1)
    sig = 1.0 - betas
    sig = (s * sig / (1 + (s - 1) * sig))[::-1]
    alpha = 1.0 - sig
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)

    def x0_fn(x, i):
        out = np.asarray(cond_fn(jnp.asarray(x, jnp.float32), jnp.full((2,), sig[i] * 1000.0), y),
                         np.float64)
        eps = (1 - sig[i]) * out + x
        return (x - sig[i] * eps) / alpha[i]

    x = np.asarray(noise, np.float64)
    prev = [x0_fn(x, 0)]
    for step in range(1, n + 1):
        h = lam[step] - lam[step - 1]
        phi = np.expm1(-h)
        order = 1 if step == 1 else min(2, n + 1 - step)
        x_new = (sig[step] / sig[step - 1]) * x - alpha[step] * phi * prev[-1]
        if order == 2:
            r0 = (lam[step - 1] - lam[step - 2]) / h
            d1 = (prev[-1] - prev[-2]) / r0
            x_new = x_new - 0.5 * alpha[step] * phi * d1
        x = x_new
        if step < n:
            prev.append(x0_fn(x, step))
    return x


def test_t2i_dpm_solver_matches_reference_recipe():
    s, n = 3.0, 6
    noise = make_noise()
    y = jnp.zeros((2, 4, 8))
    x = sample(ReferenceT2ITime(ToyT2I()), noise, y, method="dpm_solver_2m", num_steps=n,
               timeshift=s, t_start=0.001)
    ref = _reference_t2i_dpmpp_2m(np.asarray(noise), y, t2i_velocity, n, s)
    np.testing.assert_allclose(np.asarray(x), ref, atol=2e-5)

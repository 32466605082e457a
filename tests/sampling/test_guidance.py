"""Tests for pixeldit.sampling.guidance: the CFG helpers, one 2B model call per evaluation, the strict
guidance interval, the model's own null condition, pytree conditions, float32 upcast."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from analytic_fields import MU, gaussian_velocity, make_noise
from pixeldit.sampling import (
    cfg_batch,
    cfg_combine,
    cfg_split,
    guidance_weight,
    sample,
    sigma_interval_to_t,
    timesteps,
)


U_VAL, C_VAL = -1.0, 2.0  # velocity for the null label (0) and the conditional label (1)


class ConstantByLabel(nnx.Module):
    """v = table[y], independent of x and t; records the batch size it is traced with."""

    batches = []  # class level: nnx.merge inside jit builds a copy of the module

    def __init__(self):
        self.table = nnx.Param(jnp.array([U_VAL, C_VAL, 5.0], jnp.float32))
        ConstantByLabel.batches.clear()

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        return jnp.broadcast_to(self.table[...][y][:, None, None, None], x.shape)


def guided_np(t, w, lo, hi):
    t32 = np.float32(t)
    wt = w if (np.float32(lo) < t32 < np.float32(hi)) else 1.0
    return U_VAL + wt * (C_VAL - U_VAL)


def test_cfg_helpers():
    x = jnp.ones((2, 1, 1, 1))
    xx, tt, yy = cfg_batch(x, jnp.array([0.1, 0.1]), jnp.array([3, 4]), jnp.array([9, 9]))
    assert xx.shape == (4, 1, 1, 1)
    np.testing.assert_array_equal(yy, [9, 9, 3, 4])  # [uncond, cond]
    np.testing.assert_array_equal(tt, np.full(4, 0.1, np.float32))
    u, c = cfg_split(jnp.arange(4.0))
    np.testing.assert_array_equal(u, [0, 1])
    np.testing.assert_array_equal(c, [2, 3])
    np.testing.assert_allclose(cfg_combine(jnp.float32(1), jnp.float32(3), 2.5), 6.0)
    w = guidance_weight(jnp.array([0.0, 0.25, 0.5, 0.75, 1.0]), 4.0, (0.25, 0.75))
    np.testing.assert_array_equal(w, [1, 1, 4, 1, 1])  # strict on both ends
    assert sigma_interval_to_t(0.1, 0.7) == pytest.approx((0.3, 0.9))


def test_cfg_single_batched_call_and_combination():
    model = ConstantByLabel()
    noise = make_noise(b=3)
    y = jnp.ones((3,), jnp.int32)
    y_null = jnp.zeros((3,), jnp.int32)
    w = 3.0
    x = sample(model, noise, y, y_null, method="euler", num_steps=4, guidance=w)
    assert model.batches == [6]  # ONE model call of batch 2B per step
    # interval (0, 1) strict: t = 0 is outside -> first step unguided
    ts = timesteps(4)
    expect = np.asarray(noise) + sum(
        (ts[i + 1] - ts[i]) * guided_np(ts[i], w, 0.0, 1.0) for i in range(4)
    )
    np.testing.assert_allclose(np.asarray(x), expect, atol=1e-6)
    # guidance 1: only the conditional half is evaluated, y_null may be None
    model.batches.clear()
    x1 = sample(model, noise, y, None, method="euler", num_steps=4)
    assert model.batches == [3]
    np.testing.assert_allclose(np.asarray(x1), np.asarray(noise) + C_VAL, atol=1e-6)


class ConstantByLabelWithNull(ConstantByLabel):
    def null_condition(self, y):
        return jnp.zeros_like(y)  # label 0 is this toy model's null condition


def test_guidance_defaults_to_the_models_null_condition():
    noise, y, w = make_noise(b=3), jnp.ones((3,), jnp.int32), 3.0
    explicit = sample(ConstantByLabel(), noise, y, jnp.zeros((3,), jnp.int32), method="euler", num_steps=4, guidance=w)
    default = sample(ConstantByLabelWithNull(), noise, y, method="euler", num_steps=4, guidance=w)
    np.testing.assert_array_equal(np.asarray(default), np.asarray(explicit))
    assert np.abs(np.asarray(default) - np.asarray(noise) - C_VAL).max() > 0.1  # guidance did act


def test_guidance_interval_strict():
    model = ConstantByLabel()
    noise = make_noise()
    y, y_null = jnp.ones((2,), jnp.int32), jnp.zeros((2,), jnp.int32)
    w, lo, hi = 4.0, 0.25, 0.75  # grid 0, .25, .5, .75, 1: only t = 0.5 is strictly inside
    x = sample(model, noise, y, y_null, method="euler", num_steps=4, guidance=w,
               guidance_interval=(lo, hi))
    expect = np.asarray(noise) + 0.25 * (3 * C_VAL + (U_VAL + w * (C_VAL - U_VAL)))
    np.testing.assert_allclose(np.asarray(x), expect, atol=1e-6)
    # empty interval: never guided
    x = sample(model, noise, y, y_null, method="euler", num_steps=4, guidance=w,
               guidance_interval=(0.5, 0.5))
    np.testing.assert_allclose(np.asarray(x), np.asarray(noise) + C_VAL, atol=1e-6)


@pytest.mark.parametrize("method", ["heun", "heun_exact", "flow_dpm"])
def test_guidance_time_per_method(method):
    """Heun tests guidance at t_next for its predictor evaluation, like the reference."""
    model = ConstantByLabel()
    noise = make_noise()
    y, y_null = jnp.ones((2,), jnp.int32), jnp.zeros((2,), jnp.int32)
    n, w, lo, hi = 5, 2.5, 0.3, 0.7
    ts = timesteps(n, 1.0)
    g = [guided_np(t, w, lo, hi) for t in ts]
    dt = np.diff(ts)
    if method.startswith("heun"):
        # v depends on t only, so the stale reuse equals a fresh evaluation
        delta = sum(dt[i] * (g[i] + g[i + 1]) / 2 for i in range(n - 1)) + dt[-1] * g[n - 1]
    else:
        delta = dt[0] * g[0] + sum(dt[i] * (1.5 * g[i] - 0.5 * g[i - 1]) for i in range(1, n))
    x = sample(model, noise, y, y_null, method=method, num_steps=n, guidance=w,
               guidance_interval=(lo, hi))
    np.testing.assert_allclose(np.asarray(x), np.asarray(noise) + delta, atol=1e-6)


def test_pytree_condition():
    """A condition may be a dict of arrays (e.g. tokens and a mask); CFG concatenates leaves."""

    def model(x, t, y):
        return x * 0 + (y["tok"].sum(axis=(1, 2)) * y["mask"][:, 0])[:, None, None, None]

    y = {"tok": jnp.ones((2, 3, 4)), "mask": jnp.ones((2, 3))}
    y_null = {"tok": jnp.zeros((2, 3, 4)), "mask": jnp.ones((2, 3))}
    noise = make_noise()
    x = sample(model, noise, y, y_null, method="euler", num_steps=2, guidance=2.0)
    # v_c = 12, v_u = 0; t = 0 unguided (12), t = 0.5 guided (24)
    np.testing.assert_allclose(np.asarray(x), np.asarray(noise) + 0.5 * 12 + 0.5 * 24, atol=1e-5)


def test_bf16_model_output_is_upcast():
    def bf16_model(x, t, y):
        return gaussian_velocity(x, t, MU[y]).astype(jnp.bfloat16)

    x = sample(bf16_model, make_noise(), jnp.array([0, 1]), method="euler", num_steps=2)
    assert x.dtype == jnp.float32

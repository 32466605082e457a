"""Tests for pixeldit.flow (time sampling, path math, condition dropping, loss)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldit import flow


def test_uniform_time_range_and_stats():
    t = np.asarray(flow.sample_time(jax.random.key(0), 20000, distribution="uniform"))
    assert t.shape == (20000,) and t.dtype == np.float32
    assert t.min() >= 0.0 and t.max() <= 1.0
    assert abs(t.mean() - 0.5) < 0.01
    assert abs(t.var() - 1 / 12) < 0.005


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.8, 0.6), (0.5, 1.5)])
def test_logit_normal_stats(mean, std):
    t = np.asarray(flow.sample_time(jax.random.key(1), 40000, mean=mean, std=std))
    assert t.min() > 0.0 and t.max() < 1.0
    logit = np.log(t) - np.log1p(-t)
    assert abs(logit.mean() - mean) < 0.03
    assert abs(logit.std() - std) < 0.03
    # median of a logit-normal is sigmoid(mean)
    assert abs(np.median(t) - 1 / (1 + np.exp(-mean))) < 0.01


@pytest.mark.parametrize("distribution", ["uniform", "logit_normal"])
@pytest.mark.parametrize("shift", [0.5, 3.0])
def test_time_shift_formula(distribution, shift):
    key = jax.random.key(2)
    base = np.asarray(flow.sample_time(key, 1000, distribution=distribution))
    shifted = np.asarray(flow.sample_time(key, 1000, distribution=distribution, shift=shift))
    expected = base / (base + (1 - base) * shift)
    np.testing.assert_allclose(shifted, expected, rtol=1e-6, atol=1e-7)
    assert shifted.min() >= 0 and shifted.max() <= 1
    # shift > 1 pushes mass towards noise (t = 0), shift < 1 towards data
    if shift > 1:
        assert np.all(shifted <= base + 1e-7)
    else:
        assert np.all(shifted >= base - 1e-7)


def test_shift_time_fixed_points():
    t = jnp.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(flow.shift_time(t, 3.0), [0.0, 0.25, 1.0], rtol=1e-6)
    np.testing.assert_allclose(flow.shift_time(t, 1.0), t)


def test_sample_time_rejects_bad_args():
    with pytest.raises(ValueError, match="unknown time distribution"):
        flow.sample_time(jax.random.key(0), 4, distribution="beta")
    with pytest.raises(ValueError):
        flow.sample_time(jax.random.key(0), 4, shift=0.0)
    with pytest.raises(ValueError):
        flow.sample_time(jax.random.key(0), 4, std=0.0)


def test_interpolate_and_target():
    kx, ke, kt = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (5, 4, 4, 3))
    eps = jax.random.normal(ke, (5, 4, 4, 3))
    t = jax.random.uniform(kt, (5,))
    xt = flow.interpolate(x, eps, t)
    np.testing.assert_allclose(xt, t[:, None, None, None] * x + (1 - t[:, None, None, None]) * eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(flow.interpolate(x, eps, jnp.zeros(5)), eps)
    np.testing.assert_allclose(flow.interpolate(x, eps, jnp.ones(5)), x)
    v = flow.target_velocity(x, eps)
    np.testing.assert_allclose(v, x - eps)
    # v is the time derivative of the path
    h = 1e-3
    fd = (flow.interpolate(x, eps, t + h) - flow.interpolate(x, eps, t - h)) / (2 * h)
    np.testing.assert_allclose(fd, v, atol=2e-3)


@pytest.mark.parametrize("shape", [(4000,), (4000, 3), (4000, 5, 2)])
def test_drop_condition_rate_and_shapes(shape):
    key = jax.random.key(4)
    y = jnp.ones(shape, jnp.float32)
    y_null = jnp.full(shape, -1.0)
    out = flow.drop_condition(key, y, y_null, 0.3)
    assert out.shape == y.shape and out.dtype == y.dtype
    flat = np.asarray(out).reshape(shape[0], -1)
    # each example is dropped as a whole
    assert np.all((flat == 1.0).all(1) | (flat == -1.0).all(1))
    rate = (flat[:, 0] == -1.0).mean()
    assert abs(rate - 0.3) < 0.03


def test_drop_condition_labels_and_extremes():
    key = jax.random.key(5)
    y = jnp.arange(1000, dtype=jnp.int32) % 10
    null = jnp.full_like(y, 10)
    np.testing.assert_array_equal(flow.drop_condition(key, y, null, 0.0), y)
    np.testing.assert_array_equal(flow.drop_condition(key, y, null, 1.0), null)
    out = np.asarray(flow.drop_condition(key, y, null, 0.5))
    assert out.dtype == np.int32
    kept = out != 10
    np.testing.assert_array_equal(out[kept], np.asarray(y)[kept])
    assert 0.4 < (~kept).mean() < 0.6
    # NaN null condition (theta model) is selected, not propagated into kept rows
    theta = jnp.ones((1000, 2))
    out = np.asarray(flow.drop_condition(key, theta, jnp.full_like(theta, jnp.nan), 0.5))
    assert np.all(np.isnan(out).all(1) | (out == 1).all(1))
    assert flow.drop_condition(key, None, None, 0.5) is None


class _LinearModel:
    """Minimal model obeying the call contract: v = a * x_t (+ label offset)."""

    def __init__(self, a=0.0):
        self.a = a
        self.calls = []

    def __call__(self, x, t, y, mask=None):
        self.calls.append((x, t, y))
        return self.a * x

    def null_condition(self, y):
        return jnp.full_like(y, 10)


def test_flow_matching_loss_matches_manual():
    x = jax.random.normal(jax.random.key(6), (8, 4, 4, 1))
    y = jnp.arange(8) % 3
    key = jax.random.key(7)
    model = _LinearModel(a=0.5)
    loss, aux = flow.flow_matching_loss(model, x, y, key, p_uncond=0.0, time_shift=2.0)
    k_t, k_eps, _ = jax.random.split(key, 3)
    t = flow.sample_time(k_t, 8, shift=2.0)
    eps = jax.random.normal(k_eps, x.shape)
    xt = flow.interpolate(x, eps, t)
    manual = jnp.mean((0.5 * xt - (x - eps)) ** 2)
    np.testing.assert_allclose(loss, manual, rtol=1e-6)
    np.testing.assert_allclose(aux["t"], t)
    assert aux["loss_per_example"].shape == (8,)
    assert loss.dtype == jnp.float32
    # the model saw the unmodified labels (p_uncond = 0) and float32 times
    np.testing.assert_array_equal(model.calls[0][2], y)
    assert model.calls[0][1].shape == (8,)


def test_flow_matching_loss_zero_model_and_dropping():
    x = jnp.zeros((2000, 2, 2, 1))
    y = jnp.zeros((2000,), jnp.int32)
    model = _LinearModel(a=0.0)
    loss, _ = flow.flow_matching_loss(model, x, y, jax.random.key(8), p_uncond=0.25)
    # zero prediction -> loss = E[eps^2] = 1
    assert abs(float(loss) - 1.0) < 0.05
    seen = np.asarray(model.calls[0][2])
    assert abs((seen == 10).mean() - 0.25) < 0.03


def test_flow_matching_loss_bf16_model_output_computed_in_float32():
    class Bf16Model(_LinearModel):
        def __call__(self, x, t, y, mask=None):
            return (0.5 * x).astype(jnp.bfloat16)

    x = jax.random.normal(jax.random.key(9), (4, 4, 4, 1))
    loss, aux = flow.flow_matching_loss(Bf16Model(), x, None, jax.random.key(1))
    assert loss.dtype == jnp.float32 and aux["loss_per_example"].dtype == jnp.float32


def test_flow_matching_loss_uses_given_draws():
    x = jax.random.normal(jax.random.key(10), (3, 4, 4, 1))
    y = jnp.array([1, 2, 0])
    t = jnp.array([0.2, 0.5, 0.9])
    eps = jax.random.normal(jax.random.key(11), x.shape)
    drop = jnp.array([False, True, False])
    model = _LinearModel(a=0.5)
    loss, aux = flow.flow_matching_loss(model, x, y, jax.random.key(12), p_uncond=0.1, time_shift=3.0,
                                        draws={"t": t, "noise": eps, "drop": drop})
    xt = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * eps  # the given t is not shifted again
    np.testing.assert_allclose(loss, jnp.mean((0.5 * xt - (x - eps)) ** 2), rtol=1e-6)
    np.testing.assert_array_equal(aux["t"], t)
    np.testing.assert_array_equal(model.calls[0][2], [1, 10, 0])  # exactly the dropped example takes the null label
    # a draw left out is still drawn from the key: only the noise given, t as without draws
    _, aux_key = flow.flow_matching_loss(_LinearModel(), x, y, jax.random.key(12), p_uncond=0.0)
    _, aux_partial = flow.flow_matching_loss(_LinearModel(), x, y, jax.random.key(12), p_uncond=0.0,
                                             draws={"noise": eps})
    np.testing.assert_array_equal(aux_partial["t"], aux_key["t"])


@pytest.mark.parametrize("draws, words", [
    ({"t": jnp.zeros(4)}, ["draws['t']", "(3,)", "(4,)"]),
    ({"noise": jnp.zeros((3, 4, 4, 2))}, ["draws['noise']", "(3, 4, 4, 1)"]),
    ({"time": jnp.zeros(3)}, ["unknown draws ['time']"]),
])
def test_flow_matching_loss_rejects_bad_draws(draws, words):
    x = jnp.zeros((3, 4, 4, 1))
    with pytest.raises(ValueError) as e:
        flow.flow_matching_loss(_LinearModel(), x, None, jax.random.key(0), draws=draws)
    for w in words:
        assert w in str(e.value), (w, str(e.value))

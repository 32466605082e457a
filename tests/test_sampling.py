"""Tests for pixeldit.sampling with analytic velocity fields (no network weights needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixeldit import sampling
from pixeldit.sampling import (
    METHODS,
    ReferenceT2ITime,
    cfg_batch,
    cfg_combine,
    cfg_split,
    dpm_solver_2m_coefficients,
    guidance_weight,
    sample,
    sample_batched,
    sample_trajectory,
    sigma_interval_to_t,
    solve_adaptive,
    time_shift,
    timesteps,
)

# --------------------------------------------------------------------------------------------
# Analytic fields.  Data x ~ N(mu_y, s^2) per element, x_t = t x + (1 - t) eps:
#   var_t = t^2 s^2 + (1 - t)^2,  v(x_t, t) = mu + (t s^2 - (1 - t)) / var_t * (x_t - t mu),
# and the exact ODE map sends eps to mu + s * eps.
# --------------------------------------------------------------------------------------------

MU = jnp.array([1.5, -0.75, 0.4], jnp.float32)  # per class
S = 0.5


def gaussian_velocity(x, t, mu, s=S):
    t = t[:, None, None, None]
    mu = mu[:, None, None, None]
    var = t * t * s * s + (1 - t) ** 2
    return mu + (t * s * s - (1 - t)) / var * (x - t * mu)


class GaussianFlow(nnx.Module):
    """Class-conditional analytic rectified-flow velocity (an NNX module with a parameter)."""

    def __init__(self, mu=MU, s=S):
        self.mu = nnx.Param(jnp.asarray(mu))
        self.s = s

    def __call__(self, x, t, y):
        type(self).trace_count += 1  # Python side effect: counts traces
        return gaussian_velocity(x, t, self.mu[...][y], self.s)


GaussianFlow.trace_count = 0


def exact_endpoint(noise, y, mu=MU, s=S):
    return np.asarray(mu)[np.asarray(y)][:, None, None, None] + s * np.asarray(noise)


def make_noise(b=2, h=4, w=4, c=1, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, h, w, c), jnp.float32)


# --------------------------------------------------------------------------------------------
# Time grid
# --------------------------------------------------------------------------------------------


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


def test_time_shift_numpy_and_jax_agree():
    t = np.linspace(0, 1, 9).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(time_shift(jnp.asarray(t), 2.5)), time_shift(t, 2.5))


# --------------------------------------------------------------------------------------------
# Accuracy on the analytic Gaussian field
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Compilation caching, reproducibility, trajectory, batching
# --------------------------------------------------------------------------------------------


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


def test_sample_batched_chunks_and_padding():
    model = GaussianFlow()
    key = jax.random.PRNGKey(3)
    shape = (5, 2, 2, 1)
    y = np.array([0, 1, 2, 0, 1])
    y_null = np.full((5,), 2)
    kw = dict(method="euler", num_steps=3, guidance=1.5, progress=False)
    a = sample_batched(model, key, shape, y, y_null, batch_size=2, **kw)
    b = sample_batched(model, key, shape, y, y_null, batch_size=5, **kw)
    assert isinstance(a, np.ndarray) and a.shape == shape and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-6)  # independent of the chunking
    keys = jax.random.split(key, 5)
    noise = jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(keys)
    direct = sample(model, noise, y, y_null, method="euler", num_steps=3, guidance=1.5)
    np.testing.assert_allclose(a, np.asarray(direct), atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        sample_batched(model, key, shape, y, y_null, batch_size=0, **kw)


def test_bf16_model_output_is_upcast():
    def bf16_model(x, t, y):
        return gaussian_velocity(x, t, MU[y]).astype(jnp.bfloat16)

    x = sample(bf16_model, make_noise(), jnp.array([0, 1]), method="euler", num_steps=2)
    assert x.dtype == jnp.float32


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


# --------------------------------------------------------------------------------------------
# Text-to-image convention
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Validation (before any compilation)
# --------------------------------------------------------------------------------------------


def _never_called(x, t, y):  # pragma: no cover - must not be traced
    raise AssertionError("model must not be called when validation fails")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="rk4"), r"unknown method 'rk4'.*euler, heun, heun_exact, flow_dpm, dpm_solver_2m, adaptive"),
        (dict(num_steps=0), r"num_steps must be >= 1, got 0"),
        (dict(num_steps=2.5), r"num_steps must be an int"),
        (dict(guidance_interval=(-0.1, 0.5)), r"within \[0, 1\]"),
        (dict(guidance_interval=(0.2, 1.5)), r"within \[0, 1\]"),
        (dict(guidance_interval=(0.8, 0.2)), r"lo <= hi"),
        (dict(noise=np.zeros((2, 4, 4))), r"4-D.*got shape \(2, 4, 4\)"),
        (dict(y=np.zeros((3,), np.int32)), r"batch mismatch: noise has batch 2, y has shape \(3,\)"),
        (dict(y_null=np.zeros((3,), np.int32)), r"batch mismatch: noise has batch 2, y_null has shape \(3,\)"),
        (dict(y=np.zeros((2, 5)), y_null=np.zeros((2, 4))), r"y_null shape \(2, 4\) differs from y shape \(2, 5\)"),
        (dict(y_null=None), r"y_null is required"),
        (dict(timeshift=0.0), r"timeshift"),
        (dict(rtol=1e-3), r"only to method='adaptive'"),
        (dict(method="adaptive", foo=1), r"unknown adaptive option"),
    ],
)
def test_validation_errors(kwargs, match):
    args = dict(noise=np.zeros((2, 4, 4, 1), np.float32), y=np.zeros((2,), np.int32),
                y_null=np.zeros((2,), np.int32), method="euler", num_steps=4, guidance=2.0)
    args.update(kwargs)
    noise, y, y_null = args.pop("noise"), args.pop("y"), args.pop("y_null")
    with pytest.raises(ValueError, match=match):
        sample(_never_called, noise, y, y_null, **args)


def test_validation_precedes_compilation(monkeypatch):
    def boom(*a, **k):  # pragma: no cover
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(sampling, "_run", boom)
    with pytest.raises(ValueError):
        sample_trajectory(_never_called, np.zeros((1, 2, 2, 1)), np.zeros((2,), np.int32),
                          method="euler", num_steps=2)


def test_reference_heun_equals_ab2_on_uniform_grid():
    """Documented fact: the reference Heun's predictor points follow flow_dpm's recursion."""
    model = GaussianFlow()
    noise = make_noise()
    y = jnp.array([0, 1])
    a = sample(model, noise, y, method="heun", num_steps=6)
    b = sample(model, noise, y, method="flow_dpm", num_steps=6)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)

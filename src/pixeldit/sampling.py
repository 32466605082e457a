"""ODE samplers for PixelDiT flow models (class-to-image and text-to-image).

Conventions
-----------
A model is a Flax NNX module (or any callable) ``model(x, t, y) -> v`` with

* ``x``: channel-last images ``(B, H, W, C)``;
* ``t``: ``(B,)`` float32 in ``[0, 1]``, **t = 0 is pure noise and t = 1 is data**;
* ``y``: the condition: int labels ``(B,)`` for class-conditional models, arrays
  ``(B, L, D)`` / ``(B, K)`` for token / parameter models, or a dict / tuple of such arrays
  (every leaf with leading batch dimension ``B``; a Python list is read as one array);
* ``v``: the velocity ``(B, H, W, C)``.

The forward process is ``x_t = t * x + (1 - t) * eps`` and the velocity target is
``v = x - eps`` (``d x_t / dt``).  Every sampler integrates ``dx/dt = v(x, t)`` from the noise
at ``t = 0`` to the sample at ``t = 1``.  Model outputs are upcast to float32 before the update
(the model may compute in bfloat16); the state ``x`` is always float32.

Time grid (fixed-step methods)
------------------------------
As in the reference (``c2i/src/diffusion.py``): ``linspace(0, 1 - 1/N, N)`` with ``1.0``
appended, then time-shifted ``t' = t / (t + (1 - t) * shift)``.  :func:`timesteps` computes it
step by step in float32 exactly like torch's float32 CPU kernels (linspace's two-sided
formula, then ``1 - t``, ``* shift``, ``+``, ``/``), so the grid is bit-identical to the
reference's ``sampler.timesteps``.  With ``t_start > 0`` the grid is instead
``linspace(t_start, 1, N + 1)`` (then shifted), which is the text-to-image reference's grid.

Classifier-free guidance
------------------------
With ``guidance != 1`` each velocity evaluation is ONE model call on a batch of ``2B``:
``x`` concatenated with ``x``, ``t`` with ``t`` and ``[y_null, y]``; the output is split into
``(u, c)`` and combined as ``u + w * (c - u)`` where ``w = guidance`` if
``lo < t < hi`` (strict, ``(lo, hi) = guidance_interval``, compared in float32) and ``w = 1``
otherwise.  With ``guidance == 1`` only the conditional half is evaluated (a batch of ``B``);
``y_null`` may then be ``None``.  See :func:`guidance_weight`, :func:`cfg_batch`,
:func:`cfg_split`, :func:`cfg_combine`.

Methods (``dt_i = t_{i+1} - t_i``, ``v(x, t)`` the guided velocity)
-----------------------------------------------------------------
``"euler"``
    ``x_{i+1} = x_i + v(x_i, t_i) * dt_i``.  N evaluations.
``"heun"``
    The reference ``HeunSampler`` with ``exact_henu=False``.  ``v_0 = v(x_0, t_0)``; for
    ``i < N - 1``: predictor ``x^ = x_i + v_i * dt_i``, ``v^ = v(x^, t_{i+1})`` (guidance tested
    against ``t_{i+1}``), ``x_{i+1} = x_i + ((v_i + v^) / 2) * dt_i`` and ``v_{i+1} = v^``: the
    velocity at the new point is *not* re-evaluated, the predictor's one is reused.  The last
    step is plain Euler with ``v_{N-1}``.  N evaluations.  (Its predictor points follow the
    Adams-Bashforth-2 recursion of ``"flow_dpm"``, so on a uniform grid, ``timeshift=1``, the
    two methods give the same sample up to rounding.)
``"heun_exact"``
    Textbook Heun (the reference with ``exact_henu=True``): ``v_i = v(x_i, t_i)`` is evaluated
    fresh at every step, then the same predictor / trapezoid corrector; the last step (into
    ``t = 1``) is Euler, as in the reference and EDM.  2N - 1 evaluations.
``"flow_dpm"``
    The reference ``FlowDPMSolverSampler`` (second-order Adams-Bashforth):
    ``x_1 = x_0 + v_0 * dt_0``, then ``x_{i+1} = x_i + dt_i * (1.5 * v_i - 0.5 * v_{i-1})``.
    N evaluations.
``"dpm_solver_2m"``
    DPM-Solver++(2M), data-prediction form, for the flow schedule ``alpha_t = t``,
    ``sigma_t = 1 - t``, ``lambda_t = log(alpha_t / sigma_t)``.  The data prediction is
    ``x0_i = x_i + (1 - t_i) * v(x_i, t_i)``; with ``h_i = lambda_{i+1} - lambda_i`` and
    ``r_i = h_{i-1} / h_i``::

        D_i     = (1 + 1/(2 r_i)) * x0_i - 1/(2 r_i) * x0_{i-1}
        x_{i+1} = (sigma_{i+1} / sigma_i) * x_i + alpha_{i+1} * (1 - exp(-h_i)) * D_i

    where ``alpha_{i+1} (1 - e^{-h_i}) = t_{i+1} - t_i sigma_{i+1} / sigma_i`` (finite even at
    ``t_i = 0``).  The first step is first order (``D = x0``; from ``t = 0``, ``lambda = -inf``
    and the step is DDIM = Euler), as is any step whose previous ``h`` is infinite.  The final
    step into ``t = 1`` (``sigma = 0``, ``lambda = +inf``) returns the data prediction ``x0``
    (first order, the reference's ``lower_order_final``).  The coefficients are computed on
    the host in float64 from the float32 grid.  N evaluations.
``"adaptive"``
    Dormand-Prince 5(4) with an embedded error estimate, written with ``jax.lax.while_loop``
    (FSAL, 6 evaluations per attempted step).  Error norm: RMS over all elements of
    ``err / (atol + rtol * max(|x|, |x_new|))``; a step is accepted when the norm is <= 1;
    the step size is scaled by ``clip(0.9 * norm**(-1/5), 0.2, 10)``.  Keyword arguments
    ``rtol`` (default 1e-5), ``atol`` (1e-5), ``max_steps`` (attempted steps, default 4096).
    The first step size is ``1 / num_steps``.  :func:`sample` integrates straight from
    ``t_start`` to 1 (``timeshift`` is irrelevant there); :func:`sample_trajectory` integrates
    segment by segment over the fixed grid so the trajectory lands on it.  CFG and the
    guidance interval apply at every evaluation time.  :func:`solve_adaptive` also returns the
    number of evaluations and accepted / rejected steps.

Every method's whole loop is one jit-compiled function (``lax.scan`` / ``lax.while_loop``);
the grid, guidance scale and interval are traced arguments, so changing them does not
recompile; the model's graph (``nnx.split``), the method, the step count and the shapes are
the cache key.

Text-to-image checkpoints
-------------------------
The reference text-to-image model (SANA lineage) uses a noise level ``sigma`` with
``x = (1 - sigma) * data + sigma * noise``, time input ``sigma * 1000`` and velocity target
``noise - data``.  In this module's terms ``t = 1 - sigma`` and ``v = -v_t2i``;
:class:`ReferenceT2ITime` wraps such a model accordingly.  The reference shifts the noise
level as ``sigma' = s * sigma / (1 + (s - 1) * sigma)`` (s = 3 at 512 px, 4 at 1024 px).  This
is exactly this module's time shift with the same ``s``::

    1 - t / (t + (1 - t) s) = (1 - t) s / (t + (1 - t) s) = s sigma / (1 + (s - 1) sigma)

so the reference's shifted sigma schedule is ``1 -`` our shifted time grid.  The reference
t2i sampler is DPM-Solver++(2M) multistep with ``lower_order_final`` over sigmas
``shift(linspace(0, 0.999, N + 1))`` flipped, i.e. ``t = shift(linspace(0.001, 1, N + 1))``,
with the guidance interval ``(lo_s, hi_s)`` tested against sigma.  The equivalent here::

    sample(ReferenceT2ITime(model), noise, y, y_null, method="dpm_solver_2m",
           num_steps=N, timeshift=s, guidance=w, t_start=0.001,
           guidance_interval=sigma_interval_to_t(lo_s, hi_s))

(equal in exact arithmetic; the float32 rounding differs).

This module is over 500 lines because it holds one concern, the samplers: six methods that
share the time grid, guidance and validation code, and one compiled loop each.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pixeldit.parallel import batch_axes, batch_sharding, replicated
from pixeldit.static_model import merge_model, split_model

__all__ = [
    "METHODS",
    "REFERENCE_T2I_TIME",
    "timesteps",
    "time_shift",
    "sample",
    "sample_trajectory",
    "sample_batched",
    "solve_adaptive",
    "guidance_weight",
    "cfg_batch",
    "cfg_split",
    "cfg_combine",
    "sigma_interval_to_t",
    "dpm_solver_2m_coefficients",
    "ReferenceT2ITime",
]

METHODS = ("euler", "heun", "heun_exact", "flow_dpm", "dpm_solver_2m", "adaptive")
_ADAPTIVE_DEFAULTS = {"rtol": 1e-5, "atol": 1e-5, "max_steps": 4096}


# --------------------------------------------------------------------------------------------
# Time grid
# --------------------------------------------------------------------------------------------


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32, as torch's CPU kernel computes it.

    The bounds are cast to float32, ``step = (end - start) / (steps - 1)`` in float32, then
    ``start + step * i`` for the first half and ``end - step * (steps - 1 - i)`` for the rest.
    """
    f = np.float32
    start32, end32 = f(start), f(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = f((end32 - start32) / f(steps - 1))
    halfway = steps // 2
    out = np.empty(steps, dtype=np.float32)
    for i in range(steps):
        if i < halfway:
            out[i] = start32 + step * f(i)
        else:
            out[i] = end32 - step * f(steps - i - 1)
    return out


def time_shift(t, shift: float):
    """``t / (t + (1 - t) * shift)`` in float32 (numpy in, numpy out; jax in, jax out)."""
    if isinstance(t, jax.Array):
        t = t.astype(jnp.float32)
        s = jnp.float32(shift)
        return t / (t + (1 - t) * s)
    t = np.asarray(t, dtype=np.float32)
    s = np.float32(shift)
    one = np.float32(1.0)
    return (t / (t + (one - t) * s)).astype(np.float32)


def timesteps(num_steps: int, timeshift: float = 1.0, *, t_start: float = 0.0) -> np.ndarray:
    """The sampler time grid, float32 ``(num_steps + 1,)``, from ``t_start`` to 1.

    ``t_start == 0`` (default) gives the reference grid ``linspace(0, 1 - 1/N, N)`` + ``[1]``,
    shifted; ``t_start > 0`` gives ``linspace(t_start, 1, N + 1)``, shifted.
    """
    _check_num_steps(num_steps)
    _check_timeshift(timeshift)
    _check_t_start(t_start)
    n = int(num_steps)
    if t_start == 0.0:
        last_step = 1.0 / n
        base = np.concatenate([_linspace_f32(0.0, 1.0 - last_step, n), np.ones(1, np.float32)])
    else:
        base = _linspace_f32(t_start, 1.0, n + 1)
    return time_shift(base, timeshift)


def dpm_solver_2m_coefficients(ts) -> np.ndarray:
    """Per-step ``(a, b, c)`` float32 ``(N, 3)`` of DPM-Solver++(2M) on the grid ``ts``.

    ``x_{i+1} = a_i x_i + b_i ((1 + c_i) x0_i - c_i x0_{i-1})`` with ``a = sigma_{i+1}/sigma_i``,
    ``b = alpha_{i+1} (1 - e^{-h_i})``, ``c = 1 / (2 r_i) = h_i / (2 h_{i-1})``; ``c = 0`` on
    the first step and wherever ``h_{i-1}`` or ``h_i`` is infinite; ``(0, 1, 0)`` on a step
    into ``sigma = 0``.
    """
    t = np.asarray(ts, dtype=np.float64)
    sig = 1.0 - t
    n = t.shape[0] - 1
    with np.errstate(divide="ignore"):
        lam = np.log(t) - np.log(sig)  # -inf at t = 0, +inf at t = 1
    coefs = np.zeros((n, 3), dtype=np.float64)
    h_prev = math.inf
    for i in range(n):
        h = lam[i + 1] - lam[i]
        if sig[i + 1] == 0.0:
            a, b, c = 0.0, 1.0, 0.0
        else:
            a = sig[i + 1] / sig[i]
            b = t[i + 1] - t[i] * a
            c = h / (2.0 * h_prev) if (i > 0 and np.isfinite(h_prev) and np.isfinite(h)) else 0.0
        coefs[i] = (a, b, c)
        h_prev = h
    return coefs.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Guidance helpers
# --------------------------------------------------------------------------------------------


def guidance_weight(t, guidance, interval=(0.0, 1.0)):
    """``guidance`` where ``lo < t < hi`` (strict, float32), else 1."""
    lo, hi = interval
    t = jnp.asarray(t, jnp.float32)
    inside = (jnp.asarray(lo, jnp.float32) < t) & (t < jnp.asarray(hi, jnp.float32))
    return jnp.where(inside, jnp.asarray(guidance, jnp.float32), jnp.float32(1.0))


def cfg_batch(x, t, y, y_null):
    """The ``2B`` CFG batch ``([x, x], [t, t], [y_null, y])`` (y may be a pytree)."""
    cat = lambda a, b: jnp.concatenate([jnp.asarray(a), jnp.asarray(b)], axis=0)
    return cat(x, x), cat(t, t), jax.tree.map(cat, y_null, y)


def cfg_split(out):
    """Split a ``2B`` model output into ``(uncond, cond)``."""
    b = out.shape[0] // 2
    return out[:b], out[b:]


def cfg_combine(uncond, cond, weight):
    """``uncond + weight * (cond - uncond)``."""
    return uncond + weight * (cond - uncond)


def sigma_interval_to_t(lo_sigma: float, hi_sigma: float) -> tuple[float, float]:
    """A t2i guidance interval on sigma, ``lo < sigma < hi``, as one on ``t = 1 - sigma``."""
    return (1.0 - hi_sigma, 1.0 - lo_sigma)


# --------------------------------------------------------------------------------------------
# Text-to-image time convention
# --------------------------------------------------------------------------------------------


#: Name of the reference text-to-image time convention in checkpoint metadata (``time_convention``).
REFERENCE_T2I_TIME = "reference_t2i"


class ReferenceT2ITime(nnx.Module):
    """Run a reference-convention text-to-image model with these samplers.

    Forwards ``(x, t, y)`` to ``model(x, (1 - t) * time_scale, y)`` (the noise level
    ``sigma = 1 - t``, times 1000) and negates the output (``v = data - noise``).
    """

    def __init__(self, model: Callable, time_scale: float = 1000.0):
        self.model = model
        self.time_scale = float(time_scale)

    def __call__(self, x, t, y, **kwargs):
        t = jnp.asarray(t, jnp.float32)
        sigma = 1.0 - t
        return -self.model(x, sigma * self.time_scale, y, **kwargs)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_num_steps(num_steps):
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")


def _check_timeshift(timeshift):
    try:
        ok = math.isfinite(float(timeshift)) and float(timeshift) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"timeshift must be a finite number > 0, got {timeshift!r}")


def _check_t_start(t_start):
    try:
        ok = 0.0 <= float(t_start) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"t_start must be in [0, 1), got {t_start!r}")


def _shape(a) -> tuple:
    shape = getattr(a, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(a))


def _as_tree(y):
    if isinstance(y, list):
        y = np.asarray(y)
    return y


def _check_guidance(guidance, guidance_interval) -> tuple[float, tuple[float, float]]:
    """Validate the guidance weight and interval; return ``(guidance, (lo, hi))`` as floats."""
    try:
        lo, hi = (float(v) for v in guidance_interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"guidance_interval must be a pair (lo, hi) of floats, got {guidance_interval!r}"
        ) from None
    if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
        raise ValueError(f"guidance_interval must lie within [0, 1], got ({lo}, {hi})")
    if lo > hi:
        raise ValueError(f"guidance_interval needs lo <= hi, got lo={lo} > hi={hi}")
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"guidance must be a number, got {guidance!r}") from None
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be finite, got {guidance}")
    return guidance, (lo, hi)


def _check_y(y, batch: int):
    """Validate the condition tree ``y`` against the noise batch; return ``(y, leaves, treedef)``."""
    if y is None:
        raise ValueError("y (the condition) is required, got None")
    y = _as_tree(y)
    y_leaves, y_def = jax.tree.flatten(y)
    if not y_leaves:
        raise ValueError("y must contain at least one array")
    for leaf in y_leaves:
        shape = _shape(leaf)
        if len(shape) == 0 or shape[0] != batch:
            raise ValueError(
                f"batch mismatch: noise has batch {batch}, y has shape {shape} "
                f"(expected leading dimension {batch})"
            )
    return y, y_leaves, y_def


def _check_conditions(model, y, y_null, batch: int, use_cfg: bool, guidance: float):
    """Validate ``y`` and ``y_null`` (taken from ``model.null_condition`` when absent and needed).

    Returns ``(y, y_null)``; ``y_null`` stays ``None`` when guidance is off and none was given.
    """
    y, y_leaves, y_def = _check_y(y, batch)
    if y_null is None and use_cfg and callable(getattr(model, "null_condition", None)):
        y_null = model.null_condition(y)  # the model's own null condition (null class, NaN theta, zero tokens)
    if y_null is None:
        if use_cfg:
            raise ValueError(f"y_null is required for guidance != 1 (got guidance={guidance}): "
                             "the model has no null_condition")
        return y, None
    y_null = _as_tree(y_null)
    n_leaves, n_def = jax.tree.flatten(y_null)
    if n_def != y_def:
        raise ValueError(f"y_null structure {n_def} differs from y structure {y_def}")
    for a, b in zip(y_leaves, n_leaves):
        sa, sb = _shape(a), _shape(b)
        if sb != sa:
            if len(sb) and sb[0] != batch:
                raise ValueError(
                    f"batch mismatch: noise has batch {batch}, y_null has shape {sb}"
                )
            raise ValueError(f"y_null shape {sb} differs from y shape {sa}")
    return y, y_null


def _solver_options(method, solver_kwargs) -> dict:
    """Return the adaptive solver's options (defaults filled in), or ``{}`` for a fixed-step method."""
    if method != "adaptive":
        if solver_kwargs:
            raise ValueError(
                f"option(s) {sorted(solver_kwargs)} apply only to method='adaptive', got method={method!r}"
            )
        return {}
    unknown = set(solver_kwargs) - set(_ADAPTIVE_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown adaptive option(s) {sorted(unknown)}; expected {sorted(_ADAPTIVE_DEFAULTS)}"
        )
    opts = {**_ADAPTIVE_DEFAULTS, **solver_kwargs}
    for k in ("rtol", "atol"):
        if not (float(opts[k]) > 0 and math.isfinite(float(opts[k]))):
            raise ValueError(f"{k} must be a finite number > 0, got {opts[k]!r}")
    ms = opts["max_steps"]
    if isinstance(ms, bool) or not isinstance(ms, (int, np.integer)) or ms < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {ms!r}")
    return opts


def _validate(model, noise, y, y_null, method, num_steps, guidance, timeshift,
              guidance_interval, t_start, solver_kwargs):
    """Check every sampler argument; return ``(y, y_null, (lo, hi), guidance, use_cfg, solver_opts)``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if not callable(model):
        raise ValueError(f"model must be callable as model(x, t, y), got {type(model).__name__}")
    _check_num_steps(num_steps)
    _check_timeshift(timeshift)
    _check_t_start(t_start)
    guidance, (lo, hi) = _check_guidance(guidance, guidance_interval)
    noise_shape = _shape(noise)
    if len(noise_shape) != 4:
        raise ValueError(
            f"noise must be 4-D channel-last (B, H, W, C), got shape {noise_shape}"
        )
    use_cfg = guidance != 1.0
    y, y_null = _check_conditions(model, y, y_null, int(noise_shape[0]), use_cfg, guidance)
    opts = _solver_options(method, solver_kwargs)
    return y, y_null, (lo, hi), guidance, use_cfg, opts


# --------------------------------------------------------------------------------------------
# Jitted core
# --------------------------------------------------------------------------------------------


def _make_velocity(model, y, y_null, guidance, lo, hi, use_cfg):
    def velocity(x, t):
        b = x.shape[0]
        t = jnp.asarray(t, jnp.float32)
        if use_cfg:
            xx, tt, yy = cfg_batch(x, jnp.full((b,), t), y, y_null)
            out = jnp.asarray(model(xx, tt, yy)).astype(jnp.float32)
            if out.shape != xx.shape:
                raise ValueError(f"model returned shape {out.shape}, expected {xx.shape}")
            u, c = cfg_split(out)
            return cfg_combine(u, c, guidance_weight(t, guidance, (lo, hi)))
        out = jnp.asarray(model(x, jnp.full((b,), t), y)).astype(jnp.float32)
        if out.shape != x.shape:
            raise ValueError(f"model returned shape {out.shape}, expected {x.shape}")
        return out

    return velocity


def _scan(body, carry, n, trajectory):
    def wrapped(c, i):
        c = body(c, i)
        x = c[0] if isinstance(c, tuple) else c
        return c, (x if trajectory else None)

    return jax.lax.scan(wrapped, carry, jnp.arange(n))


def _euler(vel, x, ts, trajectory):
    n = ts.shape[0] - 1

    def body(x, i):
        return x + vel(x, ts[i]) * (ts[i + 1] - ts[i])

    return _scan(body, x, n, trajectory)


def _flow_dpm(vel, x, ts, trajectory):
    n = ts.shape[0] - 1

    def body(carry, i):
        x, v_prev = carry
        dt = ts[i + 1] - ts[i]
        v = vel(x, ts[i])
        x = jnp.where(i == 0, x + v * dt, x + dt * (1.5 * v - 0.5 * v_prev))
        return x, v

    (x, _), xs = _scan(body, (x, jnp.zeros_like(x)), n, trajectory)
    return x, xs


def _heun(vel, x, ts, trajectory, exact):
    n = ts.shape[0] - 1

    def corrector(x, v, i):
        dt = ts[i + 1] - ts[i]
        x_hat = x + v * dt
        v_hat = vel(x_hat, ts[i + 1])
        return x + ((v + v_hat) / 2) * dt, v_hat

    if exact:
        def body(x, i):
            return corrector(x, vel(x, ts[i]), i)[0]

        x, xs = _scan(body, x, n - 1, trajectory)
        v = vel(x, ts[n - 1])
    else:
        def body(carry, i):
            return corrector(carry[0], carry[1], i)

        (x, v), xs = _scan(body, (x, vel(x, ts[0])), n - 1, trajectory)
    x = x + v * (ts[n] - ts[n - 1])  # last step: Euler
    if trajectory:
        xs = jnp.concatenate([xs, x[None]], axis=0)
    return x, xs


def _dpm_2m(vel, x, ts, coefs, trajectory):
    n = ts.shape[0] - 1

    def body(carry, i):
        x, x0_prev = carry
        t = ts[i]
        x0 = x + (1 - t) * vel(x, t)
        a, b, c = coefs[i, 0], coefs[i, 1], coefs[i, 2]
        d = (1 + c) * x0 - c * x0_prev
        return a * x + b * d, x0

    (x, _), xs = _scan(body, (x, jnp.zeros_like(x)), n, trajectory)
    return x, xs


# Dormand-Prince 5(4) tableau.
_DP_C = np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0])
_DP_A = np.zeros((7, 7))
_DP_A[1, :1] = [1 / 5]
_DP_A[2, :2] = [3 / 40, 9 / 40]
_DP_A[3, :3] = [44 / 45, -56 / 15, 32 / 9]
_DP_A[4, :4] = [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]
_DP_A[5, :5] = [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]
_DP_A[6, :6] = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]
_DP_B5 = _DP_A[6].copy()
_DP_B4 = np.array(
    [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]
)


def _adaptive(vel, x, ts, h0, rtol, atol, max_steps, trajectory):
    """Dormand-Prince 5(4) over each segment [ts[j], ts[j+1]] in turn."""
    c_nodes = jnp.asarray(_DP_C, jnp.float32)
    a_mat = jnp.asarray(_DP_A, jnp.float32)
    b5 = jnp.asarray(_DP_B5, jnp.float32)
    b_err = jnp.asarray(_DP_B5 - _DP_B4, jnp.float32)
    comb = lambda w, k: jnp.tensordot(w, k, axes=1)

    def attempt(state, t1):
        t, x, h, k1, nfe, acc, rej = state
        remaining = t1 - t
        last = h >= remaining
        h_eff = jnp.where(last, remaining, h)
        ks = jnp.zeros((7,) + x.shape, jnp.float32).at[0].set(k1)

        def stage(s, ks):
            xs_ = x + h_eff * comb(a_mat[s], ks)
            return ks.at[s].set(vel(xs_, t + c_nodes[s] * h_eff))

        ks = jax.lax.fori_loop(1, 7, stage, ks)
        x5 = x + h_eff * comb(b5, ks)
        err = h_eff * comb(b_err, ks)
        scale = atol + rtol * jnp.maximum(jnp.abs(x), jnp.abs(x5))
        norm = jnp.sqrt(jnp.mean(jnp.square(err / scale)))
        accept = norm <= 1.0  # False for nan
        factor = jnp.where(
            norm == 0.0, 10.0, jnp.clip(0.9 * norm ** (-0.2), 0.2, 10.0)
        )
        factor = jnp.where(jnp.isfinite(norm), factor, 0.2)
        t_new = jnp.where(accept, jnp.where(last, t1, t + h_eff), t)
        x_new = jnp.where(accept, x5, x)
        k1_new = jnp.where(accept, ks[6], k1)
        h_new = h_eff * factor
        return (t_new, x_new, h_new, k1_new, nfe + 6,
                acc + accept.astype(jnp.int32), rej + (~accept).astype(jnp.int32))

    def segment(carry, j):
        x, h, k1, nfe, acc, rej = carry
        t0, t1 = ts[j], ts[j + 1]
        state = (t0, x, h, k1, nfe, acc, rej)

        def cond(s):
            return (s[0] < t1) & (s[5] + s[6] < max_steps)

        t, x, h, k1, nfe, acc, rej = jax.lax.while_loop(cond, lambda s: attempt(s, t1), state)
        return (x, h, k1, nfe, acc, rej), ((x if trajectory else None), t)

    n = ts.shape[0] - 1
    k1 = vel(x, ts[0])
    zero = jnp.int32(0)
    carry = (x, jnp.asarray(h0, jnp.float32), k1, jnp.int32(1), zero, zero)
    (x, _, _, nfe, acc, rej), (xs, t_ends) = jax.lax.scan(segment, carry, jnp.arange(n))
    info = {"nfe": nfe, "accepted": acc, "rejected": rej, "t_end": t_ends[-1]}
    return x, xs, info


@functools.partial(
    jax.jit, static_argnames=("static_model", "method", "use_cfg", "trajectory", "max_steps")
)
def _run(static_model, params, noise, y, y_null, ts, coefs, guidance, lo, hi, h0, rtol, atol,
         *, method, use_cfg, trajectory, max_steps):
    model = merge_model(static_model, params)
    vel = _make_velocity(model, y, y_null, guidance, lo, hi, use_cfg)
    x = noise.astype(jnp.float32)
    info = {}
    if method == "euler":
        x, xs = _euler(vel, x, ts, trajectory)
    elif method == "flow_dpm":
        x, xs = _flow_dpm(vel, x, ts, trajectory)
    elif method == "heun":
        x, xs = _heun(vel, x, ts, trajectory, exact=False)
    elif method == "heun_exact":
        x, xs = _heun(vel, x, ts, trajectory, exact=True)
    elif method == "dpm_solver_2m":
        x, xs = _dpm_2m(vel, x, ts, coefs, trajectory)
    elif method == "adaptive":
        x, xs, info = _adaptive(vel, x, ts, h0, rtol, atol, max_steps, trajectory)
    else:  # pragma: no cover - validated before
        raise ValueError(method)
    if trajectory:
        xs = jnp.concatenate([noise.astype(jnp.float32)[None], xs], axis=0)
    return x, xs, info


def _dispatch(model, noise, y, y_null, method, num_steps, guidance, timeshift,
              guidance_interval, t_start, solver_kwargs, trajectory):
    y, y_null, (lo, hi), guidance, use_cfg, opts = _validate(
        model, noise, y, y_null, method, num_steps, guidance, timeshift, guidance_interval,
        t_start, solver_kwargs,
    )
    grid = timesteps(num_steps, timeshift, t_start=t_start)
    if method == "adaptive" and not trajectory:
        run_grid = np.array([grid[0], np.float32(1.0)], np.float32)
    else:
        run_grid = grid
    coefs = (dpm_solver_2m_coefficients(grid) if method == "dpm_solver_2m"
             else np.zeros((num_steps, 3), np.float32))
    static_model, params = split_model(model)
    to_j = lambda a: jnp.asarray(a)
    y = jax.tree.map(to_j, y)
    y_null = None if (y_null is None or not use_cfg) else jax.tree.map(to_j, y_null)
    f32 = np.float32
    x, xs, info = _run(
        static_model, params, jnp.asarray(noise, jnp.float32), y, y_null,
        jnp.asarray(run_grid), jnp.asarray(coefs), f32(guidance), f32(lo), f32(hi),
        f32(1.0 / num_steps), f32(opts.get("rtol", 0.0)), f32(opts.get("atol", 0.0)),
        method=method, use_cfg=use_cfg, trajectory=trajectory,
        max_steps=int(opts.get("max_steps", 0)),
    )
    if method == "adaptive":
        t_end = float(info["t_end"])
        if t_end < 1.0:
            raise RuntimeError(
                f"adaptive solver stopped at t={t_end} after max_steps={opts['max_steps']} "
                "attempted steps; raise max_steps or loosen rtol/atol"
            )
    return x, xs, grid, info


def sample(model, noise, y, y_null=None, *, method: str = "heun", num_steps: int = 32, guidance: float = 1.0,
           timeshift: float = 1.0, guidance_interval: Sequence[float] = (0.0, 1.0),
           t_start: float = 0.0, **solver_kwargs):
    """Integrate the flow ODE from ``noise`` (t = 0, ``(B, H, W, C)``) to a sample (t = 1).

    ``method`` is one of :data:`METHODS` (default ``"heun"``, 32 steps, as ``pixeldit sample``);
    ``solver_kwargs`` (``rtol``, ``atol``, ``max_steps``) apply to ``"adaptive"`` only.  With
    ``guidance != 1`` and no ``y_null``, the model's own ``null_condition(y)`` is used (the null
    class, NaN theta or zero text tokens).  Returns the float32 sample ``(B, H, W, C)``.
    """
    x, _, _, _ = _dispatch(model, noise, y, y_null, method, num_steps, guidance, timeshift,
                           guidance_interval, t_start, solver_kwargs, trajectory=False)
    return x


def sample_trajectory(model, noise, y, y_null=None, *, method: str = "heun", num_steps: int = 32,
                      guidance: float = 1.0, timeshift: float = 1.0,
                      guidance_interval: Sequence[float] = (0.0, 1.0), t_start: float = 0.0,
                      **solver_kwargs):
    """Like :func:`sample`, returning ``(final, xs, ts)``.

    ``xs`` is ``(num_steps + 1, B, H, W, C)`` (``xs[0]`` is the noise, ``xs[-1]`` the sample)
    and ``ts`` the float32 time grid ``(num_steps + 1,)`` the states belong to.
    """
    x, xs, grid, _ = _dispatch(model, noise, y, y_null, method, num_steps, guidance, timeshift,
                               guidance_interval, t_start, solver_kwargs, trajectory=True)
    return x, xs, grid


def solve_adaptive(model, noise, y, y_null=None, *, guidance: float = 1.0,
                   guidance_interval: Sequence[float] = (0.0, 1.0), t_start: float = 0.0,
                   num_steps: int = 16, **solver_kwargs):
    """The ``"adaptive"`` method, returning ``(final, info)``.

    ``info`` holds ``nfe`` (model evaluations, each a CFG batch when guided), ``accepted`` and
    ``rejected`` step counts as Python ints.
    """
    x, _, _, info = _dispatch(model, noise, y, y_null, "adaptive", num_steps, guidance, 1.0,
                              guidance_interval, t_start, solver_kwargs, trajectory=False)
    return x, {k: int(info[k]) for k in ("nfe", "accepted", "rejected")}


def sample_batched(model, key, shape, y, y_null=None, *, batch_size: int = 64, method: str = "heun",
                   num_steps: int = 32, progress: bool = True, mesh: Mesh | None = None, **kwargs) -> np.ndarray:
    """Draw ``shape[0]`` samples in chunks of ``batch_size``; returns a numpy array ``shape``.

    Sample ``i`` uses the noise ``normal(split(key, N)[i], shape[1:])``, so the result does not
    depend on ``batch_size``.  A short last chunk is padded to ``batch_size`` (and the padding
    dropped) so a single compiled function serves every chunk.  ``y`` / ``y_null`` hold one
    entry per sample (leading dimension ``N``); ``kwargs`` go to :func:`sample`.  Progress is
    reported with tqdm, one update per chunk.

    With a ``mesh`` (of this process's devices, e.g. :func:`pixeldit.parallel.local_data_mesh`)
    each chunk is data parallel: the model's parameters are replicated on the mesh once, the
    chunk's noise and conditions are split along the batch over the mesh's batch axes (the
    chunk is padded up to a multiple of their size).  The noise is the same as without a mesh.
    """
    from tqdm.auto import tqdm

    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"shape must be 4-D (N, H, W, C), got {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = shape[0]
    # Validate everything (with the full batch) before any compilation.
    _validate(model, jax.ShapeDtypeStruct(shape, jnp.float32), y, y_null, method, num_steps,
              kwargs.get("guidance", 1.0), kwargs.get("timeshift", 1.0),
              kwargs.get("guidance_interval", (0.0, 1.0)), kwargs.get("t_start", 0.0),
              {k: v for k, v in kwargs.items()
               if k not in ("guidance", "timeshift", "guidance_interval", "t_start")})
    y = jax.tree.map(np.asarray, _as_tree(y))
    y_null = None if y_null is None else jax.tree.map(np.asarray, _as_tree(y_null))
    keys = jax.random.split(key, n)
    bs = min(int(batch_size), n)
    place = lambda a: a
    if mesh is not None:
        model, place = _replicate_model(model, mesh), _batch_placer(mesh)
        bs = -(-bs // _batch_devices(mesh)) * _batch_devices(mesh)
    draw = _noise_fn(shape[1:])
    out = np.empty(shape, np.float32)
    with tqdm(total=n, disable=not progress, desc=f"sampling ({method})", unit="img") as bar:
        for start in range(0, n, bs):
            stop = min(start + bs, n)
            idx = np.minimum(np.arange(start, start + bs), n - 1)
            take = lambda a: place(a[idx])
            noise = place(draw(keys[idx]))
            xb = sample(model, noise, jax.tree.map(take, y),
                        None if y_null is None else jax.tree.map(take, y_null),
                        method=method, num_steps=num_steps, **kwargs)
            out[start:stop] = np.asarray(xb)[: stop - start]
            bar.update(stop - start)
    return out


def _batch_devices(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def _batch_placer(mesh: Mesh) -> Callable:
    """``a -> a`` on ``mesh``, split along its leading axis (:func:`pixeldit.parallel.batch_sharding`)."""
    sharding = batch_sharding(mesh)
    return lambda a: jax.device_put(a, sharding)


def _replicate_model(model, mesh: Mesh):
    """An NNX ``model`` with its arrays replicated on ``mesh`` (other callables as they are)."""
    if not isinstance(model, nnx.Module):
        return model
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, replicated(mesh)))


@functools.lru_cache(maxsize=None)
def _noise_fn(sample_shape):
    return jax.jit(jax.vmap(lambda k: jax.random.normal(k, sample_shape, jnp.float32)))

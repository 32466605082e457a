"""The sampler time grid: float32 linspace as torch computes it, the time shift, and the
DPM-Solver++(2M) step coefficients on a grid.

As in the reference (``c2i/src/diffusion.py``): ``linspace(0, 1 - 1/N, N)`` with ``1.0``
appended, then time-shifted ``t' = t / (t + (1 - t) * shift)``.  :func:`timesteps` computes it
step by step in float32 exactly like torch's float32 CPU kernels (linspace's two-sided
formula, then ``1 - t``, ``* shift``, ``+``, ``/``), so the grid is bit-identical to the
reference's ``sampler.timesteps``.  With ``t_start > 0`` the grid is instead
``linspace(t_start, 1, N + 1)`` (then shifted), which is the text-to-image reference's grid.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pixeldit.sampling.validation import _check_num_steps, _check_t_start, _check_timeshift


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

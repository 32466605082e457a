"""The solver bodies: one traced loop per method over a float32 time grid ``ts``.

Each takes the guided velocity ``vel(x, t)`` and the float32 state ``x`` at ``ts[0]`` and
returns the state at ``ts[-1]`` (and the states at the grid points when ``trajectory``).
``dt_i = t_{i+1} - t_i``, ``v(x, t)`` the guided velocity.

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
    the host in float64 from the float32 grid
    (:func:`pixeldit.sampling.schedule.dpm_solver_2m_coefficients`).  N evaluations.
``"adaptive"``
    Dormand-Prince 5(4) with an embedded error estimate, written with ``jax.lax.while_loop``
    (FSAL, 6 evaluations per attempted step).  Error norm: RMS over all elements of
    ``err / (atol + rtol * max(|x|, |x_new|))``; a step is accepted when the norm is <= 1;
    the step size is scaled by ``clip(0.9 * norm**(-1/5), 0.2, 10)``.  Keyword arguments
    ``rtol`` (default 1e-5), ``atol`` (1e-5), ``max_steps`` (attempted steps, default 4096).
    The first step size is ``1 / num_steps``.  :func:`pixeldit.sampling.sample` integrates
    straight from ``t_start`` to 1 (``timeshift`` is irrelevant there);
    :func:`pixeldit.sampling.sample_trajectory` integrates segment by segment over the fixed
    grid so the trajectory lands on it.  CFG and the guidance interval apply at every
    evaluation time.  :func:`pixeldit.sampling.solve_adaptive` also returns the number of
    evaluations and accepted / rejected steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("euler", "heun", "heun_exact", "flow_dpm", "dpm_solver_2m", "adaptive")
_ADAPTIVE_DEFAULTS = {"rtol": 1e-5, "atol": 1e-5, "max_steps": 4096}


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

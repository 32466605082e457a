"""The sampling entry points :func:`sample`, :func:`sample_trajectory` and
:func:`solve_adaptive`, and the one compiled function behind them.

``_dispatch`` validates every argument on the host, builds the time grid (and the
DPM-Solver++(2M) coefficients), then calls ``_run``.  Every method's whole loop is one
jit-compiled function (``lax.scan`` / ``lax.while_loop``); the grid, guidance scale and
interval are traced arguments, so changing them does not recompile; the model's graph
(``nnx.split``), the method, the step count and the shapes are the cache key.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pixeldit.sampling.guidance import _make_velocity
from pixeldit.sampling.schedule import dpm_solver_2m_coefficients, timesteps
from pixeldit.sampling.solvers import _adaptive, _dpm_2m, _euler, _flow_dpm, _heun
from pixeldit.sampling.validation import _validate
from pixeldit.static_model import merge_model, split_model


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

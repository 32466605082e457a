"""Argument checks for the samplers, run on the host before anything is compiled.

Each check raises a one-line ``ValueError`` naming what was expected and what was given;
:func:`_validate` runs them all and returns the normalised arguments.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from pixeldit.sampling.solvers import _ADAPTIVE_DEFAULTS, METHODS


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

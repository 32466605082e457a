"""Rectified-flow (flow matching) training objective.

Convention (the reference c2i convention): ``t = 0`` is pure noise and ``t = 1``
is data.  The noisy sample on the straight path is

    x_t = t * x + (1 - t) * eps,

and the network regresses the (constant along the path) velocity

    v = d x_t / d t = x - eps.

Everything here is a pure function; the model is passed in as a callable with
the project's model contract ``model(x_t, t, y, mask=None) -> v`` and
``model.null_condition(y)``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

TIME_DISTRIBUTIONS = ("logit_normal", "uniform")

__all__ = [
    "TIME_DISTRIBUTIONS",
    "drop_condition",
    "flow_matching_loss",
    "interpolate",
    "sample_time",
    "select_condition",
    "shift_time",
    "target_velocity",
]


def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """Apply the resolution time shift ``t / (t + (1 - t) * shift)``.

    With ``t = 0`` noise and ``t = 1`` data, ``shift > 1`` moves probability mass
    towards the noise end (useful at high resolution); ``shift = 1`` is the
    identity.  The end points 0 and 1 are fixed points.
    """
    if shift == 1.0:
        return t
    return t / (t + (1.0 - t) * shift)


def sample_time(
    key: jax.Array,
    batch: int,
    *,
    distribution: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
) -> jax.Array:
    """Sample training times ``t`` in [0, 1] with shape ``(batch,)``, float32.

    Args:
      key: PRNG key.
      batch: number of samples.
      distribution: ``"logit_normal"`` (``sigmoid(mean + std * n)``, n ~ N(0, 1))
        or ``"uniform"`` (U[0, 1); ``mean``/``std`` are ignored).
      mean, std: logit-normal location and scale.
      shift: time shift applied after sampling, ``t / (t + (1 - t) * shift)``.
    """
    if distribution == "logit_normal":
        if std <= 0:
            raise ValueError(f"logit-normal std must be > 0, got {std}")
        t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
    elif distribution == "uniform":
        t = jax.random.uniform(key, (batch,), jnp.float32)
    else:
        raise ValueError(
            f"unknown time distribution {distribution!r}; expected one of {TIME_DISTRIBUTIONS}"
        )
    if shift <= 0:
        raise ValueError(f"time shift must be > 0, got {shift}")
    return shift_time(t, shift)


def _expand(t: jax.Array, ndim: int) -> jax.Array:
    """Reshape per-example ``t`` of shape (B,) to broadcast against rank-``ndim`` arrays."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def interpolate(x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """Point on the straight path: ``t * x + (1 - t) * eps`` (t per example, shape (B,))."""
    t = _expand(t, x.ndim).astype(x.dtype)
    return t * x + (1.0 - t) * eps


def target_velocity(x: jax.Array, eps: jax.Array) -> jax.Array:
    """Velocity target of the straight path: ``x - eps``."""
    return x - eps


def drop_condition(key: jax.Array, y: Any, y_null: Any, p: float) -> Any:
    """Replace each example's condition by the null condition with probability ``p``.

    Works for any condition layout whose leading axis is the batch: labels (B,),
    vectors (B, K), token sequences (B, L, D).  ``y_null`` must broadcast against
    ``y`` (normally ``model.null_condition(y)``, which has y's shape).  ``y`` and
    ``y_null`` may also be matching pytrees (e.g. tokens and their mask); the same
    per-example decision is applied to every leaf.  ``p = 0`` returns ``y``
    unchanged, ``p = 1`` always returns the null condition.
    """
    if y is None:
        return None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {p}")
    leaves = jax.tree.leaves(y)
    batch = leaves[0].shape[0]
    if p == 0.0:
        return y
    return select_condition(jax.random.bernoulli(key, p, (batch,)), y, y_null)


def select_condition(drop: jax.Array, y: Any, y_null: Any) -> Any:
    """``y`` with the examples where ``drop`` (B,) is true replaced by ``y_null`` (every leaf alike)."""

    def _select(a, n):
        a = jnp.asarray(a)
        n = jnp.asarray(n, dtype=a.dtype)
        return jnp.where(_expand(drop, a.ndim), n, a)

    return jax.tree.map(_select, y, y_null)


def _check_draws(draws: Mapping[str, Any], x_shape: tuple[int, ...]) -> None:
    """Given draws must be known and shaped for the batch: ``t`` / ``drop`` (B,), ``noise`` like ``x``."""
    unknown = sorted(set(draws) - {"t", "noise", "drop"})
    if unknown:
        raise ValueError(f"unknown draws {unknown}; expected some of ['drop', 'noise', 't']")
    expected = {"t": x_shape[:1], "drop": x_shape[:1], "noise": tuple(x_shape)}
    for name, value in draws.items():
        if tuple(jnp.shape(value)) != expected[name]:
            raise ValueError(f"draws[{name!r}] must have shape {expected[name]}, got {tuple(jnp.shape(value))}")


def flow_matching_loss(
    model: Any,
    x: jax.Array,
    y: Any,
    key: jax.Array,
    *,
    p_uncond: float = 0.1,
    time_distribution: str = "logit_normal",
    time_mean: float = 0.0,
    time_std: float = 1.0,
    time_shift: float = 1.0,
    mask: jax.Array | None = None,
    tokens_after: int | None = None,
    draws: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching (velocity) MSE for one batch.

    Samples ``t`` (see :func:`sample_time`) and ``eps ~ N(0, I)``, drops the
    condition to ``model.null_condition(y)`` with probability ``p_uncond`` per
    example (classifier-free guidance training), and returns the mean squared
    error between ``model(x_t, t, y, mask=mask)`` and ``x - eps``, computed in
    float32 whatever the model's compute dtype.

    Args:
      model: callable ``model(x, t, y, mask=None) -> v`` with ``null_condition``.
      x: clean images, channel-last (B, H, W, C).
      y: condition (labels / text tokens / theta) with batch leading axis, or
        None for an unconditional model (no condition dropping then).
      key: PRNG key; split internally into time, noise and drop keys.
      p_uncond: per-example probability of using the null condition.
      time_distribution, time_mean, time_std, time_shift: see :func:`sample_time`.
      mask: optional attention mask passed to the model (text tokens).
      tokens_after: also return the model's patch tokens after this block (REPA) in ``aux``.
      draws: given random draws used instead of drawing them from ``key``: ``"t"`` (B,) the
        times (after any shift), ``"noise"`` (like ``x``) the noise, ``"drop"`` (B,) bool which
        examples take the null condition; each one present replaces its draw (so a step can be
        replayed from another implementation's draws).

    Returns:
      ``(loss, aux)`` where ``loss`` is a float32 scalar and ``aux`` holds
      ``"loss_per_example"`` (B,) and the sampled ``"t"`` (B,) (and ``"tokens"`` with ``tokens_after``).
    """
    x = jnp.asarray(x, jnp.float32)
    batch = x.shape[0]
    draws = {} if draws is None else dict(draws)
    _check_draws(draws, x.shape)
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    if "t" in draws:
        t = jnp.asarray(draws["t"], jnp.float32)
    else:
        t = sample_time(k_t, batch, distribution=time_distribution, mean=time_mean, std=time_std, shift=time_shift)
    if "noise" in draws:
        eps = jnp.asarray(draws["noise"], jnp.float32)
    else:
        eps = jax.random.normal(k_eps, x.shape, jnp.float32)
    x_t = interpolate(x, eps, t)
    target = target_velocity(x, eps)
    if y is not None and "drop" in draws:
        y = select_condition(jnp.asarray(draws["drop"], bool), y, model.null_condition(y))
    elif y is not None and p_uncond > 0.0:
        y = drop_condition(k_drop, y, model.null_condition(y), p_uncond)
    kwargs = {} if mask is None else {"mask": mask}
    if tokens_after is not None:
        v, tokens = model(x_t, t, y, tokens_after=tokens_after, **kwargs)
    else:
        v, tokens = model(x_t, t, y, **kwargs), None
    err = jnp.square(v.astype(jnp.float32) - target)
    per_example = jnp.mean(err.reshape(batch, -1), axis=1)
    loss = jnp.mean(per_example)
    aux = {"loss_per_example": per_example, "t": t}
    if tokens is not None:
        aux["tokens"] = tokens
    return loss, aux

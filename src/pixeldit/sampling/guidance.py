"""Classifier-free guidance: the guidance weight, the ``2B`` batch, and the guided velocity.

With ``guidance != 1`` each velocity evaluation is ONE model call on a batch of ``2B``:
``x`` concatenated with ``x``, ``t`` with ``t`` and ``[y_null, y]``; the output is split into
``(u, c)`` and combined as ``u + w * (c - u)`` where ``w = guidance`` if
``lo < t < hi`` (strict, ``(lo, hi) = guidance_interval``, compared in float32) and ``w = 1``
otherwise.  With ``guidance == 1`` only the conditional half is evaluated (a batch of ``B``);
``y_null`` may then be ``None``.  ``_make_velocity`` composes these into the function
``v(x, t)`` that every solver integrates; model outputs are upcast to float32 there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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

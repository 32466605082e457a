"""Rotary position embeddings: 2D fractional-position RoPE (image tokens) and 1D text RoPE.

Tables are pure numpy functions of the token-grid shape, built at trace time from the static
input shape, so any resolution works without rebuilding the model.  A table is returned as
rotation *angles* ``(N, head_dim // 2)`` float32; the reference's complex ``freqs_cis`` is
``exp(1j * angles)``.  Rotation acts on consecutive pairs ``(q[2j], q[2j+1])`` in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ROPE_THETA = 10000.0  # frequency base, reference default
ROPE_2D_SPAN = 16.0  # image positions span [0, 16] whatever the grid size (reference `scale`)


def rope_2d_angles(
    head_dim: int,
    height: int,
    width: int,
    theta: float = ROPE_THETA,
    scale: float = ROPE_2D_SPAN,
) -> np.ndarray:
    """2D RoPE angles of the reference ``precompute_freqs_cis_2d``: ``(height*width, head_dim//2)``.

    Positions are fractional, ``x = linspace(0, scale, width)``, ``y = linspace(0, scale, height)``
    over a row-major ``(height, width)`` grid; ``freqs = 1 / theta**(arange(0, d, 4)[:d//4] / d)``;
    the table interleaves ``[x * f_j, y * f_j]`` for each frequency ``j``.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    x_pos = np.linspace(0.0, scale, width, dtype=np.float32)
    y_pos = np.linspace(0.0, scale, height, dtype=np.float32)
    yy, xx = np.meshgrid(y_pos, x_pos, indexing="ij")  # (height, width)
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 4)[: head_dim // 4].astype(np.float32) / head_dim))
    freqs = freqs.astype(np.float32)
    x_ang = np.outer(xx.reshape(-1), freqs).astype(np.float32)  # (N, d/4)
    y_ang = np.outer(yy.reshape(-1), freqs).astype(np.float32)  # (N, d/4)
    return np.stack([x_ang, y_ang], axis=-1).reshape(height * width, head_dim // 2)


def rope_1d_angles(head_dim: int, length: int, theta: float = ROPE_THETA) -> np.ndarray:
    """1D RoPE angles for text tokens at integer positions ``0..length-1``: ``(length, head_dim//2)``.

    ``freqs = 1 / theta**(arange(0, d, 2) / d)`` (reference ``PixDiT_T2I.fetch_pos_text``).
    """
    if head_dim % 2:
        raise ValueError(f"1D RoPE needs an even head_dim, got {head_dim}")
    freqs = (1.0 / (theta ** (np.arange(0, head_dim, 2).astype(np.float32) / head_dim))).astype(np.float32)
    return np.outer(np.arange(length, dtype=np.float32), freqs).astype(np.float32)


def apply_rope(x: jax.Array, angles: jax.Array | np.ndarray) -> jax.Array:
    """Rotate consecutive feature pairs of ``x`` ``(B, N, heads, head_dim)`` by ``angles`` ``(N, head_dim//2)``.

    Computed in float32 and cast back to ``x.dtype`` (reference ``apply_rotary_emb``).
    """
    cos = jnp.cos(angles)[None, :, None, :]  # (1, N, 1, d/2)
    sin = jnp.sin(angles)[None, :, None, :]
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)

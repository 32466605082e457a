"""Seed building blocks of PixelDiT (reference ``pixdit_core/modules.py``).

The public names, signatures and documented behaviours here are a fixed API (tested in
``tests/test_modules.py``); keep them exactly.  Every class takes sizes
first and then keyword-only ``rngs``, ``param_dtype`` (default bfloat16, as specified) and an
optional compute ``dtype`` (``None``: computations follow the parameter / input dtype).

Linear layers are Flax ``nnx.Linear``: the kernel is ``(in, out)``, the transpose of a torch
``nn.Linear.weight``.  Weight import lives in :mod:`pixeldit.convert`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

RMS_EPS = 1e-6  # the reference uses eps = 1e-6 for every RMSNorm
TIMESTEP_MAX_PERIOD = 10.0  # reference TimestepConditioner.timestep_embedding(max_period=10)
SINCOS_BASE = 10000.0  # base of the 1D/2D sincos position tables

# torch.nn.Linear's default kernel init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Linear(nnx.Linear):
    """``nnx.Linear`` applied to the inputs flattened to 2D ``(tokens, features)``.

    Same parameters and result as ``nnx.Linear``; the flattening lets XLA's CPU backend emit
    every forward and backward matmul as a plain 2D GEMM without transposing copies of the
    activation gradient (a 1.6x faster backward at the benchmark sizes).
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        y = super().__call__(x.reshape(-1, x.shape[-1]))
        return y.reshape(*lead, y.shape[-1])


def linear(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    rngs: nnx.Rngs,
    dtype: DTypeLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
    kernel_init=torch_default_kernel_init,
    bias_init=nnx.initializers.zeros,
) -> nnx.Linear:
    """A :class:`Linear` with the reference's default kernel init (torch's) and zero bias."""
    return Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        bias_init=bias_init,
        rngs=rngs,
    )


# ---------------------------------------------------------------------------------------------
# Buffer
# ---------------------------------------------------------------------------------------------


class Buffer(nnx.Variable):
    """Non-trainable array buffer (rope tables, sincos tables, etc.).

    A dedicated Variable type, so buffers are filterable with ``nnx.state(model, Buffer)``,
    are not part of ``nnx.Param`` state (a dtype cast applied to the parameters never touches
    them) and are skipped by optimisers that update ``nnx.Param`` only.
    """


# ---------------------------------------------------------------------------------------------
# Normalisation and feed-forward layers
# ---------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """RMSNorm of the reference: ``weight * (x * rsqrt(mean(x^2) + eps))``.

    The normalisation runs in float32 and is cast back to the input dtype before the weight
    multiplies (reference ``RMSNorm.forward``).
    """

    def __init__(
        self,
        dim: int,
        eps: float = RMS_EPS,
        *,
        rngs: nnx.Rngs | None = None,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.bfloat16,
    ):
        del rngs  # deterministic init (ones); accepted for a uniform constructor signature
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((dim,), dtype=param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        in_dtype = x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        out_dtype = self.dtype or in_dtype
        return xf.astype(in_dtype).astype(out_dtype) * self.weight[...].astype(out_dtype)


class SwiGLU(nnx.Module):
    """SwiGLU feed-forward (ref ``FeedForward``, modules.py:119-129).

    ``hidden = int(2 * int(dim * mlp_ratio) / 3)`` (the reference truncates ``dim * mlp_ratio``
    first; for the integer products used everywhere this equals ``int(2 * (dim * mlp_ratio) / 3)``);
    all three projections are bias-free.  Forward: ``w2(silu(w1(x)) * w3(x))``.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        *,
        rngs: nnx.Rngs,
        param_dtype: DTypeLike = jnp.bfloat16,
        dtype: DTypeLike | None = None,
    ):
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.w1 = linear(dim, hidden, **kw)
        self.w3 = linear(dim, hidden, **kw)
        self.w2 = linear(hidden, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class PixelMLP(nnx.Module):
    """Standard GELU MLP used in pixel-level DiT blocks (ref ``MLP``, modules.py:223-238).

    ``Linear(dim -> int(dim * mlp_ratio))`` -> exact (erf) GELU -> ``Linear(-> dim)``; both
    linears have biases; no dropout (the reference never trains with dropout).
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        *,
        rngs: nnx.Rngs,
        param_dtype: DTypeLike = jnp.bfloat16,
        dtype: DTypeLike | None = None,
    ):
        hidden = int(dim * mlp_ratio)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = linear(dim, hidden, **kw)
        self.fc2 = linear(hidden, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


# ---------------------------------------------------------------------------------------------
# Timestep conditioning
# ---------------------------------------------------------------------------------------------


def _timestep_embedding(t, dim: int, max_period: float = TIMESTEP_MAX_PERIOD) -> jax.Array:
    """Sinusoidal timestep embedding in float32 (ref ``TimestepConditioner.timestep_embedding``).

    ``cat([cos(t * f), sin(t * f)])`` with ``f = exp(-ln(max_period) * arange(half) / half)``;
    deliberately *not* the DiT/Flux recipe: max period 10 (not 10000), no x1000 time factor,
    cos before sin.  A zero column is appended for odd ``dim``.  Always float32, whatever the
    dtype of ``t`` (bfloat16 ``t`` would quantise fine time differences).  Returns ``(..., dim)``.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t).astype(jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
    return emb


class TimestepConditioner(nnx.Module):
    """Embed a scalar timestep into ``hidden_size`` (ref modules.py:63-91).

    ``mlp = Linear(freq_dim -> hidden) -> SiLU -> Linear(hidden -> hidden)``, kept as an
    ``nnx.Sequential`` so ``mlp.layers[0]`` / ``mlp.layers[2]`` mirror the reference keys
    ``mlp.0`` / ``mlp.2``.  The sinusoid is always computed in float32 and cast to the compute
    dtype (``dtype``, else ``param_dtype``) only before the MLP.  MLP weights are initialised
    ``normal(std=0.02)`` (reference ``initialize_weights``).
    """

    def __init__(
        self,
        hidden_size: int,
        freq_dim: int = 256,
        *,
        rngs: nnx.Rngs,
        param_dtype: DTypeLike = jnp.bfloat16,
        dtype: DTypeLike | None = None,
    ):
        self.freq_dim = freq_dim
        self.dtype = dtype
        self.param_dtype = param_dtype
        kw = dict(
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.initializers.normal(stddev=0.02),
        )
        self.mlp = nnx.Sequential(
            linear(freq_dim, hidden_size, **kw),
            jax.nn.silu,
            linear(hidden_size, hidden_size, **kw),
        )

    def __call__(self, t: jax.Array) -> jax.Array:
        t_freq = _timestep_embedding(t, self.freq_dim)  # float32 (..., freq_dim)
        return self.mlp(t_freq.astype(self.dtype or self.param_dtype))


# ---------------------------------------------------------------------------------------------
# Output head
# ---------------------------------------------------------------------------------------------


class FinalLayer(nnx.Module):
    """RMSNorm + zero-init linear output projection (ref modules.py:241-250).

    The linear's kernel and bias are both zero-initialised, so the layer is exactly the zero
    map at initialisation.
    """

    def __init__(
        self,
        hidden_size: int,
        out_channels: int,
        *,
        rngs: nnx.Rngs,
        param_dtype: DTypeLike = jnp.bfloat16,
        dtype: DTypeLike | None = None,
    ):
        self.norm = RMSNorm(hidden_size, RMS_EPS, dtype=dtype, param_dtype=param_dtype)
        self.linear = linear(
            hidden_size,
            out_channels,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.initializers.zeros,
            bias_init=nnx.initializers.zeros,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(self.norm(x))


# ---------------------------------------------------------------------------------------------
# Sincos position tables (pure numpy)
# ---------------------------------------------------------------------------------------------


def _get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """1D sincos embedding for a grid of positions (ref modules.py:38-56).

    ``omega = 1 / 10000**(arange(D/2) / (D/2))``; returns ``(M, embed_dim)`` float64 with the
    order ``[sin, cos]`` (reference: ``cat([emb_sin, emb_cos])``), ``M = pos.size``.
    """
    if embed_dim % 2:
        raise ValueError(f"sincos embed_dim must be even, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / SINCOS_BASE**omega  # (D/2,)
    out = np.einsum("m,d->md", np.asarray(pos).reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, h: int, w: int) -> np.ndarray:
    """Pure-numpy 2D sincos positional embedding table, ``(h*w, embed_dim)`` float32.

    Supports ``h != w``; rows are positions in row-major ``(h, w)`` order.  The axis
    convention is the reference's, kept as is: ``grid = meshgrid(grid_w, grid_h)`` (w first), so
    the first half of the features encodes ``grid[0]`` (the w coordinate) and the second half
    ``grid[1]`` (the h coordinate), even though the reference calls the first half ``emb_h``.
    """
    if embed_dim % 2:
        raise ValueError(f"2D sincos embed_dim must be even, got {embed_dim}")
    grid_h = np.arange(h, dtype=np.float32)
    grid_w = np.arange(w, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # (2, h, w); grid[0] is the w axis
    emb_first = _get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (h*w, D/2)
    emb_second = _get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (h*w, D/2)
    return np.concatenate([emb_first, emb_second], axis=1).astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation of the reference (``apply_adaln``): ``x * (1 + scale) + shift``."""
    return x * (1 + scale) + shift

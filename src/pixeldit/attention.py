"""Rotary self-attention and MMDiT joint attention (reference ``RotaryAttention``, ``MMDiTJointAttention``).

Both follow the reference exactly: bias-free qkv projection, per-head RMSNorm on q and k
(over ``head_dim``) *before* RoPE, softmax scale ``1/sqrt(head_dim)``, output projection with
bias.  The attention itself is ``jax.nn.dot_product_attention``, with tensors laid out
``(B, tokens, heads, head_dim)`` as it expects.  Its implementation is chosen per call by
:func:`attention_implementation`: cuDNN flash attention on a GPU for bfloat16/float16 inputs
without a key mask, XLA's attention otherwise (JAX's own default, ``implementation=None``, is
XLA everywhere).  ``PIXELDIT_ATTENTION=xla`` or ``=cudnn`` overrides the choice.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from pixeldit.modules import RMSNorm, linear
from pixeldit.rope import apply_rope
from pixeldit.runtime import ATTENTION_ENV


def _split_heads(qkv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(B, N, 3*D)`` -> three ``(B, N, heads, head_dim)`` (reference ``reshape(B, N, 3, H, d)``)."""
    b, n, three_d = qkv.shape
    qkv = qkv.reshape(b, n, 3, num_heads, three_d // (3 * num_heads))
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


ATTENTION_CHOICES = ("auto", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_forced: list[str | None] = [None]  # set by use_attention()


@contextlib.contextmanager
def use_attention(implementation: str) -> Iterator[None]:
    """Trace attention inside the block with ``"xla"`` or ``"cudnn"``, whatever ``$PIXELDIT_ATTENTION`` says.

    (``pixeldit.bench.count_flops`` lowers with XLA's attention on every backend.)
    """
    if implementation not in ("xla", "cudnn"):
        raise ValueError(f"implementation must be 'xla' or 'cudnn', got {implementation!r}")
    previous, _forced[0] = _forced[0], implementation
    try:
        yield
    finally:
        _forced[0] = previous


def _requested() -> str:
    """The implementation asked for: :func:`use_attention`'s, else ``$PIXELDIT_ATTENTION``'s (default auto)."""
    if _forced[0] is not None:
        return _forced[0]
    choice = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"${ATTENTION_ENV} must be one of {ATTENTION_CHOICES}, got {choice!r}")
    return choice


def attention_implementation(q: jax.Array, mask: jax.Array | None = None, *, backend: str | None = None) -> str:
    """``"cudnn"`` or ``"xla"``: the ``jax.nn.dot_product_attention`` implementation used for ``q``.

    ``auto`` (the default of ``$PIXELDIT_ATTENTION``) takes cuDNN's flash attention when the
    backend is a GPU, ``q`` is bfloat16 or float16, ``head_dim`` is a multiple of 8 up to 128
    and no key mask is given (the masked MMDiT joint attention stays on XLA); XLA otherwise,
    so float32 runs, the golden parity tests among them, always use XLA's exact softmax.
    """
    choice = _requested()
    if choice != "auto":
        return choice
    backend = backend or jax.default_backend()
    head_dim = q.shape[-1]
    eligible = (backend in ("gpu", "cuda") and jnp.dtype(q.dtype) in _CUDNN_DTYPES and mask is None
                and head_dim % 8 == 0 and head_dim <= 128)
    return "cudnn" if eligible else "xla"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention over ``(B, N, heads, head_dim)``; ``mask`` ``(B, S)`` marks valid keys.

    When ``auto`` chose cuDNN and cuDNN refuses while tracing (an older GPU, an unsupported
    shape), this warns and uses XLA's attention; an explicit ``cudnn`` request raises instead.
    """
    bias_mask = None if mask is None else mask[:, None, None, :].astype(bool)
    impl = attention_implementation(q, mask)
    if impl == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, implementation="cudnn")
        except (RuntimeError, ValueError, NotImplementedError) as e:
            if _requested() == "cudnn":
                raise
            warnings.warn(f"cuDNN attention unavailable ({e}); using XLA's attention", stacklevel=2)
            impl = "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, implementation=impl)


class RotaryAttention(nnx.Module):
    """Multi-head self-attention with q/k RMSNorm and 2D RoPE (reference ``RotaryAttention``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
    ):
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.qkv = linear(dim, 3 * dim, use_bias=False, **kw)
        self.q_norm = RMSNorm(self.head_dim, dtype=dtype, param_dtype=param_dtype)
        self.k_norm = RMSNorm(self.head_dim, dtype=dtype, param_dtype=param_dtype)
        self.proj = linear(dim, dim, **kw)

    def __call__(self, x: jax.Array, rope: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        b, n, d = x.shape
        q, k, v = _split_heads(self.qkv(x), self.num_heads)  # (B, N, H, hd) each
        q = apply_rope(self.q_norm(q), rope)
        k = apply_rope(self.k_norm(k), rope)
        out = attend(q, k, v, mask)  # (B, N, H, hd)
        return self.proj(out.reshape(b, n, d))


class MMDiTJointAttention(nnx.Module):
    """Joint attention over ``[text, image]`` tokens with separate per-stream weights.

    Each stream has its own qkv, q/k norms and output projection (``qkv_x``/``qkv_y``, ...,
    ``proj_x``/``proj_y``); image tokens get 2D RoPE, text tokens 1D RoPE when given.
    ``mask`` ``(B, L_text)`` (1 = real token) hides padded text keys; image keys are always valid.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
    ):
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        nkw = dict(dtype=dtype, param_dtype=param_dtype)
        self.qkv_x = linear(dim, 3 * dim, use_bias=False, **kw)
        self.qkv_y = linear(dim, 3 * dim, use_bias=False, **kw)
        self.q_norm_x = RMSNorm(self.head_dim, **nkw)
        self.k_norm_x = RMSNorm(self.head_dim, **nkw)
        self.q_norm_y = RMSNorm(self.head_dim, **nkw)
        self.k_norm_y = RMSNorm(self.head_dim, **nkw)
        self.proj_x = linear(dim, dim, **kw)
        self.proj_y = linear(dim, dim, **kw)

    def __call__(
        self,
        x: jax.Array,
        y: jax.Array,
        rope_img: jax.Array,
        rope_txt: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        b, nx, d = x.shape
        ny = y.shape[1]
        qx, kx, vx = _split_heads(self.qkv_x(x), self.num_heads)
        qy, ky, vy = _split_heads(self.qkv_y(y), self.num_heads)
        qx = apply_rope(self.q_norm_x(qx), rope_img)
        kx = apply_rope(self.k_norm_x(kx), rope_img)
        qy, ky = self.q_norm_y(qy), self.k_norm_y(ky)
        if rope_txt is not None:
            qy, ky = apply_rope(qy, rope_txt), apply_rope(ky, rope_txt)
        q = jnp.concatenate([qy, qx], axis=1)  # (B, Ny + Nx, H, hd): text first
        k = jnp.concatenate([ky, kx], axis=1)
        v = jnp.concatenate([vy, vx], axis=1)
        joint_mask = None
        if mask is not None:
            joint_mask = jnp.concatenate([mask.astype(bool), jnp.ones((b, nx), bool)], axis=1)
        out = attend(q, k, v, joint_mask)
        out_y = out[:, :ny].reshape(b, ny, d)
        out_x = out[:, ny:].reshape(b, nx, d)
        return self.proj_x(out_x), self.proj_y(out_y)

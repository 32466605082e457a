"""Transformer blocks: patch-level DiT block, MMDiT joint block, pixel-level PiT block.

Submodule names are the reference's (``norm1``, ``attn``, ``mlp``, ``adaLN_modulation``...),
``adaLN_modulation`` is an ``nnx.Sequential`` of one linear so ``adaLN_modulation.layers[0]``
mirrors the reference key ``adaLN_modulation.0``.  adaLN chunk order (reference):
``shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp``; post-modulated PiT:
``scale1, shift1, scale2, shift2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from pixeldit.attention import MMDiTJointAttention, RotaryAttention
from pixeldit.modules import RMSNorm, PixelMLP, SwiGLU, linear, modulate


def _adaln(in_dim: int, out_dim: int, zero_init: bool, **kw) -> nnx.Sequential:
    """``Sequential(Linear(in_dim -> out_dim))``; zero-initialised when ``zero_init`` (DiT's adaLN-Zero)."""
    if zero_init:
        kw = dict(kw, kernel_init=nnx.initializers.zeros, bias_init=nnx.initializers.zeros)
    return nnx.Sequential(linear(in_dim, out_dim, **kw))


class DiTBlock(nnx.Module):
    """Class-to-image patch block (reference ``AugmentedDiTBlock``): adaLN, rotary attention, SwiGLU."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        rngs: nnx.Rngs,
        zero_init_adaln: bool = True,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        nkw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = RMSNorm(hidden_size, **nkw)
        self.attn = RotaryAttention(hidden_size, num_heads, **kw)
        self.norm2 = RMSNorm(hidden_size, **nkw)
        self.mlp = SwiGLU(hidden_size, mlp_ratio, **kw)
        self.adaLN_modulation = _adaln(hidden_size, 6 * hidden_size, zero_init_adaln, **kw)

    def __call__(self, x: jax.Array, c: jax.Array, rope: jax.Array, mask=None) -> jax.Array:
        # x: (B, L, D) patch tokens; c: (B, 1, D) condition
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            self.adaLN_modulation(c), 6, axis=-1
        )
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, mask)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class MMDiTBlock(nnx.Module):
    """Two-stream MMDiT block (reference ``MMDiTBlockT2I``): image ``x`` and text ``y`` attend jointly."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        rngs: nnx.Rngs,
        zero_init_adaln: bool = False,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        nkw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm_x1 = RMSNorm(hidden_size, **nkw)
        self.norm_y1 = RMSNorm(hidden_size, **nkw)
        self.attn = MMDiTJointAttention(hidden_size, num_heads, **kw)
        self.norm_x2 = RMSNorm(hidden_size, **nkw)
        self.norm_y2 = RMSNorm(hidden_size, **nkw)
        self.mlp_x = SwiGLU(hidden_size, mlp_ratio, **kw)
        self.mlp_y = SwiGLU(hidden_size, mlp_ratio, **kw)
        self.adaLN_modulation_img = _adaln(hidden_size, 6 * hidden_size, zero_init_adaln, **kw)
        self.adaLN_modulation_txt = _adaln(hidden_size, 6 * hidden_size, zero_init_adaln, **kw)

    def __call__(self, x, y, c, rope_img, rope_txt=None, mask=None):
        # x: (B, L, D) image tokens; y: (B, L_txt, D) text tokens; c: (B, 1, D)
        sx_msa, cx_msa, gx_msa, sx_mlp, cx_mlp, gx_mlp = jnp.split(self.adaLN_modulation_img(c), 6, axis=-1)
        sy_msa, cy_msa, gy_msa, sy_mlp, cy_mlp, gy_mlp = jnp.split(self.adaLN_modulation_txt(c), 6, axis=-1)
        attn_x, attn_y = self.attn(
            modulate(self.norm_x1(x), sx_msa, cx_msa),
            modulate(self.norm_y1(y), sy_msa, cy_msa),
            rope_img,
            rope_txt,
            mask,
        )
        x = x + gx_msa * attn_x
        y = y + gy_msa * attn_y
        x = x + gx_mlp * self.mlp_x(modulate(self.norm_x2(x), sx_mlp, cx_mlp))
        y = y + gy_mlp * self.mlp_y(modulate(self.norm_y2(y), sy_mlp, cy_mlp))
        return x, y


class PiTBlock(nnx.Module):
    """Pixel-level transformer block with pixel-wise adaLN and token compaction (reference ``PiTBlock``).

    Every pixel gets its own modulation: ``adaLN_modulation`` maps the patch condition
    ``(B, L, D)`` to ``n_mod * p*p * D_pix`` values viewed as ``(B, L, p*p, n_mod * D_pix)``.
    Attention compacts each patch's ``p*p`` pixel tokens into one token (``compress_to_attn``),
    attends globally over the ``L`` patches with 2D RoPE, and expands back (``expand_from_attn``).
    Pre-modulation (default): 6 chunks with gates; post-modulation: 4 chunks, no gates, applied
    to the branch outputs.
    """

    def __init__(
        self,
        pixel_hidden_size: int,
        patch_hidden_size: int,
        patch_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_hidden_size: int | None = None,
        *,
        rngs: nnx.Rngs,
        adaln_post_modulation: bool = False,
        zero_init_adaln: bool = True,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
    ):
        self.pixel_dim = pixel_hidden_size
        self.attn_dim = attn_hidden_size or patch_hidden_size
        self.p2 = patch_size * patch_size
        self.post_modulation = adaln_post_modulation
        self.n_mod = 4 if adaln_post_modulation else 6
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        nkw = dict(dtype=dtype, param_dtype=param_dtype)
        self.compress_to_attn = linear(self.p2 * self.pixel_dim, self.attn_dim, **kw)
        self.expand_from_attn = linear(self.attn_dim, self.p2 * self.pixel_dim, **kw)
        self.norm1 = RMSNorm(self.pixel_dim, **nkw)
        self.attn = RotaryAttention(self.attn_dim, num_heads, **kw)
        self.norm2 = RMSNorm(self.pixel_dim, **nkw)
        self.mlp = PixelMLP(self.pixel_dim, mlp_ratio, **kw)
        self.adaLN_modulation = _adaln(
            patch_hidden_size, self.n_mod * self.pixel_dim * self.p2, zero_init_adaln, **kw
        )

    def __call__(self, x: jax.Array, s_cond: jax.Array, rope: jax.Array, mask=None) -> jax.Array:
        # x: (B, L, p*p, D_pix) pixel tokens grouped by patch; s_cond: (B, L, D) patch condition
        b, l, p2, dp = x.shape
        mod = self.adaLN_modulation(s_cond).reshape(b, l, p2, self.n_mod * dp)  # per-pixel
        if self.post_modulation:
            scale1, shift1, scale2, shift2 = jnp.split(mod, 4, axis=-1)
            x_norm = self.norm1(x)
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
            x_norm = modulate(self.norm1(x), shift_msa, scale_msa)
        x_comp = self.compress_to_attn(x_norm.reshape(b, l, p2 * dp))  # (B, L, D_attn)
        attn = self.attn(x_comp, rope)  # pixel blocks never take the text mask
        attn = self.expand_from_attn(attn).reshape(b, l, p2, dp)  # (B, L, p*p, D_pix)
        if self.post_modulation:
            x = x + modulate(attn, shift1, scale1)
            x = x + modulate(self.mlp(self.norm2(x)), shift2, scale2)
        else:
            x = x + gate_msa * attn
            x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

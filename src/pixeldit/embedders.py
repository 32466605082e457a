"""Embedders: patch tokens, pixel tokens, class labels, theta tokens and theta's adaLN condition; patchify / unpatchify.

Images are channel-last ``(B, H, W, C)``.  Patch features are *pixel-major* here,
``(i*p + j)*C + c``, where the reference's ``F.unfold`` is channel-major, ``c*p*p + i*p + j``;
:mod:`pixeldit.convert` permutes ``s_embedder.proj.weight`` accordingly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from pixeldit.modules import (
    Buffer,
    RMSNorm,
    _get_1d_sincos_pos_embed_from_grid,
    get_2d_sincos_pos_embed,
    linear,
)


def patchify(x: jax.Array, p: int) -> jax.Array:
    """``(B, H, W, C)`` -> ``(B, L, p*p, C)``, patches row-major over the ``(H/p, W/p)`` grid."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c)  # (B, Hs, p, Ws, p, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, Hs, Ws, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p, c)


def unpatchify(x: jax.Array, h: int, w: int, p: int) -> jax.Array:
    """``(B, L, p*p, C)`` -> ``(B, H, W, C)``, the inverse of :func:`patchify` (reference ``F.fold``)."""
    b, _, _, c = x.shape
    x = x.reshape(b, h // p, w // p, p, p, c)  # (B, Hs, Ws, p, p, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, Hs, p, Ws, p, C)
    return x.reshape(b, h, w, c)


class PatchTokenEmbedder(nnx.Module):
    """``Linear(in -> D)`` then an optional RMSNorm (reference ``PatchTokenEmbedder``).

    Used for patch tokens (``s_embedder``, input ``p*p*C`` pixel-major features) and for text
    tokens (``y_embedder`` of the text-to-image model, with ``norm=True``).
    """

    def __init__(
        self,
        in_features: int,
        embed_dim: int,
        *,
        norm: bool = False,
        rngs: nnx.Rngs,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
    ):
        # reference initialize_weights: xavier_uniform on the patch projection, zero bias
        self.proj = linear(
            in_features,
            embed_dim,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.initializers.xavier_uniform(),
        )
        self.norm = RMSNorm(embed_dim, dtype=dtype, param_dtype=param_dtype) if norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        return self.norm(x) if self.norm is not None else x


class PixelTokenEmbedder(nnx.Module):
    """Per-pixel ``Linear(C -> D_pix)`` plus the 2D sincos table, grouped by patch (reference).

    Returns ``(B, L, p*p, D_pix)``: patches row-major, pixels row-major inside each patch.
    The sincos table is derived from the input's static shape at trace time.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_size: int,
        *,
        use_pixel_abs_pos: bool = True,
        rngs: nnx.Rngs,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
    ):
        self.hidden_size = hidden_size
        self.use_pixel_abs_pos = use_pixel_abs_pos
        self.proj = linear(in_channels, hidden_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, patch_size: int) -> jax.Array:
        b, h, w, _ = x.shape
        x = self.proj(x)  # (B, H, W, D_pix)
        if self.use_pixel_abs_pos:
            pos = get_2d_sincos_pos_embed(self.hidden_size, h, w).reshape(h, w, self.hidden_size)
            x = x + jnp.asarray(pos, dtype=x.dtype)
        return patchify(x, patch_size)


class ClassEmbedder(nnx.Module):
    """Label table with ``num_classes + 1`` rows; the last row is the null class for CFG.

    ``embedding_table`` mirrors the reference key ``y_embedder.embedding_table.weight``;
    initialised normal(std=0.02) (reference ``initialize_weights``).
    """

    def __init__(
        self,
        num_rows: int,
        hidden_size: int,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
    ):
        self.embedding_table = nnx.Embed(
            num_rows,
            hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(stddev=0.02),
            rngs=rngs,
        )

    def __call__(self, labels: jax.Array) -> jax.Array:
        return self.embedding_table(labels)


THETA_TOKEN_EMBEDDINGS = ("learned", "sincos", "none")


def encode_theta(theta: jax.Array, center, scale) -> jax.Array:
    """Raw theta ``(..., K)`` -> ``(..., K, 2)``: the pairs ``((theta - center) / scale, 1)``.

    Why: a theta component fed as a bare scalar goes through ``Linear(1 -> D)``, a direction
    times the scalar, so at initialisation (zero bias) its token only moves along one line and an
    RMSNorm would keep only its sign.  With the constant second channel the token's direction
    moves with theta.  ``center`` / ``scale`` (``(K,)``) map the prior box or the data's range to
    [-1, 1].  NaN components (the null condition) stay NaN in both channels.
    """
    z = (theta - jnp.asarray(center, jnp.float32)) / jnp.asarray(scale, jnp.float32)
    ones = jnp.where(jnp.isnan(z), jnp.nan, 1.0).astype(z.dtype)
    return jnp.stack([z, ones], axis=-1)


class ThetaEmbedder(nnx.Module):
    """Parameter vector ``theta`` -> ``K`` condition tokens for the theta-conditional model.

    Each of the ``K`` components (a scalar, or a ``C``-vector for ``(B, K, C)`` input) goes
    through a shared ``Linear(C -> D)``, followed by an RMSNorm when ``C > 1`` (as the reference
    normalises its text tokens).  Scalar components skip the norm on purpose: the RMSNorm of a
    projected scalar ``w * theta + b`` (``b`` zero at init) keeps only the sign of ``theta``, which
    would hide its magnitude from the model.  The token's identity is added as a learned
    ``(1, K, D)`` table (initialised ``normal(table_init_std)``), a fixed 1D sincos table, or
    nothing.  A NaN component marks the null condition (classifier-free guidance): the whole
    token is replaced by a learned null token.
    """

    def __init__(
        self,
        num_tokens: int,
        token_channels: int,
        hidden_size: int,
        *,
        token_embedding: str = "learned",
        table_init_std: float = 0.02,
        rngs: nnx.Rngs,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
    ):
        if token_embedding not in THETA_TOKEN_EMBEDDINGS:
            raise ValueError(f"token_embedding must be one of {THETA_TOKEN_EMBEDDINGS}, got {token_embedding!r}")
        self.token_channels = token_channels
        self.proj = linear(token_channels, hidden_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = RMSNorm(hidden_size, dtype=dtype, param_dtype=param_dtype) if token_channels > 1 else None
        init = nnx.initializers.normal(stddev=0.02)
        self.null_token = nnx.Param(init(rngs.params(), (hidden_size,), param_dtype))
        if token_embedding == "learned":
            table_init = nnx.initializers.normal(stddev=table_init_std)
            self.pos_embedding = nnx.Param(table_init(rngs.params(), (1, num_tokens, hidden_size), param_dtype))
        elif token_embedding == "sincos":
            table = _get_1d_sincos_pos_embed_from_grid(hidden_size, np.arange(num_tokens, dtype=np.float64))
            self.pos_embedding = Buffer(jnp.asarray(table[None], dtype=jnp.float32))
        else:
            self.pos_embedding = None

    def __call__(self, theta: jax.Array) -> jax.Array:
        if theta.ndim == 2:
            theta = theta[..., None]  # (B, K) -> (B, K, 1)
        is_null = jnp.any(jnp.isnan(theta), axis=-1, keepdims=True)  # (B, K, 1)
        tok = self.proj(jnp.where(is_null, 0.0, theta))  # (B, K, D)
        if self.norm is not None:
            tok = self.norm(tok)
        tok = jnp.where(is_null, self.null_token[...].astype(tok.dtype), tok)
        if self.pos_embedding is not None:
            tok = tok + self.pos_embedding[...].astype(tok.dtype)
        return tok


class ThetaConditioner(nnx.Module):
    """Theta ``(B, K, C)`` (encoded) -> ``(B, 1, D)``, added to the timestep embedding of the adaLN condition.

    ``Linear(K -> D) -> SiLU -> Linear(D -> D)`` on the first channel of each component (the
    standardised value of the affine encoding, or the raw scalar); a NaN (null) component enters
    as 0.  Why: through joint attention alone, the conditioning of the early, noise-dominated
    phase of sampling (where only theta tells the field's amplitude and slope) was learned
    imprecisely; a global path as in the class-conditional model's ``c = t_emb + y_emb`` fixed it.
    """

    def __init__(self, num_tokens: int, hidden_size: int, *, rngs: nnx.Rngs, dtype: DTypeLike | None = None,
                 param_dtype: DTypeLike = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp = nnx.Sequential(linear(num_tokens, hidden_size, **kw), jax.nn.silu, linear(hidden_size, hidden_size, **kw))

    def __call__(self, theta: jax.Array) -> jax.Array:
        z = theta[..., 0]  # (B, K): one value per component
        z = jnp.where(jnp.isnan(z), 0.0, z)
        return self.mlp(z)[:, None, :]  # (B, 1, D)

"""DINOv2 ViT (Oquab et al. 2023) in Flax NNX: the frozen REPA target encoder of PixelDiT's c2i recipe.

The network is the torch-hub ``dinov2_vit*14`` / timm ``vit_*_patch14_dinov2`` backbone (pre-norm
blocks with layer scale, exact GELU, LayerNorm eps 1e-6, one class token, no registers).  Weights
come from the user's torch-hub or timm state dict (:func:`load_dinov2`), never downloaded.  Inputs
of another grid than the position table's get the table resized as the torch hub does
(``interpolate_pos_encoding``: bicubic, scale factor ``(n + 0.1) / M``, no antialias), which is
what the reference's ``DINOv2`` wrapper runs at 256 px (224 px in, a 16 x 16 grid from a 37 x 37
table).  :class:`DINOv2Encoder` adds that wrapper's preprocessing.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit.resample import resize, scaled_size
from pixeldit.torchfile import assign, check_consumed, read_state_dict, take

LN_EPS = 1e-6  # DINOv2 / timm ViT LayerNorm epsilon
INTERPOLATE_OFFSET = 0.1  # torch-hub DINOv2's interpolate_offset (the DINO "historical kludge")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm IMAGENET_DEFAULT_MEAN, as the reference normalises
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DINOv2Config:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    patch_size: int = 14
    pos_grid: int = 37  # side of the position table: 518 px / 14 for the released weights
    mlp_ratio: int = 4
    # matmul compute dtype; norms, softmax and the residual stream stay float32.  The reference
    # runs its encoder in bfloat16 (autocast); float32 is the parity setting.
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"DINOv2 dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.dim % self.heads:
            raise ValueError(f"DINOv2 dim {self.dim} must be divisible by heads {self.heads}")

    @classmethod
    def preset(cls, name: str) -> DINOv2Config:
        """``"S/14"``, ``"B/14"`` (the reference's ``dinov2_vitb14``), ``"L/14"`` or ``"tiny"`` (tests)."""
        presets = {
            "S/14": cls(dim=384, depth=12, heads=6),
            "B/14": cls(dim=768, depth=12, heads=12),
            "L/14": cls(dim=1024, depth=24, heads=16),
            "tiny": cls(dim=32, depth=2, heads=2, pos_grid=4),
        }
        if name not in presets:
            raise ValueError(f"DINOv2 preset must be one of {sorted(presets)}, got {name!r}")
        return presets[name]


def _linear(n_in: int, n_out: int, dtype: str, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, dtype=jnp.dtype(dtype), rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, dim: int, heads: int, dtype: str, *, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = _linear(dim, 3 * dim, dtype, rngs)
        self.proj = _linear(dim, dim, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)  # torch's (3, heads, hd) split
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, hd) each
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d // self.heads) ** -0.5
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return self.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, dtype: str, *, rngs: nnx.Rngs):
        self.fc1 = _linear(dim, hidden, dtype, rngs)
        self.fc2 = _linear(hidden, dim, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # nn.GELU: the exact erf form


class LayerScale(nnx.Module):
    def __init__(self, dim: int):
        self.gamma = nnx.Param(jnp.full((dim,), 1e-5))  # DINOv2 init_values

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...]


class Block(nnx.Module):
    def __init__(self, config: DINOv2Config, *, rngs: nnx.Rngs):
        d = config.dim
        self.norm1 = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.attn = Attention(d, config.heads, config.dtype, rngs=rngs)
        self.ls1 = LayerScale(d)
        self.norm2 = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.mlp = Mlp(d, d * config.mlp_ratio, config.dtype, rngs=rngs)
        self.ls2 = LayerScale(d)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.ls1(self.attn(self.norm1(x))).astype(x.dtype)
        return x + self.ls2(self.mlp(self.norm2(x))).astype(x.dtype)


class DINOv2(nnx.Module):
    """Images ``(B, H, W, 3)`` (already normalised) -> final-norm patch tokens ``(B, H//14 * W//14, dim)``."""

    def __init__(self, config: DINOv2Config, *, rngs: nnx.Rngs):
        self.config = config
        p, d = config.patch_size, config.dim
        # the stride-p conv as a linear map of flattened (p, p, 3) patches
        self.patch_embed = _linear(p * p * 3, d, config.dtype, rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, d)))
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1 + config.pos_grid**2, d)))
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.depth)])
        self.norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)

    def position_table(self, h0: int, w0: int) -> jax.Array:
        """``(1, 1 + h0 * w0, dim)``: the table, its grid resized as torch-hub DINOv2 resizes it."""
        m, table = self.config.pos_grid, self.pos_embed[...]
        if (h0, w0) == (m, m):
            return table
        grid = table[:, 1:].reshape(1, m, m, -1)
        scale = ((h0 + INTERPOLATE_OFFSET) / m, (w0 + INTERPOLATE_OFFSET) / m)
        grid = resize(grid, (scaled_size(m, scale[0]), scaled_size(m, scale[1])), "bicubic", scale=scale)
        return jnp.concatenate([table[:, :1], grid.reshape(1, h0 * w0, -1)], axis=1)

    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        p = self.config.patch_size
        if c != 3:
            raise ValueError(f"DINOv2 expects RGB images (B, H, W, 3), got shape {images.shape}")
        h0, w0 = h // p, w // p  # a stride-p conv drops the remainder rows / columns
        x = images[:, : h0 * p, : w0 * p].reshape(b, h0, p, w0, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.patch_embed(x.reshape(b, h0 * w0, p * p * c)).astype(jnp.float32)  # (B, N, D), N = h0 * w0
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_table(h0, w0)  # (B, 1 + N, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]  # x_norm_patchtokens


# ---------------------------------------------------------------------------------------------
# Weights: torch hub ``dinov2_vit*14`` and timm ``vit_*_patch14_dinov2`` share these names
# ---------------------------------------------------------------------------------------------



def _load_linear(layer: nnx.Linear, sd: dict, key: str) -> None:
    n_in, n_out = layer.kernel.shape
    assign(layer.kernel, take(sd, f"{key}.weight", (n_out, n_in)).T)  # torch (out, in) -> (in, out)
    assign(layer.bias, take(sd, f"{key}.bias", (n_out,)))


def _load_norm(norm: nnx.LayerNorm, sd: dict, key: str) -> None:
    (d,) = norm.scale.shape
    assign(norm.scale, take(sd, f"{key}.weight", (d,)))
    assign(norm.bias, take(sd, f"{key}.bias", (d,)))


def load_torch_state_dict(model: DINOv2, state_dict: dict[str, np.ndarray]) -> None:
    """Fill ``model`` in place; every key is used and shape-checked (``mask_token`` is training-only)."""
    sd = dict(state_dict)
    sd.pop("mask_token", None)
    c = model.config
    p, d = c.patch_size, c.dim
    conv = take(sd, "patch_embed.proj.weight", (d, 3, p, p))
    assign(model.patch_embed.kernel, conv.transpose(2, 3, 1, 0).reshape(p * p * 3, d))  # (p, p, 3) order
    assign(model.patch_embed.bias, take(sd, "patch_embed.proj.bias", (d,)))
    assign(model.cls_token, take(sd, "cls_token", (1, 1, d)))
    assign(model.pos_embed, take(sd, "pos_embed", (1, 1 + c.pos_grid**2, d)))
    for i, block in enumerate(model.blocks):
        k = f"blocks.{i}"
        _load_norm(block.norm1, sd, f"{k}.norm1")
        _load_linear(block.attn.qkv, sd, f"{k}.attn.qkv")
        _load_linear(block.attn.proj, sd, f"{k}.attn.proj")
        assign(block.ls1.gamma, take(sd, f"{k}.ls1.gamma", (d,)))
        _load_norm(block.norm2, sd, f"{k}.norm2")
        _load_linear(block.mlp.fc1, sd, f"{k}.mlp.fc1")
        _load_linear(block.mlp.fc2, sd, f"{k}.mlp.fc2")
        assign(block.ls2.gamma, take(sd, f"{k}.ls2.gamma", (d,)))
    _load_norm(model.norm, sd, "norm")
    check_consumed(sd, "DINOv2 state dict")


def config_from_state_dict(state_dict: dict[str, np.ndarray], *, head_dim: int = 64, dtype: str = "float32") -> DINOv2Config:
    """Sizes read off the weights; the released DINOv2 models all use 64-wide heads."""
    d = state_dict["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    grid = int(round((state_dict["pos_embed"].shape[1] - 1) ** 0.5))
    if any(k.startswith("blocks.0.0.") or "register_tokens" in k for k in state_dict):
        raise ValueError("DINOv2 weights with block chunks or register tokens are not supported")
    return DINOv2Config(dim=d, depth=depth, heads=d // head_dim, pos_grid=grid,
                        patch_size=state_dict["patch_embed.proj.weight"].shape[-1], dtype=dtype)


def load_dinov2(
    path: str | os.PathLike, config: DINOv2Config | None = None, *, dtype: str = "float32", seed: int = 0
) -> DINOv2:
    """A :class:`DINOv2` with the weights of a torch-hub / timm file (``.pth`` / ``.safetensors``).

    Sizes are read off the weights unless ``config`` is given; ``dtype`` is then the matmul dtype.
    """
    sd = read_state_dict(path)
    model = DINOv2(config or config_from_state_dict(sd, dtype=dtype), rngs=nnx.Rngs(seed))
    load_torch_state_dict(model, sd)
    return model


class DINOv2Encoder(nnx.Module):
    """The reference's REPA target: raw images in [0, 1] -> DINOv2 patch tokens (a ``PatchEncoder``).

    As the reference ``DINOv2`` wrapper: normalise with the ImageNet mean / std, resize bicubically
    to ``14 / base_patch_size`` of each side (256 px -> 224 px, one DINOv2 token per PixelDiT
    patch), return ``x_norm_patchtokens``.  No gradient flows into the encoder.  ``size`` fixes the
    resized side instead: the t2i trainer resizes every image to ``(224, 224)`` (it resizes before
    normalising; both are linear per channel, so the order changes only float rounding).
    """

    def __init__(self, model: DINOv2, base_patch_size: int = 16, size: tuple[int, int] | None = None):
        self.model = model
        self.base_patch_size = base_patch_size
        self.size = size

    def __call__(self, images: jax.Array) -> jax.Array:
        _, h, w, _ = images.shape
        p = self.model.config.patch_size
        size = self.size or (p * h // self.base_patch_size, p * w // self.base_patch_size)
        x = (images - jnp.asarray(IMAGENET_MEAN, images.dtype)) / jnp.asarray(IMAGENET_STD, images.dtype)
        x = resize(x, size, "bicubic")
        return jax.lax.stop_gradient(self.model(x))  # frozen, as the reference's torch.no_grad()

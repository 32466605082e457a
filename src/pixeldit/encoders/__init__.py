"""Frozen image encoders that give REPA its target patch tokens.

A :class:`PatchEncoder` is any callable from raw images ``(B, H, W, 3)`` in [0, 1] to patch tokens
``(B, N, D)`` with ``N`` a square number (REPA resizes token grids as squares, as the reference
does).  :class:`~pixeldit.encoders.dinov2.DINOv2Encoder` is the reference's; :class:`TinyEncoder`
is a cheap stand-in for tests.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from pixeldit.encoders.dinov2 import DINOv2, DINOv2Config, DINOv2Encoder, load_dinov2

__all__ = ["DINOv2", "DINOv2Config", "DINOv2Encoder", "PatchEncoder", "TinyEncoder", "build_encoder", "load_dinov2"]


@runtime_checkable
class PatchEncoder(Protocol):
    def __call__(self, images: jax.Array) -> jax.Array:
        """Raw images ``(B, H, W, 3)`` in [0, 1] -> patch tokens ``(B, N, D)``."""
        ...


class TinyEncoder(nnx.Module):
    """A random linear map of non-overlapping ``patch_size`` patches: fast, deterministic, frozen."""

    def __init__(self, patch_size: int = 8, dim: int = 16, *, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.proj = nnx.Linear(patch_size * patch_size * 3, dim, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        p = self.patch_size
        if h % p or w % p or c != 3:
            raise ValueError(f"TinyEncoder expects (B, H, W, 3) with H, W divisible by {p}, got {images.shape}")
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)  # (B, N, p*p*3)
        return jax.lax.stop_gradient(jnp.tanh(self.proj(x)))


def build_encoder(spec: str, *, dim: int, base_patch_size: int, dtype: str = "float32") -> nnx.Module:
    """The frozen REPA encoder a run names: ``"tiny"`` (:class:`TinyEncoder`, one token per model
    patch) or the path of DINOv2 weights (:class:`DINOv2Encoder`, matmuls in ``dtype``; the reference
    runs its encoder in bfloat16).  Its token width must be ``dim`` (the REPA projector's output)."""
    if spec == "tiny":
        return TinyEncoder(patch_size=base_patch_size, dim=dim, rngs=nnx.Rngs(0))
    encoder = DINOv2Encoder(load_dinov2(spec, dtype=dtype), base_patch_size=base_patch_size)
    if encoder.model.config.dim != dim:
        raise ValueError(f"REPA encoder_dim is {dim} but the DINOv2 weights in {spec} give {encoder.model.config.dim}-wide tokens")
    return encoder

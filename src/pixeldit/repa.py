"""REPA representation alignment (Yu et al. 2024) as PixelDiT's reference recipes define it.

c2i (``c2i/src/diffusion.py`` ``REPATrainer``, ``configs/pix256_xl.yaml``): the output of patch
block ``align_layer`` (8) goes through a projector MLP Linear-SiLU-Linear-SiLU-Linear (hidden =
the model width, out = the encoder width, 768 for DINOv2 ViT-B/14); the loss is the mean of
``1 - cos`` against the frozen encoder's patch tokens, weight 0.5, added to the flow loss at the
same t.  When the token counts differ the projected tokens are resized to the encoder's grid:
adaptive average pooling when the encoder has fewer tokens, bilinear otherwise.

t2i (``t2i/diffusion/model/trainer.py`` ``PixDiTTrainer``): projector hidden 2048, out 768, loss
``-mean(cos)`` with the finer of the two grids bilinearly resized to the coarser one, weight 0.1
(``repa_loss_weight``) after patch block ``repa_encoder_index`` (14).

The projector trains with the model (the reference adds it to the same AdamW as a second
parameter group with the same settings) and is not part of the EMA; the encoder is frozen.
The projector's reference keys are ``diffusion_trainer.proj.0.{0,2,4}.*`` (c2i Lightning
checkpoints) and ``_repa_projector.{0,2,4}.*`` (t2i); :func:`projector_from_reference` and
:func:`projector_to_reference` map them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit.modules import linear
from pixeldit.resample import adaptive_avg_pool, resize
from pixeldit.torchfile import assign, take

COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default eps
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default eps
REFERENCE_PREFIX = {"c2i": "diffusion_trainer.proj.0.", "t2i": "_repa_projector."}
LINEAR_INDICES = (0, 2, 4)  # positions of the Linear layers in the reference nn.Sequential


@dataclasses.dataclass(frozen=True)
class REPAConfig:
    style: Literal["c2i", "t2i"] = "c2i"  # which reference loss (see the module docstring)
    align_layer: int = 8  # patch block whose output is aligned (1-based: c2i align_layer)
    loss_weight: float = 0.5  # c2i feat_loss_weight
    hidden_dim: int | None = None  # projector width; None: the model's hidden size (c2i yaml)
    encoder_dim: int = 768  # DINOv2 ViT-B/14 token width
    # the frozen encoder a run builds (pixeldit.runs): "tiny" (tests) or a DINOv2 weights file;
    # None: the caller of pixeldit.train passes the encoder module itself
    encoder: str | None = None

    def __post_init__(self):
        if self.style not in REFERENCE_PREFIX:
            raise ValueError(f"REPA style must be 'c2i' or 't2i', got {self.style!r}")
        if self.align_layer < 1:
            raise ValueError(f"REPA align_layer counts patch blocks from 1, got {self.align_layer}")
        if self.loss_weight < 0:
            raise ValueError(f"REPA loss_weight must be >= 0, got {self.loss_weight}")

    @classmethod
    def t2i(cls) -> REPAConfig:
        """The t2i trainer's values (config.py defaults: weight 0.1, block 14; projector 2048 wide)."""
        return cls(style="t2i", align_layer=14, loss_weight=0.1, hidden_dim=2048)


class REPAProjector(nnx.Module):
    """Linear-SiLU-Linear-SiLU-Linear from the model width to the encoder width.

    ``proj.layers[0 / 2 / 4]`` are the reference's ``proj.0.0 / .2 / .4`` (c2i) or
    ``_repa_projector.0 / .2 / .4`` (t2i); torch's default Linear init, float32 parameters.
    """

    def __init__(self, model_dim: int, hidden_dim: int, encoder_dim: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Sequential(
            linear(model_dim, hidden_dim, rngs=rngs, bias_init=_torch_bias_init(model_dim)),
            jax.nn.silu,
            linear(hidden_dim, hidden_dim, rngs=rngs, bias_init=_torch_bias_init(hidden_dim)),
            jax.nn.silu,
            linear(hidden_dim, encoder_dim, rngs=rngs, bias_init=_torch_bias_init(hidden_dim)),
        )

    @classmethod
    def for_model(cls, config: REPAConfig, model_dim: int, *, rngs: nnx.Rngs) -> REPAProjector:
        return cls(model_dim, config.hidden_dim or model_dim, config.encoder_dim, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.proj(tokens)


def _torch_bias_init(fan_in: int):
    """torch.nn.Linear's bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def _grid_side(tokens: jax.Array, what: str) -> int:
    n = tokens.shape[1]
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"REPA needs a square token grid; {what} has {n} tokens")
    return side


def _resize_tokens(tokens: jax.Array, side: int, method: str) -> jax.Array:
    """``(B, s*s, C)`` -> ``(B, side*side, C)`` through the 2D grid."""
    b, n, c = tokens.shape
    s = _grid_side(tokens, "the token sequence")
    grid = tokens.reshape(b, s, s, c)
    grid = adaptive_avg_pool(grid, (side, side)) if method == "area" else resize(grid, (side, side), method)
    return grid.reshape(b, side * side, c)


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    """``x / max(|x|, eps)`` along the last axis, as torch's cosine_similarity / normalize divide."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def c2i_alignment_loss(projected: jax.Array, target: jax.Array) -> jax.Array:
    """Mean ``1 - cos`` of projected tokens ``(B, Ls, C)`` vs encoder tokens ``(B, Ld, C)`` (c2i)."""
    if projected.shape[1] != target.shape[1]:
        ld, ls = target.shape[1], projected.shape[1]
        projected = _resize_tokens(projected, _grid_side(target, "the encoder output"), "area" if ld < ls else "bilinear")
    cos = jnp.sum(_normalize(projected, COS_EPS) * _normalize(target, COS_EPS), axis=-1)
    return jnp.mean(1.0 - cos)


def t2i_alignment_loss(projected: jax.Array, target: jax.Array) -> jax.Array:
    """``-mean(cos)``, the finer grid bilinearly resized to the coarser before normalising (t2i)."""
    projected = _normalize(projected, NORMALIZE_EPS)
    tu, td = projected.shape[1], target.shape[1]
    if td > tu:
        target = _resize_tokens(target, _grid_side(projected, "the projected block output"), "bilinear")
    elif td < tu:
        projected = _normalize(_resize_tokens(projected, _grid_side(target, "the encoder output"), "bilinear"), NORMALIZE_EPS)
    return -jnp.mean(jnp.sum(projected * _normalize(target, NORMALIZE_EPS), axis=-1))


def repa_loss(config: REPAConfig, projector: REPAProjector, block_tokens: jax.Array, target: jax.Array) -> jax.Array:
    """The unweighted alignment loss of block ``config.align_layer``'s tokens against ``target``.

    ``target`` comes from a frozen encoder (no gradient flows into it); multiply by
    ``config.loss_weight`` and add to the flow loss of the same forward pass.
    """
    projected = projector(block_tokens).astype(jnp.float32)
    target = jax.lax.stop_gradient(target).astype(jnp.float32)
    loss = c2i_alignment_loss if config.style == "c2i" else t2i_alignment_loss
    return loss(projected, target)


# ---------------------------------------------------------------------------------------------
# Reference checkpoint keys
# ---------------------------------------------------------------------------------------------


def split_projector_keys(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict, str | None]:
    """``(projector weights, the rest, style)``: the REPA projector pulled out of a reference state dict.

    Projector keys are returned without their prefix (``0.weight`` ... ``4.bias``); style is
    ``"c2i"`` / ``"t2i"`` by the prefix found, ``None`` when the checkpoint has no projector.
    """
    found = {s: p for s, p in REFERENCE_PREFIX.items() if any(k.startswith(p) for k in state_dict)}
    if len(found) > 1:
        raise ValueError("checkpoint holds both c2i and t2i REPA projector keys")
    if not found:
        return {}, dict(state_dict), None
    ((style, prefix),) = found.items()
    proj = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    return proj, rest, style


def load_projector(projector: REPAProjector, weights: Mapping[str, np.ndarray]) -> None:
    """Fill ``projector`` from prefix-less reference weights (``0.weight`` ... ``4.bias``); strict."""
    sd = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    for i in LINEAR_INDICES:
        layer = projector.proj.layers[i]
        n_in, n_out = layer.kernel.shape
        assign(layer.kernel, take(sd, f"{i}.weight", (n_out, n_in)).T)  # torch (out, in)
        assign(layer.bias, take(sd, f"{i}.bias", (n_out,)))
    if sd:
        raise ValueError(f"unexpected REPA projector weights: {', '.join(sorted(sd))}")


def projector_from_reference(state_dict: Mapping[str, np.ndarray], *, seed: int = 0) -> tuple[REPAProjector, str]:
    """``(projector, style)`` built from a reference state dict's projector keys (sizes from the shapes)."""
    weights, _, style = split_projector_keys(state_dict)
    if style is None:
        raise ValueError("no REPA projector keys (diffusion_trainer.proj.* or _repa_projector.*) in the state dict")
    if "0.weight" not in weights or "4.weight" not in weights:
        raise ValueError(f"incomplete REPA projector weights: {', '.join(sorted(weights))}")
    (hidden, model_dim), (encoder_dim, _) = weights["0.weight"].shape, weights["4.weight"].shape
    projector = REPAProjector(model_dim, hidden, encoder_dim, rngs=nnx.Rngs(seed))
    load_projector(projector, weights)
    return projector, style


def projector_to_reference(projector: REPAProjector, style: str = "c2i") -> dict[str, np.ndarray]:
    """The projector's weights under the reference's keys (torch layouts, float32)."""
    if style not in REFERENCE_PREFIX:
        raise ValueError(f"REPA style must be 'c2i' or 't2i', got {style!r}")
    out = {}
    for i in LINEAR_INDICES:
        layer = projector.proj.layers[i]
        out[f"{REFERENCE_PREFIX[style]}{i}.weight"] = np.asarray(layer.kernel[...], dtype=np.float32).T
        out[f"{REFERENCE_PREFIX[style]}{i}.bias"] = np.asarray(layer.bias[...], dtype=np.float32)
    return out

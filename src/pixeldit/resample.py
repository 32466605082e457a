"""Image resampling that reproduces ``torch.nn.functional`` exactly, for REPA and FID preprocessing.

``jax.image.resize`` uses other kernels at the borders and antialiases when shrinking, so its
results differ from ``F.interpolate(..., align_corners=False, antialias=False)`` by up to a few
percent.  The reference's DINOv2 preprocessing (bicubic), REPA token resizing (bilinear, adaptive
average pooling) and pytorch-fid's input resize (bilinear) are torch's, so each resize here is
built as torch computes it: a separable linear map per spatial axis, a small ``(out, in)``
matrix built once in numpy (float64) and applied with an einsum.

Arrays are channels-last: ``(..., H, W, C)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # torch's bicubic convolution coefficient (upsample_bicubic2d; Keys' a = -0.75)
METHODS = ("bilinear", "bicubic", "area")


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """The four tap weights of torch's cubic convolution at fractional offsets ``t``: ``(n, 4)``."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def resize_matrix(in_size: int, out_size: int, method: str, scale: float | None = None) -> np.ndarray:
    """The ``(out_size, in_size)`` matrix of torch's 1D resize along one axis (float64).

    ``scale`` is the ``scale_factor`` handed to ``F.interpolate`` (output / input); torch then maps
    output pixel ``i`` to input coordinate ``(i + 0.5) / scale - 0.5`` instead of using the size
    ratio.  ``"area"`` is ``adaptive_avg_pool``: output ``i`` averages inputs
    ``floor(i * in / out)`` to ``ceil((i + 1) * in / out)``.
    """
    if method not in METHODS:
        raise ValueError(f"resize method must be one of {METHODS}, got {method!r}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    if method == "area":
        for i in rows:
            start, end = (i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)
            m[i, start:end] = 1.0 / (end - start)
        return m
    # torch computes the ratio in float32 (area_pixel_compute_scale); so do we, for exact parity
    ratio = np.float32(1.0 / scale) if scale is not None else np.float32(in_size / out_size)
    src = (rows + 0.5) * np.float64(ratio) - 0.5
    if method == "bilinear":
        src = np.maximum(src, 0.0)  # torch clamps negative source coordinates for linear modes only
        i0 = np.floor(src).astype(np.int64)
        lam = src - i0
        i1 = np.minimum(i0 + 1, in_size - 1)
        np.add.at(m, (rows, i0), 1.0 - lam)
        np.add.at(m, (rows, i1), lam)
        return m
    i0 = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - i0)
    for k in range(4):  # taps i0-1 .. i0+2, indices clamped to the border (torch's access_with_bound)
        np.add.at(m, (rows, np.clip(i0 - 1 + k, 0, in_size - 1)), w[:, k])
    return m


def resize(
    x: jax.Array,
    size: tuple[int, int],
    method: str = "bilinear",
    *,
    scale: tuple[float, float] | None = None,
) -> jax.Array:
    """Resize ``(..., H, W, C)`` to ``(..., *size, C)`` as ``F.interpolate(align_corners=False)`` does.

    ``method`` is ``"bilinear"``, ``"bicubic"`` or ``"area"`` (adaptive average pooling).
    ``scale``: the ``scale_factor`` torch was given, when the caller passed one (DINOv2's position
    table resize does); ``size`` must then be ``floor(in * scale)``, as torch makes it.
    """
    if x.ndim < 3:
        raise ValueError(f"resize expects (..., H, W, C), got shape {x.shape}")
    (h, w), (oh, ow) = x.shape[-3:-1], size
    sh, sw = (None, None) if scale is None else scale
    mh = jnp.asarray(resize_matrix(h, oh, method, sh), dtype=jnp.float32)
    mw = jnp.asarray(resize_matrix(w, ow, method, sw), dtype=jnp.float32)
    # a weighted sum with float32 accumulation, as torch's CPU kernels accumulate
    y = jnp.einsum("...hwc,oh->...owc", x.astype(jnp.float32), mh, precision="highest")
    y = jnp.einsum("...hwc,ow->...hoc", y, mw, precision="highest")
    return y.astype(x.dtype)


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.adaptive_avg_pool2d`` on ``(..., H, W, C)``."""
    return resize(x, size, "area")


def scaled_size(in_size: int, scale: float) -> int:
    """The output length torch gives ``F.interpolate(scale_factor=scale)``: ``floor(in * scale)``."""
    return int(math.floor(in_size * scale))

"""scikit-learn's bundled 8x8 handwritten digits, upsampled and scaled to [-1, 1].

The 1797 images (values 0..16) ship with scikit-learn, so nothing is downloaded.
They are resized to ``resolution x resolution`` (default 16) with bilinear
(half-pixel-centre) or nearest interpolation and mapped linearly
``0 -> -1, 16 -> +1``.  Bilinear weights are convex, so values stay in [-1, 1].
"""

from __future__ import annotations

import numpy as np

from .base import ArrayDataset, check_patch_size

DIGITS_NATIVE = 8
UPSAMPLE_MODES = ("bilinear", "nearest")


def resize_matrix(n_in: int, n_out: int, mode: str = "bilinear") -> np.ndarray:
    """Return the ``(n_out, n_in)`` float64 1-D interpolation matrix.

    ``bilinear`` uses half-pixel centres (``align_corners=False``) with edge
    clamping; ``nearest`` picks ``floor((i + 0.5) * n_in / n_out)``.  Each row
    sums to 1 with non-negative weights.
    """
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")
    m = np.zeros((n_out, n_in), dtype=np.float64)
    centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    if mode == "nearest":
        src = np.clip(np.floor(centres + 0.5), 0, n_in - 1).astype(int)
        m[np.arange(n_out), src] = 1.0
        return m
    c = np.clip(centres, 0, n_in - 1)
    lo = np.floor(c).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = c - lo
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def resize_images(images: np.ndarray, size: int, mode: str = "bilinear") -> np.ndarray:
    """Resize square single-channel images ``(N, h, w)`` to ``(N, size, size)`` (float64)."""
    images = np.asarray(images, dtype=np.float64)
    mh = resize_matrix(images.shape[1], size, mode)
    mw = resize_matrix(images.shape[2], size, mode)
    return np.einsum("ij,njk,lk->nil", mh, images, mw)


def load_digits_arrays(resolution: int = 16, upsample: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """Return all real digits as ``(x, y)``.

    ``x``: float32 ``(1797, resolution, resolution, 1)`` in [-1, 1];
    ``y``: int32 ``(1797,)`` labels 0..9, in scikit-learn's order.
    """
    from sklearn.datasets import load_digits

    resolution = int(resolution)
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    bunch = load_digits()
    imgs = bunch.images.astype(np.float64)  # (N, 8, 8), values 0..16
    if resolution != DIGITS_NATIVE:
        imgs = resize_images(imgs, resolution, upsample)
    x = np.clip(imgs / 8.0 - 1.0, -1.0, 1.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int32)
    return x, y


class DigitsDataset(ArrayDataset):
    """Class-conditional digits dataset (``name="digits"``, 10 classes, 1 channel).

    Args:
        resolution: output side length (default 16; 8, 32, ... also work).
        upsample: ``"bilinear"`` (default) or ``"nearest"``.
        seed: base seed of the epoch permutations used by ``get_batch``.
        patch_size: if given, ``resolution`` must be a multiple of it (else ``DataError``).

    ``get_batch(step, B)`` -> ``{"x": float32 (B, R, R, 1) in [-1, 1], "y": int32 (B,)}``;
    ``arrays()`` -> all 1797 ``(x, y)``.
    """

    def __init__(
        self,
        resolution: int = 16,
        *,
        upsample: str = "bilinear",
        seed: int = 0,
        patch_size: int | None = None,
    ) -> None:
        check_patch_size((resolution, resolution), patch_size, f"digits (resolution={resolution})")
        x, y = load_digits_arrays(resolution, upsample)
        super().__init__(
            x,
            y,
            name="digits",
            condition="class",
            num_classes=10,
            class_names=[str(i) for i in range(10)],
            seed=seed,
        )
        self.resolution = int(resolution)
        self.upsample = upsample

"""Frechet Inception Distance: features, Gaussian statistics (cached), and the distance itself.

The distance follows pytorch-fid's ``calculate_frechet_distance`` (Heusel et al. 2017): ``|mu1 -
mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2))`` with scipy's ``sqrtm``, a small diagonal offset
when the product is singular, and the imaginary round-off dropped.  Statistics files hold ``mu``
and ``sigma`` as pytorch-fid's and the ADM evaluator's reference batches do, so published
reference statistics can be used as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import linalg

SQRTM_OFFSET = 1e-6  # pytorch-fid's eps: added to both diagonals when sqrtm(S1 S2) is not finite
IMAG_TOLERANCE = 1e-3  # pytorch-fid's bound on the imaginary part sqrtm may leave on the diagonal


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of ``(N, D)`` features in float64 (``np.cov`` with N - 1, as pytorch-fid)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID statistics need features (N >= 2, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Frechet distance between two Gaussians (pytorch-fid's computation)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"FID statistics differ in size: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * SQRTM_OFFSET
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_TOLERANCE):
            raise ValueError(f"sqrtm left an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_of_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two sets of Inception features ``(N, 2048)``."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def extract_features(
    model: Callable[[jax.Array], jax.Array], batches: Iterable[np.ndarray], *, batch_size: int
) -> np.ndarray:
    """``(N, D)`` features of image batches ``(b, H, W, 3)`` in [0, 1] (``b <= batch_size``).

    One compiled program: a short last batch is padded to ``batch_size`` and trimmed after.
    """
    if isinstance(model, nnx.Module):  # weights as arguments, not constants baked into the program
        graphdef, state = nnx.split(model)
        compiled = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))

        def run(x):
            return compiled(state, x)
    else:
        run = jax.jit(model)
    out = []
    for batch in batches:
        batch = np.asarray(batch, dtype=np.float32)
        n = batch.shape[0]
        if n > batch_size:
            raise ValueError(f"image batch of {n} is larger than batch_size {batch_size}")
        padded = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), np.float32)]) if n < batch_size else batch
        out.append(np.asarray(run(jnp.asarray(padded)))[:n])
    if not out:
        raise ValueError("no images to compute FID features of")
    return np.concatenate(out).astype(np.float64)


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, fingerprint: Mapping | None = None) -> Path:
    """Write ``mu`` / ``sigma`` (and what they were computed from) to an ``.npz``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, fingerprint=json.dumps(dict(fingerprint or {}), sort_keys=True))
    os.replace(tmp, path)
    return path


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of a statistics file (ours, pytorch-fid's or an ADM reference batch)."""
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path}: expected an .npz with 'mu' and 'sigma', found {sorted(data.files)}")
        return data["mu"], data["sigma"]


def cached_statistics(
    cache: str | os.PathLike, fingerprint: Mapping, compute: Callable[[], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Statistics from ``cache`` when it was made from ``fingerprint``; else ``compute()`` features once and cache.

    ``fingerprint`` names what the statistics depend on (data path, image count, resolution,
    weights file ...); a cache made from anything else is an error, never silently reused.
    """
    cache = Path(cache)
    wanted = json.dumps(dict(fingerprint), sort_keys=True)
    if cache.is_file():
        with np.load(cache) as data:
            stored = str(data["fingerprint"]) if "fingerprint" in data else None
            if stored != wanted:
                raise ValueError(f"FID statistics cache {cache} was made from {stored}, not {wanted}; remove it or pick another path")
            return data["mu"], data["sigma"]
    mu, sigma = feature_statistics(compute())
    save_statistics(cache, mu, sigma, fingerprint)
    return mu, sigma

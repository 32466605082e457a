"""Deterministic random state dicts, rebuilt from ``(names, shapes, seed)`` without storing weights.

A ViT-B/14 or an Inception-v3 holds 24-86 M parameters: far too many for a golden file.  The
golden generator (``scripts/golden/make_paper_golden.py``) fills the torch model with
:func:`seeded_state_dict` and stores only the key list, shapes, seed, inputs and outputs; the
parity tests rebuild the same weights here.  numpy's ``default_rng`` streams are stable across
platforms and releases, so both sides draw identical numbers.

Scales keep activations O(1) through deep random stacks (a parity check on vanishing or
exploding values would check nothing): He-scaled conv kernels, ``1/sqrt(fan_in)`` linear
kernels, norm scales and layer-scale gammas near 1, batch-norm variances in [0.5, 1.5].
"""

from __future__ import annotations

import zlib

import numpy as np


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        return rng.uniform(0.5, 1.5, shape)
    if leaf == "running_mean":
        return 0.1 * rng.standard_normal(shape)
    if leaf in ("bias", "beta"):
        return 0.05 * rng.standard_normal(shape)
    if len(shape) == 1:  # norm weights, layer-scale gammas
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if name.endswith("weight") and len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        gain = 2.0 if len(shape) == 4 else 1.0  # convs feed ReLUs (He); linears feed norms / GELUs
        return np.sqrt(gain / fan_in) * rng.standard_normal(shape)
    return 0.5 * rng.standard_normal(shape)  # tokens and position tables


def seeded_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """float32 arrays for every ``name -> shape``; each drawn from its own stream (name, seed)."""
    out = {}
    for name, shape in shapes.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        out[name] = _draw(name, tuple(int(s) for s in shape), rng).astype(np.float32)
    return out


def seeded_array(shape: tuple[int, ...], seed: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """A float32 uniform array (test images in [0, 1]) from ``seed``."""
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)

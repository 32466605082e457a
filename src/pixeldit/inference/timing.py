"""Wall-clock measurements of the inference library (for ``pixeldit bench`` and the docs).

Numbers only mean something with the machine and its load named next to them.  Each
function compiles first (one untimed call on the same shapes), then times ``repeats`` calls
and reports the best (``repeats = 0``: the first call alone), the usual way to measure a
shared machine.  The cost of a log-likelihood is (solver steps) x (6 Tsit5 stages) x (one
velocity + divergence evaluation), and the step count depends on the trained velocity, so time
a trained model when comparing.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from ..data import grf
from ..model import PixelDiTTheta
from ..model_config import ThetaConfig
from .likelihood import Emulator, log_prob
from .posterior import emulator_log_likelihood, grid_posterior

__all__ = ["GRF_PRESET", "grf_emulator", "time_grid_posterior", "time_log_prob"]

# The built-in `grf` run's model sizes (src/pixeldit/configs/grf.toml).
GRF_PRESET = dict(hidden_size=64, num_groups=2, patch_depth=4, pixel_depth=1, pixel_hidden_size=16, patch_size=4,
                  theta_dim=2, theta_channels=2, theta_adaln=True, token_init_std=1.0)


def grf_emulator(seed: int = 0) -> Emulator:
    """A freshly initialised ``grf``-preset theta model with the run's affine encoding (untrained)."""
    model = PixelDiTTheta(ThetaConfig(**GRF_PRESET), rngs=nnx.Rngs(seed))
    lo, hi = np.array(grf.PRIOR_LOW), np.array(grf.PRIOR_HIGH)
    enc = {"kind": "affine", "center": ((lo + hi) / 2).tolist(), "scale": ((hi - lo) / 2).tolist()}
    return Emulator(model, theta_encoding=enc, mean_mode="zero_mean")


def _best_of(fn, repeats: int) -> tuple[float, float, float, object]:
    """``(first call s, best wall s, CPU s of the best call, last output)``."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    best, cpu = first, np.nan  # no repeats: the first call, compilation included
    if repeats >= 1:
        best = np.inf
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn()
        if time.perf_counter() - start < best:
            best, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return first, best, cpu, out


def time_log_prob(emulator: Emulator, size: int, *, divergence: str = "hutchinson", probes: int = 4,
                  fields: int = 4, thetas: int = 1, repeats: int = 2, seed: int = 0, **options) -> dict:
    """Fields (x theta pairs) per second of :func:`log_prob` on ``fields`` GRFs of side ``size``.

    Returns ``pairs_per_s``, ``seconds`` (best call) and its ``cpu_seconds`` (all threads; on a
    shared machine the CPU time says more than the wall time), ``first_call_s`` (with
    compilation) and the mean solver steps per pair.
    """
    rng = np.random.default_rng(seed)
    theta_true = grf.sample_prior(rng, fields)
    x = grf.simulate(theta_true, rng, size)
    theta = grf.sample_prior(rng, thetas).astype(np.float32)
    kw = dict(divergence=divergence, **options)
    if divergence == "hutchinson":
        kw.update(probes=probes, key=jax.random.key(seed))
    first, best, cpu, res = _best_of(lambda: log_prob(emulator, x, theta, **kw), repeats)
    return {"size": size, "divergence": divergence, "probes": probes if divergence == "hutchinson" else None,
            "pairs": fields * thetas, "seconds": best, "cpu_seconds": cpu, "first_call_s": first,
            "pairs_per_s": fields * thetas / best, "mean_steps": float(np.mean(res.num_steps))}


def time_grid_posterior(emulator: Emulator, size: int = 32, *, seed: int = 0, probes: int = 4,
                        divergence: str = "hutchinson", **grid_options) -> dict:
    """Wall and CPU seconds for one observation's grid posterior through the emulator.

    The first call in a process includes compiling the solve (one shape: ``chunk`` thetas).
    """
    rng = np.random.default_rng(seed)
    x = grf.simulate(grf.sample_prior(rng, 1)[0], rng, size)
    kw = dict(divergence=divergence)
    if divergence == "hutchinson":
        kw.update(probes=probes, key=jax.random.key(seed))
    ll = emulator_log_likelihood(emulator, x, **kw)
    start, cpu_start = time.perf_counter(), time.process_time()
    post = grid_posterior(ll, grf.PRIOR_LOW, grf.PRIOR_HIGH, **grid_options)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"size": size, "seconds": seconds, "cpu_seconds": cpu, "evaluations": post.num_evaluations,
            "mean": post.mean.tolist(),
            "std": post.std.tolist()}

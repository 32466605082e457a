"""Posterior of theta from a likelihood and a uniform prior box: a zooming grid or MCMC.

The likelihood is any callable ``log_likelihood(theta) -> log p(x_obs | theta)`` on a batch of
thetas ``(M, K)`` -> ``(M,)`` for one observation: the learned one of an emulator
(:func:`emulator_log_likelihood`, the neural-likelihood route) or an exact one (for the
built-in GRF, ``pixeldit.data.grf.grf_log_likelihood``), so both routes share this code.

``grid_posterior`` (1-3 parameters): the GRF posterior is far narrower than its prior, so a
fixed grid over the prior would put all the mass in one cell.  A coarse grid over the prior
finds the region that holds the mass and zooms in on it; a fine grid laid along the
posterior's principal axes then gives the mass per cell (midpoint rule), its moments,
marginal intervals, samples and the log-evidence (see the function).

``mcmc_posterior`` (more parameters): random-walk Metropolis chains (blackjax) with a
Gaussian proposal adapted from the chains during warm-up (scale ``2.38^2 / K`` times their
covariance).  Why not NUTS: every log-likelihood is an ODE solve, its gradient through the
solver costs several solves more, and NUTS spends many gradient steps per draw; random-walk
chains need one batched solve per step for all chains together and no gradient.  With the
Hutchinson divergence keep the probe key fixed (common random numbers): the chain then sees
one deterministic, smooth log-likelihood.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from .likelihood import Emulator, log_prob

INTERVALS = (0.68, 0.95)

__all__ = ["INTERVALS", "Posterior", "emulator_log_likelihood", "grid_posterior", "mcmc_posterior", "prior_box"]


@dataclasses.dataclass(frozen=True)
class Posterior:
    """Posterior summary of one observation.

    ``samples`` ``(S, K)``; ``mean``, ``std`` ``(K,)``; ``intervals`` maps a level in
    :data:`INTERVALS` to ``(K, 2)`` central marginal intervals; ``log_evidence``
    (``log int p(x | theta) p(theta) dtheta``; ``None`` from MCMC); ``num_evaluations``
    likelihood evaluations used.  ``extra`` holds method details (the grid, acceptance rate).
    """

    samples: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    intervals: dict
    log_evidence: float | None
    num_evaluations: int
    extra: dict = dataclasses.field(default_factory=dict)

    def summary(self, names=None) -> dict:
        """JSON-ready per-parameter mean, std and intervals."""
        names = names or [f"theta{i}" for i in range(len(self.mean))]
        out = {}
        for i, name in enumerate(names):
            out[name] = {"mean": float(self.mean[i]), "std": float(self.std[i])}
            for level, iv in self.intervals.items():
                out[name][f"interval{round(level * 100)}"] = [float(iv[i, 0]), float(iv[i, 1])]
        if self.log_evidence is not None:
            out["log_evidence"] = float(self.log_evidence)
        return out


def prior_box(low, high) -> tuple[np.ndarray, np.ndarray]:
    """Check and return a uniform prior box as float64 ``(K,)`` arrays."""
    low = np.asarray(low, np.float64).reshape(-1)
    high = np.asarray(high, np.float64).reshape(-1)
    if low.shape != high.shape or low.size < 1 or not np.all(np.isfinite(low) & np.isfinite(high)) \
            or np.any(high <= low):
        raise ValueError(f"prior box must be finite low < high of equal length, got low={low}, high={high}")
    return low, high


def emulator_log_likelihood(emulator: Emulator, x, *, chunk: int = 64, **options) -> Callable[[np.ndarray], np.ndarray]:
    """The learned ``log p(x | theta)`` of one field ``x`` ``(H, W, C)`` as a batch callable.

    Thetas are solved ``chunk`` at a time, the last chunk padded by repeating its last row, so
    that one compiled solve serves every call whatever the number of thetas (each theta has its
    own step control, so the padding changes no value).  ``options`` go to
    :func:`pixeldit.inference.log_prob`; with ``divergence="hutchinson"`` the same ``key`` serves
    every call, so every theta sees the same probes.
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 3:
        raise ValueError(f"x must be one field (H, W, C), got shape {x.shape}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    def log_likelihood(theta):
        theta = np.asarray(theta, np.float32)
        out = []
        for start in range(0, len(theta), chunk):
            part = theta[start:start + chunk]
            padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])
            out.append(log_prob(emulator, x[None], padded, **options).value[0, :len(part)])
        return np.concatenate(out)

    return log_likelihood


# --------------------------------------------------------------------------------------------
# Zooming grid
# --------------------------------------------------------------------------------------------


def _box_grid(lo, hi, n):
    """Centres ``(n^K, K)`` of ``n`` equal cells per dimension of the box [lo, hi], and the cell volume."""
    axes = [lo[i] + (np.arange(n) + 0.5) * (hi[i] - lo[i]) / n for i in range(len(lo))]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(lo)), float(np.prod((hi - lo) / n))


def _frame_grid(mean, frame, span, n):
    """Centres of an ``n^K`` grid over ``mean + frame @ u``, ``u`` in [-span, span]^K, and the cell volume."""
    k = len(mean)
    u = -span + (np.arange(n) + 0.5) * 2 * span / n
    units = np.stack(np.meshgrid(*([u] * k), indexing="ij"), axis=-1).reshape(-1, k)
    return mean + units @ frame.T, float(abs(np.linalg.det(frame)) * (2 * span / n) ** k)


def _evaluate(log_likelihood, theta, low, high):
    """Log-likelihood at ``theta`` ``(M, K)``; ``-inf`` outside the prior box (not evaluated there) or where NaN."""
    inside = np.all((theta >= low) & (theta <= high), axis=1)
    ll = np.full(len(theta), -np.inf)
    if inside.any():
        got = np.asarray(log_likelihood(theta[inside]), np.float64).reshape(-1)
        if got.shape != (int(inside.sum()),):
            raise ValueError(f"log_likelihood returned {got.size} values for {int(inside.sum())} thetas")
        ll[inside] = np.where(np.isnan(got), -np.inf, got)
    return ll, int(inside.sum())


def _check_finite(ll):
    if not np.any(np.isfinite(ll)):
        raise ValueError("the log-likelihood is not finite anywhere on the grid")


def _moments(theta, ll):
    w = np.exp(ll - logsumexp(ll))
    mean = w @ theta
    d = theta - mean
    return mean, (w[:, None] * d).T @ d


def _principal_frame(cov):
    """Principal axes of ``cov`` scaled by their standard deviations (``frame @ frame.T == cov``)."""
    vals, vecs = np.linalg.eigh(cov)
    return vecs * np.sqrt(np.maximum(vals, 1e-12 * np.max(vals)))


def _search_box(log_likelihood, low, high, coarse, threshold, max_zoom):
    """Axis-aligned zoom to the box around the cells within ``threshold`` of the best (one cell of margin).

    Returns the last grid evaluated (``theta``, ``ll``), its box ``lo``, ``hi`` and the evaluation count.
    """
    lo, hi = low.copy(), high.copy()
    evaluations = 0
    for _ in range(max_zoom):
        theta, _ = _box_grid(lo, hi, coarse)
        ll, used = _evaluate(log_likelihood, theta, low, high)
        evaluations += used
        _check_finite(ll)
        keep = theta[ll > np.max(ll) - threshold]
        step = (hi - lo) / coarse
        new_lo, new_hi = np.maximum(low, keep.min(axis=0) - step), np.minimum(high, keep.max(axis=0) + step)
        if np.all((new_hi - new_lo) > 0.8 * (hi - lo)):
            break
        lo, hi = new_lo, new_hi
    return theta, ll, lo, hi, evaluations


def grid_posterior(
    log_likelihood: Callable[[np.ndarray], np.ndarray],
    low,
    high,
    *,
    coarse: int = 8,
    fine: int = 16,
    threshold: float = 15.0,
    max_zoom: int = 8,
    num_samples: int = 1000,
    seed: int = 0,
) -> Posterior:
    """Grid posterior for 1-3 parameters under the uniform prior ``[low, high]``.

    1. An axis-aligned ``coarse^K`` grid over the prior, rebuilt on the region within
       ``threshold`` nats of its best cell (one cell of margin) until the region stops shrinking.
    2. The posterior's mean and covariance on that grid set an affine frame (its principal
       axes: GRF posteriors are thin, tilted ridges that an axis-aligned grid resolves badly);
       ``coarse^K`` grids over ``mean + L u``, ``|u_i| <= sqrt(2 threshold)`` (the threshold's
       contour for a Gaussian), refine the frame until their own moments agree with it (30 % in
       std, 0.5 std in mean); a ``fine^K`` grid in that frame gives the result, widened while
       more than 1e-3 of its mass lies in its outer ring of cells.
    Points outside the prior are not evaluated (density zero).  Mean, covariance and the
    log-evidence are midpoint sums over the final cells; intervals and samples come from draws
    (a cell by its mass, then uniform inside the cell).

    Args:
      log_likelihood: ``(M, K) -> (M,)`` for one observation.
      low, high: the prior box ``(K,)``.
      coarse, fine: cells per dimension of the search grids and of the final grid.
      threshold: nats below the best cell that still count as holding mass (15: a Gaussian's
        5.5-sigma contour, mass outside ~1e-6).
      max_zoom: the most axis-aligned search grids.
      num_samples, seed: posterior draws returned and their seed.
    """
    low, high = prior_box(low, high)
    k = len(low)
    if not 1 <= k <= 3:
        raise ValueError(f"grid_posterior handles 1-3 parameters, got {k}: use mcmc_posterior")
    if coarse < 3 or fine < 3:
        raise ValueError(f"coarse and fine need >= 3 cells per dimension, got {coarse} and {fine}")
    theta, ll, lo, hi, evaluations = _search_box(log_likelihood, low, high, coarse, threshold, max_zoom)
    mean, cov = _moments(theta, ll)
    frame = _principal_frame(cov + np.diag(((hi - lo) / coarse) ** 2 / 12))  # a one-cell posterior has no spread
    span = math.sqrt(2 * threshold)
    for _ in range(6):  # refine the frame on coarse grids
        theta, _ = _frame_grid(mean, frame, span, coarse)
        ll, used = _evaluate(log_likelihood, theta, low, high)
        evaluations += used
        if not np.any(np.isfinite(ll)):  # every cell centre fell outside the prior: narrow the grid
            span /= 2
            continue
        new_mean, new_cov = _moments(theta, ll)
        inv = np.linalg.inv(frame)
        ratio = np.sqrt(np.maximum(np.linalg.eigvalsh(inv @ new_cov @ inv.T), 0))  # 1 where the frame is right
        moved = np.linalg.norm(inv @ (new_mean - mean))
        mean, frame, span = new_mean, _principal_frame(new_cov), math.sqrt(2 * threshold)
        if np.max(np.abs(ratio - 1)) < 0.3 and moved < 0.5:
            break
    converged = False
    for _ in range(4):  # the fine grid, widened while its outer ring of cells holds mass
        theta, cell_volume = _frame_grid(mean, frame, span, fine)
        ll, used = _evaluate(log_likelihood, theta, low, high)
        evaluations += used
        _check_finite(ll)
        units = (theta - mean) @ np.linalg.inv(frame).T
        w = np.exp(ll - logsumexp(ll))
        if w[np.any(np.abs(units) > span * (1 - 2 / fine), axis=1)].sum() <= 1e-3:
            converged = True
            break
        span *= 1.5
    cells = fine
    post = _grid_summary(theta, ll, cell_volume, frame, span, cells, low, high, num_samples, seed, evaluations)
    post.extra["converged"] = converged  # False: the final grid still had mass at its edge
    return post


def _grid_summary(theta, ll, cell_volume, frame, span, cells, low, high, num_samples, seed, evaluations) -> Posterior:
    k = theta.shape[1]
    log_evidence = float(logsumexp(ll) + math.log(cell_volume) - np.sum(np.log(high - low)))
    # the midpoint rule's moments of a smooth density are accurate far beyond O(h^2) (a Gaussian
    # sampled at spacing h: error ~ exp(-2 pi^2 sigma^2 / h^2)), so no cell-width correction
    mean, cov = _moments(theta, ll)
    w = np.exp(ll - logsumexp(ll))
    rng = np.random.default_rng(seed)
    draws = max(num_samples, 20_000)  # intervals from many draws, a few returned
    idx = rng.choice(len(w), size=draws, p=w / w.sum())
    jitter = (rng.random((draws, k)) - 0.5) * (2 * span / cells)
    samples = np.clip(theta[idx] + jitter @ frame.T, low, high)
    intervals = {level: np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0).T for level in INTERVALS}
    return Posterior(samples=samples[:num_samples], mean=mean, std=np.sqrt(np.diag(cov)), intervals=intervals,
                     log_evidence=log_evidence, num_evaluations=int(evaluations),
                     extra={"method": "grid", "frame": frame.tolist(), "span": span, "cells": cells})


# --------------------------------------------------------------------------------------------
# Random-walk Metropolis (blackjax)
# --------------------------------------------------------------------------------------------


def mcmc_posterior(
    log_likelihood: Callable[[np.ndarray], np.ndarray],
    low,
    high,
    *,
    chains: int = 16,
    warmup: int = 500,
    steps: int = 1000,
    init_draws: int = 256,
    num_samples: int = 1000,
    seed: int = 0,
) -> Posterior:
    """Random-walk Metropolis posterior under the uniform prior ``[low, high]`` (module docstring).

    The chains start at the best of ``init_draws`` prior draws; warm-up adapts the proposal in
    four rounds from the chains' covariance and is discarded; ``steps`` steps per chain follow,
    thinned to ``num_samples`` draws.  One ``log_likelihood`` call per step serves all chains.
    """
    low, high = prior_box(low, high)
    k = len(low)
    if chains < 2 or steps < 1 or warmup < 4 or init_draws < chains:
        raise ValueError(f"need chains >= 2, steps >= 1, warmup >= 4 and init_draws >= chains, got "
                         f"{chains}, {steps}, {warmup}, {init_draws}")
    rng = np.random.default_rng(seed)
    counter = {"n": 0}

    def host_log_post(theta):  # (..., K) float64 -> (...,) log posterior up to a constant
        theta = np.asarray(theta, np.float64)
        flat = theta.reshape(-1, k)
        inside = np.all((flat >= low) & (flat <= high), axis=1)
        out = np.full(len(flat), -np.inf)
        if inside.any():
            counter["n"] += int(inside.sum())
            out[inside] = np.asarray(log_likelihood(flat[inside]), np.float64)
        return np.where(np.isnan(out), -np.inf, out).reshape(theta.shape[:-1]).astype(np.float32)

    def logdensity(theta):
        shape = jax.ShapeDtypeStruct(theta.shape[:-1], jnp.float32)
        return jax.pure_callback(host_log_post, shape, theta, vmap_method="expand_dims")

    @jax.jit
    def step(keys, states, chol):
        kernel = blackjax.normal_random_walk(logdensity, chol)
        return jax.vmap(kernel.step)(keys, states)

    start = low + (high - low) * rng.random((init_draws, k))
    start_ll = host_log_post(start)
    positions = jnp.asarray(start[np.argsort(-start_ll)[:chains]], jnp.float32)
    init = jax.vmap(blackjax.normal_random_walk(logdensity, jnp.eye(k)).init)
    states = init(positions)
    cov = np.diag(((high - low) / 20) ** 2)
    key = jax.random.key(seed)
    rounds = np.array_split(np.arange(warmup), 4)
    trace, accepted = [], []
    for phase, n_steps in [("warmup", len(r)) for r in rounds] + [("sample", steps)]:
        chol = jnp.asarray(np.linalg.cholesky(cov + 1e-12 * np.eye(k)), jnp.float32)
        block = []
        for _ in range(n_steps):
            key, sub = jax.random.split(key)
            states, info = step(jax.random.split(sub, chains), states, chol)
            block.append(np.asarray(states.position, np.float64))
            if phase == "sample":
                accepted.append(np.asarray(info.is_accepted))
        block = np.stack(block)  # (steps, chains, K)
        if phase == "warmup":
            centred = block[len(block) // 2:].reshape(-1, k)
            if len(np.unique(centred, axis=0)) > k:
                cov = np.cov(centred, rowvar=False).reshape(k, k) * 2.38**2 / k
        else:
            trace = block
    draws = trace.reshape(-1, k)
    samples = draws[np.linspace(0, len(draws) - 1, num_samples).astype(int)]
    intervals = {level: np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0).T for level in INTERVALS}
    return Posterior(samples=samples, mean=draws.mean(axis=0), std=draws.std(axis=0), intervals=intervals,
                     log_evidence=None, num_evaluations=counter["n"],
                     extra={"method": "mcmc", "acceptance": float(np.mean(accepted)), "chains": chains})

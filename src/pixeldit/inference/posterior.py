"""Posterior of theta from a likelihood and a uniform prior box: a zooming grid or MCMC.

The likelihood is any callable ``log_likelihood(theta) -> log p(x_obs | theta)`` on a batch of
thetas ``(M, K)`` -> ``(M,)`` for one observation: the learned one of an emulator
(:func:`emulator_log_likelihood`, the neural-likelihood route) or an exact one (for the
built-in GRF, ``pixeldit.data.grf.grf_log_likelihood``), so both routes share this code.

``grid_posterior`` (1-3 parameters): the GRF posterior is far narrower than its prior, so a
fixed grid over the prior would put all the mass in one cell.  A coarse grid over the prior
finds the region within ``threshold`` nats of the best point; the grid is rebuilt on that
region (one cell of margin) until the region stops shrinking, then a fine grid on it gives
the posterior mass per cell (midpoint rule), its moments, marginal intervals, samples (a
cell by its mass, then uniform inside it: their variance exceeds the grid's by
``cell^2 / 12``) and the log-evidence.

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


def emulator_log_likelihood(emulator: Emulator, x, **options) -> Callable[[np.ndarray], np.ndarray]:
    """The learned ``log p(x | theta)`` of one field ``x`` ``(H, W, C)`` as a batch callable.

    ``options`` go to :func:`pixeldit.inference.log_prob`; with ``divergence="hutchinson"`` the
    same ``key`` serves every call, so every theta sees the same probes.
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 3:
        raise ValueError(f"x must be one field (H, W, C), got shape {x.shape}")

    def log_likelihood(theta):
        return log_prob(emulator, x[None], np.asarray(theta, np.float32), **options).value[0]

    return log_likelihood


# --------------------------------------------------------------------------------------------
# Zooming grid
# --------------------------------------------------------------------------------------------


def _centres(lo, hi, n):
    """Cell centres of ``n`` equal cells per dimension of the box [lo, hi]."""
    return [lo[i] + (np.arange(n) + 0.5) * (hi[i] - lo[i]) / n for i in range(len(lo))]


def _evaluate(log_likelihood, axes):
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (n, .., n, K)
    flat = mesh.reshape(-1, len(axes))
    ll = np.asarray(log_likelihood(flat), np.float64).reshape(mesh.shape[:-1])
    if ll.shape != mesh.shape[:-1]:
        raise ValueError(f"log_likelihood returned {ll.size} values for {len(flat)} thetas")
    return mesh, np.where(np.isnan(ll), -np.inf, ll)


def _region(ll, axes, lo, hi, low, high, threshold):
    """Box around the cells within ``threshold`` nats of the best, one cell of margin, in the prior."""
    if not np.any(np.isfinite(ll)):
        raise ValueError("the log-likelihood is not finite anywhere on the grid")
    keep = ll > np.max(ll) - threshold
    new_lo, new_hi = np.empty_like(lo), np.empty_like(hi)
    for i, ax in enumerate(axes):
        other = tuple(j for j in range(len(axes)) if j != i)
        idx = np.nonzero(np.any(keep, axis=other))[0]
        step = (hi[i] - lo[i]) / len(ax)
        new_lo[i] = max(low[i], ax[idx[0]] - step)
        new_hi[i] = min(high[i], ax[idx[-1]] + step)
    return new_lo, new_hi


def grid_posterior(
    log_likelihood: Callable[[np.ndarray], np.ndarray],
    low,
    high,
    *,
    coarse: int = 12,
    fine: int = 32,
    threshold: float = 15.0,
    max_zoom: int = 8,
    num_samples: int = 1000,
    seed: int = 0,
) -> Posterior:
    """Grid posterior for 1-3 parameters under the uniform prior ``[low, high]`` (module docstring).

    Args:
      log_likelihood: ``(M, K) -> (M,)`` for one observation.
      low, high: the prior box ``(K,)``.
      coarse, fine: cells per dimension of the search grids and of the final grid.
      threshold: nats below the best cell that still count as holding mass (15: a Gaussian's
        5.5-sigma contour, mass outside ~1e-7).
      max_zoom: the most search grids.
      num_samples, seed: posterior draws returned and their seed.
    """
    low, high = prior_box(low, high)
    k = len(low)
    if not 1 <= k <= 3:
        raise ValueError(f"grid_posterior handles 1-3 parameters, got {k}: use mcmc_posterior")
    if coarse < 3 or fine < 3:
        raise ValueError(f"coarse and fine need >= 3 cells per dimension, got {coarse} and {fine}")
    lo, hi = low.copy(), high.copy()
    evaluations = 0
    for _ in range(max_zoom):
        axes = _centres(lo, hi, coarse)
        _, ll = _evaluate(log_likelihood, axes)
        evaluations += ll.size
        new_lo, new_hi = _region(ll, axes, lo, hi, low, high, threshold)
        settled = np.all((new_hi - new_lo) > 0.8 * (hi - lo))
        lo, hi = new_lo, new_hi
        if settled:
            break
    for _ in range(2):  # the fine grid may show the region reaching its edge: widen once
        axes = _centres(lo, hi, fine)
        mesh, ll = _evaluate(log_likelihood, axes)
        evaluations += ll.size
        new_lo, new_hi = _region(ll, axes, lo, hi, low, high, threshold)
        if np.all(new_lo >= lo - 1e-12) and np.all(new_hi <= hi + 1e-12):
            break
        lo, hi = np.minimum(lo, new_lo), np.maximum(hi, new_hi)
    return _grid_summary(mesh, ll, axes, lo, hi, low, high, num_samples, seed, evaluations)


def _grid_summary(mesh, ll, axes, lo, hi, low, high, num_samples, seed, evaluations) -> Posterior:
    k = len(axes)
    cell = (hi - lo) / np.array([len(a) for a in axes])
    log_cell = float(np.sum(np.log(cell)))
    log_evidence = float(logsumexp(ll) + log_cell - np.sum(np.log(high - low)))
    weights = np.exp(ll - logsumexp(ll))  # posterior mass per cell
    flat_theta = mesh.reshape(-1, k)
    flat_w = weights.reshape(-1)
    mean = flat_w @ flat_theta
    # the midpoint rule's moments of a smooth density are accurate far beyond O(h^2) (a Gaussian
    # sampled at spacing h: error ~ exp(-2 pi^2 sigma^2 / h^2)), so no cell-width correction
    var = flat_w @ (flat_theta - mean) ** 2
    intervals = {}
    for level in INTERVALS:
        q = np.array([(1 - level) / 2, (1 + level) / 2])
        iv = np.empty((k, 2))
        for i in range(k):
            marginal = weights.sum(axis=tuple(j for j in range(k) if j != i))
            edges = lo[i] + np.arange(len(axes[i]) + 1) * cell[i]
            cdf = np.concatenate([[0.0], np.cumsum(marginal)])
            iv[i] = np.interp(q, cdf, edges)
        intervals[level] = iv
    rng = np.random.default_rng(seed)
    idx = rng.choice(flat_w.size, size=num_samples, p=flat_w / flat_w.sum())
    samples = flat_theta[idx] + (rng.random((num_samples, k)) - 0.5) * cell
    return Posterior(samples=samples, mean=mean, std=np.sqrt(var), intervals=intervals, log_evidence=log_evidence,
                     num_evaluations=int(evaluations),
                     extra={"method": "grid", "box": [lo.tolist(), hi.tolist()], "cells": [len(a) for a in axes]})


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

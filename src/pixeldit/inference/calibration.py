"""Calibration of posterior samples: SBC ranks, TARP coverage, posterior-predictive spectra, exact-GRF scores.

* Simulation-based calibration (Talts et al. 2018): for thetas drawn from the prior and a
  field simulated at each, the rank of the true theta among ``S`` posterior draws is uniform
  on ``0..S`` for a calibrated posterior.  ``(rank + U) / (S + 1)`` with ``U ~ U[0, 1)`` is then
  exactly uniform on [0, 1), which the KS test checks per parameter (scipy).
* TARP expected coverage (Lemos et al. 2023): with a random reference point per simulation,
  ``f = fraction of draws closer to the reference than the true theta``; the expected
  coverage at level ``alpha`` is the fraction of simulations with ``f < alpha`` and lies on
  the diagonal for a calibrated posterior.  Written here (a dozen lines of numpy) rather than
  taken from the ``tarp`` package: its released version mishandles user reference points
  (an open fix, Ciela-Institute/tarp#12), and it would be one more dependency for this.
  Thetas are mapped to [0, 1] by the prior box first, so that parameters of different
  ranges weigh alike in the distance.
* Posterior-predictive check: radial power spectra of fields drawn at posterior samples
  (emulator or simulator) against the observed field's (``pixeldit.data.grf.radial_power_spectrum``).
* Exact comparison for the built-in GRF: the exact posterior from ``grf_log_likelihood`` on
  the zooming grid, and the scores ``|mean - exact mean| <= 0.3 exact std`` and
  ``std / exact std`` in [0.8, 1.25].
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from scipy import stats

from ..data import grf
from .likelihood import Emulator, log_prob
from .posterior import Posterior, grid_posterior, prior_box

MEAN_TOLERANCE = 0.3  # |mean - exact mean| in exact posterior stds
STD_RATIO_RANGE = (0.8, 1.25)  # posterior std / exact std
PASS_FRACTION = 0.9  # of (field, parameter) pairs
KS_P_MIN = 0.01
TARP_MAX_DEVIATION = 0.05

__all__ = [
    "KS_P_MIN",
    "MEAN_TOLERANCE",
    "PASS_FRACTION",
    "STD_RATIO_RANGE",
    "TARP_MAX_DEVIATION",
    "Calibration",
    "calibrate",
    "exact_grf_posterior",
    "exact_grf_scores",
    "likelihood_correlation",
    "posterior_scores",
    "ppc_spectrum",
    "sbc_ks",
    "sbc_ranks",
    "tarp_coverage",
]


def _check_samples(samples, theta_true):
    samples = np.asarray(samples, np.float64)
    theta_true = np.asarray(theta_true, np.float64)
    if samples.ndim != 3 or theta_true.shape != (samples.shape[0], samples.shape[2]):
        raise ValueError(f"samples must be (N, S, K) and theta_true (N, K) to match, got {samples.shape} and "
                         f"{theta_true.shape}")
    return samples, theta_true


def sbc_ranks(samples, theta_true) -> np.ndarray:
    """Rank of each true theta among its posterior draws: int ``(N, K)`` in ``0..S``."""
    samples, theta_true = _check_samples(samples, theta_true)
    return np.sum(samples < theta_true[:, None, :], axis=1)


def sbc_ks(ranks, num_draws: int, *, seed: int = 0) -> np.ndarray:
    """KS p-value per parameter that the ranks are uniform on ``0..num_draws`` (``(K,)``)."""
    ranks = np.asarray(ranks)
    u = (ranks + np.random.default_rng(seed).random(ranks.shape)) / (num_draws + 1)
    return np.array([stats.kstest(u[:, i], "uniform").pvalue for i in range(ranks.shape[1])])


def tarp_coverage(samples, theta_true, low, high, *, num_alpha: int = 101, seed: int = 0,
                  references=None) -> tuple[np.ndarray, np.ndarray]:
    """TARP expected coverage ``(alpha, ecp)``, both ``(num_alpha,)`` (module docstring).

    ``references`` ``(N, K)`` in theta units; default one uniform draw from the prior box per
    simulation (seeded).
    """
    samples, theta_true = _check_samples(samples, theta_true)
    low, high = prior_box(low, high)
    n, _, k = samples.shape
    if references is None:
        references = low + (high - low) * np.random.default_rng(seed).random((n, k))
    scale = lambda a: (np.asarray(a, np.float64) - low) / (high - low)  # noqa: E731 - the prior box -> [0, 1]
    s, t, r = scale(samples), scale(theta_true), scale(references)
    d_samples = np.linalg.norm(s - r[:, None, :], axis=-1)  # (N, S)
    d_true = np.linalg.norm(t - r, axis=-1)  # (N,)
    f = np.mean(d_samples < d_true[:, None], axis=1)  # (N,)
    alpha = np.linspace(0.0, 1.0, num_alpha)
    ecp = np.mean(f[None, :] < alpha[:, None], axis=1)
    return alpha, ecp


@dataclasses.dataclass(frozen=True)
class Calibration:
    """SBC and TARP of ``N`` simulations: ranks ``(N, K)``, KS p-values ``(K,)``, the TARP curve."""

    ranks: np.ndarray
    num_draws: int
    ks_p: np.ndarray
    alpha: np.ndarray
    ecp: np.ndarray

    @property
    def tarp_deviation(self) -> float:
        """Largest ``|ecp - alpha|``."""
        return float(np.max(np.abs(self.ecp - self.alpha)))

    def report(self, names=None) -> dict:
        """JSON-ready numbers with PASS/FAIL lines (KS p >= 0.01 each; TARP within 0.05)."""
        names = names or [f"theta{i}" for i in range(len(self.ks_p))]
        lines = [f"{'PASS' if p >= KS_P_MIN else 'FAIL'} SBC KS p({name}) = {p:.3g} (>= {KS_P_MIN})"
                 for name, p in zip(names, self.ks_p)]
        dev = self.tarp_deviation
        lines.append(f"{'PASS' if dev <= TARP_MAX_DEVIATION else 'FAIL'} TARP max |coverage - alpha| = {dev:.3f} "
                     f"(<= {TARP_MAX_DEVIATION})")
        return {"num_simulations": int(len(self.ranks)), "num_draws": int(self.num_draws),
                "ks_p": {n: float(p) for n, p in zip(names, self.ks_p)}, "tarp_max_deviation": dev,
                "checks": lines, "passed": all(line.startswith("PASS") for line in lines)}


def calibrate(samples, theta_true, low, high, *, seed: int = 0) -> Calibration:
    """SBC ranks and KS p-values, and the TARP curve, of posterior ``samples`` ``(N, S, K)``."""
    samples, theta_true = _check_samples(samples, theta_true)
    ranks = sbc_ranks(samples, theta_true)
    alpha, ecp = tarp_coverage(samples, theta_true, low, high, seed=seed)
    return Calibration(ranks=ranks, num_draws=samples.shape[1], ks_p=sbc_ks(ranks, samples.shape[1], seed=seed),
                       alpha=alpha, ecp=ecp)


def ppc_spectrum(observed, draws) -> dict:
    """Posterior-predictive check of the radial power spectrum.

    Args:
      observed: one field ``(H, W[, 1])``.
      draws: fields ``(S, H, W[, 1])`` drawn at posterior samples of theta.

    Returns:
      ``k`` bins, the observed spectrum, the draws' 2.5 / 50 / 97.5 % quantiles per bin,
      ``z`` (observed log-power minus the draws' mean log-power, over their std) per bin, and
      ``inside95`` the fraction of bins where the observed spectrum lies in the draws' 95 % band.
    """
    k, p_obs = grf.radial_power_spectrum(observed)
    _, p_draws = grf.radial_power_spectrum(draws)
    if p_draws.ndim != 2 or p_draws.shape[1] != p_obs.shape[-1]:
        raise ValueError(f"draws must be fields (S, H, W[, 1]) of the observed field's size, got {np.shape(draws)}")
    lo, mid, hi = np.quantile(p_draws, [0.025, 0.5, 0.975], axis=0)
    log_draws = np.log(p_draws)
    z = (np.log(p_obs) - log_draws.mean(axis=0)) / log_draws.std(axis=0, ddof=1)
    return {"k": k, "observed": p_obs, "q025": lo, "median": mid, "q975": hi, "z": z,
            "inside95": float(np.mean((p_obs >= lo) & (p_obs <= hi)))}


def exact_grf_posterior(field, low=grf.PRIOR_LOW, high=grf.PRIOR_HIGH, **grid_options) -> Posterior:
    """The exact GRF posterior of one field under the uniform prior box, on the zooming grid."""
    return grid_posterior(lambda theta: grf.grf_log_likelihood(field, theta), low, high, **grid_options)


def posterior_scores(mean, std, exact_mean, exact_std) -> dict:
    """Scores of posteriors ``(N, K)`` against exact ones ``(N, K)`` (thresholds in this module).

    Returns the per-pair ``mean_ok`` / ``std_ok`` / ``ok`` booleans, their fractions per parameter
    and overall, and ``passed`` (``ok`` for at least :data:`PASS_FRACTION` of the pairs).
    """
    mean, std, exact_mean, exact_std = (np.asarray(a, np.float64) for a in (mean, std, exact_mean, exact_std))
    if not mean.shape == std.shape == exact_mean.shape == exact_std.shape or mean.ndim != 2:
        raise ValueError(f"mean, std, exact_mean, exact_std must all be (N, K), got "
                         f"{mean.shape}, {std.shape}, {exact_mean.shape}, {exact_std.shape}")
    z = np.abs(mean - exact_mean) / exact_std
    ratio = std / exact_std
    mean_ok = z <= MEAN_TOLERANCE
    std_ok = (ratio >= STD_RATIO_RANGE[0]) & (ratio <= STD_RATIO_RANGE[1])
    ok = mean_ok & std_ok
    return {"mean_z": z, "std_ratio": ratio, "mean_ok": mean_ok, "std_ok": std_ok, "ok": ok,
            "fraction_ok": ok.mean(axis=0), "fraction_ok_all": float(ok.mean()),
            "passed": bool(ok.mean() >= PASS_FRACTION)}


def exact_grf_scores(fields, posterior_fn: Callable[[np.ndarray], Posterior], low=grf.PRIOR_LOW,
                     high=grf.PRIOR_HIGH) -> dict:
    """:func:`posterior_scores` of ``posterior_fn(field)`` against the exact GRF posterior of each field."""
    got = [posterior_fn(f) for f in fields]
    exact = [exact_grf_posterior(f, low, high) for f in fields]
    return posterior_scores(np.stack([p.mean for p in got]), np.stack([p.std for p in got]),
                            np.stack([p.mean for p in exact]), np.stack([p.std for p in exact]))


def posterior_region_grid(post: Posterior, low, high, *, points: int = 7, span: float = 2.5) -> np.ndarray:
    """A ``points^K`` grid of thetas over ``mean +- span * std`` of ``post``, clipped to the prior: ``(M, K)``."""
    low, high = prior_box(low, high)
    axes = [np.linspace(max(lo, m - span * s), min(hi, m + span * s), points)
            for m, s, lo, hi in zip(post.mean, post.std, low, high)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))


def likelihood_correlation(emulator: Emulator, fields, low=grf.PRIOR_LOW, high=grf.PRIOR_HIGH, *, points: int = 7,
                           span: float = 2.5, batch: int = 4, **log_prob_options) -> dict:
    """Learned vs exact GRF log-likelihood over each field's exact posterior region.

    For each field a ``points^2`` theta grid spans the exact posterior's ``mean +- span * std``;
    the Pearson correlation of the learned and exact log-likelihoods over that grid is the
    correlation of their differences over theta (an offset per field, such as the mean mode or
    a normalisation, drops out).  Returns per-field ``r`` and their mean, and the spread
    (std over the grid) of the exact and the learned values.
    """
    fields = np.asarray(fields, np.float32)
    grids, exact = [], []
    for f in fields:
        post = exact_grf_posterior(f, low, high)
        g = posterior_region_grid(post, low, high, points=points, span=span)
        grids.append(g)
        exact.append(grf.grf_log_likelihood(f, g))
    grids, exact = np.stack(grids).astype(np.float32), np.stack(exact)
    learned = np.concatenate([log_prob(emulator, fields[i:i + batch], grids[i:i + batch], **log_prob_options).value
                              for i in range(0, len(fields), batch)])
    r = np.array([np.corrcoef(a, b)[0, 1] for a, b in zip(learned, exact)])
    return {"r": r, "mean_r": float(np.mean(r)), "exact_spread": exact.std(axis=1),
            "learned_spread": learned.std(axis=1),
            "thetas": grids, "exact": exact, "learned": learned}

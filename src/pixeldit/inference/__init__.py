"""Field-level inference with a theta-conditional flow: likelihood, posteriors, calibration.

* :mod:`.likelihood`: ``log_prob`` by the probability-flow ODE; ``Emulator`` (model + units).
* :mod:`.posterior`: zooming-grid (1-3 parameters) and random-walk MCMC posteriors.
* :mod:`.calibration`: SBC, TARP, posterior-predictive spectra, scores against the exact GRF.
* :mod:`.plots`: corner plots, rank histograms, TARP and PPC figures.
* :mod:`.amortized`: draws and exact log-density of an amortised posterior
  (:mod:`pixeldit.posterior_model`).
* :mod:`.timing`: throughput measurements for the benchmarks.
"""

from .amortized import posterior_log_prob, sample_posterior
from .calibration import Calibration, calibrate, exact_grf_posterior, posterior_scores, ppc_spectrum
from .likelihood import DIVERGENCES, MEAN_MODES, PROBES, Emulator, LogProb, log_prob
from .posterior import INTERVALS, Posterior, emulator_log_likelihood, grid_posterior, mcmc_posterior, prior_box

__all__ = [
    "DIVERGENCES",
    "INTERVALS",
    "MEAN_MODES",
    "PROBES",
    "Calibration",
    "Emulator",
    "LogProb",
    "Posterior",
    "calibrate",
    "emulator_log_likelihood",
    "exact_grf_posterior",
    "grid_posterior",
    "log_prob",
    "mcmc_posterior",
    "posterior_log_prob",
    "posterior_scores",
    "ppc_spectrum",
    "sample_posterior",
    "prior_box",
]

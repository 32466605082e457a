"""Field-level inference with a theta-conditional flow: likelihood, posteriors, calibration."""

from .likelihood import DIVERGENCES, MEAN_MODES, PROBES, Emulator, LogProb, log_prob
from .posterior import INTERVALS, Posterior, emulator_log_likelihood, grid_posterior, mcmc_posterior, prior_box

__all__ = [
    "DIVERGENCES",
    "Emulator",
    "INTERVALS",
    "LogProb",
    "MEAN_MODES",
    "PROBES",
    "Posterior",
    "emulator_log_likelihood",
    "grid_posterior",
    "log_prob",
    "mcmc_posterior",
    "prior_box",
]

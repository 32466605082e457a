"""Field-level inference with a theta-conditional flow: likelihood, posteriors, calibration."""

from .calibration import Calibration, calibrate, exact_grf_posterior, posterior_scores, ppc_spectrum
from .likelihood import DIVERGENCES, MEAN_MODES, PROBES, Emulator, LogProb, log_prob
from .posterior import INTERVALS, Posterior, emulator_log_likelihood, grid_posterior, mcmc_posterior, prior_box

__all__ = [
    "Calibration",
    "calibrate",
    "exact_grf_posterior",
    "posterior_scores",
    "ppc_spectrum",
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

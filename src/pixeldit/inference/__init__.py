"""Field-level inference with a theta-conditional flow: likelihood, posteriors, calibration."""

from .likelihood import DIVERGENCES, MEAN_MODES, PROBES, Emulator, LogProb, log_prob

__all__ = ["DIVERGENCES", "Emulator", "LogProb", "MEAN_MODES", "PROBES", "log_prob"]

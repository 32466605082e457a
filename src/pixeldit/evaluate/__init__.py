"""Sample quality: metrics and plots (:mod:`.metrics`, numpy only) and the built-in benchmarks
(:mod:`.benchmarks`: what ``pixeldit eval`` measures on digits, GRFs and other data, and the
targets it checks).  Importing this package does not import JAX or the model; the benchmarks
module does.
"""

from pixeldit.evaluate.metrics import (
    DigitClassifier,
    digits_metrics,
    grf_metrics,
    plot_power_spectra,
    plot_sample_grid,
    train_digit_classifier,
)

__all__ = [
    "DigitClassifier",
    "digits_metrics",
    "grf_metrics",
    "plot_power_spectra",
    "plot_sample_grid",
    "train_digit_classifier",
]

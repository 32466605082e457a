"""The built-in benchmarks behind ``pixeldit eval``: what is sampled, measured and checked.

* digits: an independent scikit-learn classifier labels class-conditional samples
  (``eval.samples_per_class`` per class): accuracy and per-class diversity relative to the real
  data; plot ``samples_vs_real.png``.
* grf: ``eval.samples_per_theta`` fields at each test theta vs ``eval.n_sim`` simulator
  realisations: mean |log10| power-spectrum error and pixel-std ratios; plots
  ``power_spectra.png`` and ``samples_vs_real.png``.
* other data: pixel statistics of samples vs real data and ``samples_vs_real.png``.

Each function takes the model, the sampling settings ``draw`` (keyword arguments of
:func:`pixeldit.conditions.draw_samples`) and the output folder, and returns the metrics dict
with ``sample_wall_time``, ``plots`` and (for the built-in data) ``checks`` against the targets
below.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pixeldit.conditions import default_test_theta, draw_samples, labels_for_plot, make_conditions, value_range_for
from pixeldit.data import load_dataset, simulate
from pixeldit.evaluate.metrics import (
    digits_metrics,
    grf_metrics,
    plot_power_spectra,
    plot_sample_grid,
    train_digit_classifier,
)
from pixeldit.runconfig import EvalSection, RunConfig, SampleSection

__all__ = [
    "DIGITS_MIN_ACCURACY",
    "DIGITS_MIN_DIVERSITY",
    "GRF_MAX_SPECTRUM_ERROR",
    "GRF_STD_RATIO_RANGE",
    "evaluate_data",
    "evaluate_digits",
    "evaluate_grf",
]

# Quality targets of the built-in benchmarks, reported next to the metrics.
DIGITS_MIN_ACCURACY = 0.90  # classifier accuracy of class-conditional samples
DIGITS_MIN_DIVERSITY = 0.5  # smallest per-class diversity relative to the real digits
GRF_MAX_SPECTRUM_ERROR = 0.10  # mean |log10| power-spectrum error
GRF_STD_RATIO_RANGE = (0.9, 1.1)  # pixel std of samples over the simulator's


def evaluate_digits(model, model_config, dmeta: Mapping[str, Any], e: EvalSection, draw: dict, out: Path) -> dict:
    """Class-conditional digits: accuracy under an independent classifier, diversity, a plot."""
    t0 = time.perf_counter()
    res = int(dmeta["image_shape"][0])
    k = model_config.num_classes
    labels = np.tile(np.arange(k, dtype=np.int32), e.samples_per_class)  # sample i has class i % k
    x = draw_samples(model, model_config, (res, res), labels, np.full_like(labels, k), **draw)
    result: dict[str, Any] = {"sample_wall_time": time.perf_counter() - t0}
    clf = train_digit_classifier(res)
    real_x, real_y = load_dataset("digits", resolution=res).arrays()
    result.update(digits_metrics(x, labels, clf, real_x, real_y))
    per_class = np.stack([real_x[real_y == c][:5] for c in range(k)])  # (k, 5, H, W, C)
    real_show = per_class.transpose(1, 0, 2, 3, 4).reshape(-1, *real_x.shape[1:])  # image j has class j % k
    result["plots"] = {"samples_vs_real": plot_sample_grid(
        x[: 5 * k], out / "samples_vs_real.png", real=real_show, labels=labels[: 5 * k],
        real_labels=np.tile(np.arange(k), 5), ncols=k)}
    result["checks"] = {
        f"accuracy >= {DIGITS_MIN_ACCURACY}": bool(result["accuracy"] >= DIGITS_MIN_ACCURACY),
        f"diversity_min >= {DIGITS_MIN_DIVERSITY}": bool(result.get("diversity_min", 0.0) >= DIGITS_MIN_DIVERSITY),
    }
    return result


def evaluate_grf(model, model_config, dmeta: Mapping[str, Any], e: EvalSection, draw: dict, out: Path) -> dict:
    """Gaussian random fields at fixed test thetas: power spectra and pixel stds vs the simulator."""
    t0 = time.perf_counter()
    test = np.asarray(e.test_theta, np.float64) if len(e.test_theta) else default_test_theta(dmeta)
    theta = np.repeat(test, e.samples_per_theta, axis=0).astype(np.float32)
    x = draw_samples(model, model_config, dmeta["image_shape"][:2], theta, np.full_like(theta, np.nan), **draw)
    result: dict[str, Any] = {"sample_wall_time": time.perf_counter() - t0}
    result.update(grf_metrics(x, theta, n_sim=e.n_sim, seed=e.seed))
    show = np.arange(len(test)) * e.samples_per_theta  # first sample of each test theta
    sim = simulate(test, np.random.default_rng(np.random.SeedSequence([e.seed, 31])), int(dmeta["image_shape"][0]))
    result["plots"] = {
        "power_spectra": plot_power_spectra(x, theta, out / "power_spectra.png", max_curves=len(test)),
        "samples_vs_real": plot_sample_grid(x[show], out / "samples_vs_real.png", real=sim, labels=theta[show],
                                            real_labels=test, ncols=3, value_range=None),
    }
    lo, hi = GRF_STD_RATIO_RANGE
    result["checks"] = {
        f"spectrum_log10_error <= {GRF_MAX_SPECTRUM_ERROR}": bool(result["spectrum_log10_error"] <= GRF_MAX_SPECTRUM_ERROR),
        f"std_ratio_mean in [{lo}, {hi}]": bool(lo <= result["std_ratio_mean"] <= hi),
        f"std_ratio in [{lo}, {hi}] at every test theta (stricter)": bool(
            result["std_ratio_min"] >= lo and result["std_ratio_max"] <= hi),
    }
    return result


def evaluate_data(model, model_config, dmeta: Mapping[str, Any], dataset, run: RunConfig, s: SampleSection,
                  e: EvalSection, draw: dict, out: Path) -> dict:
    """Any other data: pixel statistics of samples vs the real images, and a plot."""
    t0 = time.perf_counter()
    real_x, real_y = dataset.arrays() if hasattr(dataset, "arrays") else (dataset.get_batch(0, e.num_samples)["x"], None)
    n = e.num_samples
    if model_config.kind == "theta":
        idx = np.arange(n) % len(real_y)
        y, y_null = real_y[idx], np.full_like(real_y[idx], np.nan)
    else:
        y, y_null = make_conditions(model_config, dmeta, n, labels=s.labels)
    x = draw_samples(model, model_config, dmeta["image_shape"][:2], y, y_null, **draw)
    return {
        "sample_wall_time": time.perf_counter() - t0,
        "num_samples": int(n), "sample_mean": float(x.mean()), "sample_std": float(x.std()),
        "real_mean": float(real_x.mean()), "real_std": float(real_x.std()),
        "std_ratio": float(x.std() / max(real_x.std(), 1e-12)),
        "plots": {"samples_vs_real": plot_sample_grid(
            x, out / "samples_vs_real.png", real=real_x[:64], labels=labels_for_plot(model_config, y),
            value_range=value_range_for(dmeta, run), class_names=dmeta.get("class_names"))},
    }

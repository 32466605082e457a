"""Tests for pixeldit.evaluate: digit and GRF metrics, plots."""

import json

import numpy as np
import pytest

from pixeldit.data import DigitsDataset, simulate
from pixeldit.evaluate import (
    digits_metrics,
    grf_metrics,
    plot_power_spectra,
    plot_sample_grid,
    train_digit_classifier,
)


@pytest.fixture(scope="module")
def clf():
    return train_digit_classifier(16)


@pytest.fixture(scope="module")
def real():
    return DigitsDataset().arrays()


@pytest.fixture(scope="module")
def split(real):
    x, y = real
    perm = np.random.default_rng(0).permutation(len(x))
    return perm[: len(x) // 2], perm[len(x) // 2 :]


def test_classifier_is_accurate_on_held_out_real_digits(clf):
    assert clf.resolution == 16
    assert clf.heldout_accuracy > 0.95
    assert clf.n_test > 400 and clf.n_train + clf.n_test == 1797


def test_evaluate_does_not_import_the_model():
    import pixeldit.evaluate as ev
    import pixeldit.evaluate.metrics as metrics

    for path in (ev.__file__, metrics.__file__):  # the benchmarks module samples, so it does import JAX
        src = open(path).read()
        assert "import jax" not in src and "flax" not in src and "pixeldit.model" not in src, path


def test_real_vs_real_digits(clf, real, split):
    x, y = real
    a, b = split
    m = digits_metrics(x[a], y[a], clf, x[b], y[b])
    json.dumps(m)
    assert m["accuracy"] > 0.95
    assert set(m["diversity_per_class"]) == {str(c) for c in range(10)}
    assert abs(m["diversity_mean"] - 1.0) < 0.05
    assert m["diversity_min"] > 0.85
    assert abs(m["nn_distance_ratio"] - 1.0) < 0.15
    assert abs(m["sample_std"] - m["real_std"]) < 0.02


def test_bad_digit_samples_are_detected(clf, real, split):
    x, y = real
    a, b = split
    shuffled = np.random.default_rng(1).permutation(y[a])
    assert digits_metrics(x[a], shuffled, clf, x[b], y[b])["accuracy"] < 0.3
    # mode collapse: every sample of a class is the same image
    collapsed = np.concatenate([np.repeat(x[a][y[a] == c][:1], 20, axis=0) for c in range(10)])
    labels = np.repeat(np.arange(10), 20)
    m = digits_metrics(collapsed, labels, clf, x[b], y[b])
    assert m["diversity_mean"] < 1e-6
    # memorisation: copies of the reference images
    assert digits_metrics(x[b][:200], y[b][:200], clf, x[b], y[b])["nn_distance_ratio"] < 1e-6
    # pure noise is neither accurate nor close to the data
    noise = np.random.default_rng(2).uniform(-1, 1, size=(100, 16, 16, 1))
    m = digits_metrics(noise, np.arange(100) % 10, clf, x[b], y[b])
    assert m["accuracy"] < 0.4 and m["nn_distance_ratio"] > 2


THETAS = np.array([[0.0, 1.5], [0.5, 3.0], [-0.5, 2.5], [1.0, 4.0]])


def _test_set(n_per=32):
    return np.repeat(THETAS, n_per, axis=0)


def test_grf_metrics_on_simulator_fields():
    theta = _test_set()
    m = grf_metrics(simulate(theta, 0), theta)
    json.dumps(m)
    assert m["num_thetas"] == 4 and m["num_samples"] == 128 and m["reference"] == "analytic"
    assert m["spectrum_log10_error"] < 0.05
    assert 0.9 < m["std_ratio_min"] and m["std_ratio_max"] < 1.1
    assert abs(m["chi2_per_dof"] - 1.0) < 0.05
    assert m["baseline_spectrum_log10_error"] < 0.05
    per = m["per_theta"]
    assert [(p["log_amplitude"], p["slope"]) for p in per] == [tuple(t) for t in THETAS]
    # simulated reference gives the same picture
    ms = grf_metrics(simulate(theta, 1), theta, n_sim=64, baseline=False)
    assert ms["spectrum_log10_error"] < 0.06 and abs(ms["std_ratio_mean"] - 1.0) < 0.1
    assert "baseline_spectrum_log10_error" not in ms


def test_grf_metrics_detect_wrong_slope_and_amplitude():
    theta = _test_set()
    wrong_slope = theta + [0.0, 1.5]
    m = grf_metrics(simulate(wrong_slope, 0), theta)
    assert m["spectrum_log10_error"] > 0.3
    assert abs(m["chi2_per_dof"] - 1.0) > 0.3
    wrong_amp = theta + [0.5, 0.0]
    m = grf_metrics(simulate(wrong_amp, 0), theta)
    assert m["spectrum_log10_error"] > 0.35  # log10(e) = 0.43 expected
    np.testing.assert_allclose(m["std_ratio_mean"], np.exp(0.5), rtol=0.08)
    assert m["std_ratio_log_error"] > 0.4


def test_plots_are_written(tmp_path, real):
    x, y = real
    p = plot_sample_grid(x[:12], tmp_path / "grid.png", real=x[12:24], labels=y[:12], real_labels=y[12:24])
    assert (tmp_path / "grid.png").stat().st_size > 1000 and p.endswith("grid.png")
    theta = _test_set(4)
    fields = simulate(theta, 0, size=16)
    plot_sample_grid(fields, tmp_path / "sub" / "fields.png", labels=theta, value_range=None)
    plot_sample_grid(np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 3)), tmp_path / "rgb.png")
    plot_power_spectra(fields, theta, tmp_path / "spectra.png")
    from PIL import Image

    for name in ("grid.png", "sub/fields.png", "rgb.png", "spectra.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width > 100

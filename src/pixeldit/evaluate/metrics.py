"""Sample-quality metrics and plots (numpy / scikit-learn / matplotlib only).

This module never imports the model: every function takes numpy arrays of
samples (channel-last ``(N, H, W, C)``; digits in [-1, 1], GRFs in physical
units) and returns plain dicts of Python floats / ints / lists that are JSON
serialisable.

* Digits: :func:`train_digit_classifier` fits an independent scikit-learn SVC
  on real digits at the model's resolution; :func:`digits_metrics` reports the
  classifier accuracy against the requested labels, per-class diversity
  relative to real data and a nearest-real-neighbour (memorisation) ratio.
* GRFs: :func:`grf_metrics` compares radially averaged power spectra and pixel
  standard deviations of generated fields with the simulator's exact
  expectation (or simulated realisations).
* Plots: :func:`plot_sample_grid`, :func:`plot_power_spectra` write PNGs with the
  Agg canvas (the global matplotlib backend is not changed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pixeldit.data.digits import load_digits_arrays
from pixeldit.data.grf import (
    expected_power_spectrum,
    radial_power_spectrum,
    simulate,
    whitened_chi2,
)

# --------------------------------------------------------------------------- digits


@dataclass
class DigitClassifier:
    """A scikit-learn digit classifier for ``resolution x resolution`` images in [-1, 1].

    Attributes:
        model: fitted scikit-learn estimator on flattened images.
        resolution: image side it expects.
        heldout_accuracy: accuracy on the held-out real digits (Python float).
        n_train, n_test: sizes of the real train / held-out splits.
    """

    model: Any
    resolution: int
    heldout_accuracy: float
    n_train: int
    n_test: int

    def _features(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float64)
        if x.ndim == 4:
            if x.shape[-1] != 1:
                raise ValueError(f"digit images must have 1 channel, got shape {x.shape}")
            x = x[..., 0]
        if x.ndim != 3 or x.shape[1:] != (self.resolution, self.resolution):
            raise ValueError(
                f"expected images (N, {self.resolution}, {self.resolution}[, 1]), got shape {np.shape(images)}"
            )
        return np.clip(x, -1.0, 1.0).reshape(len(x), -1)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Return int64 predicted labels ``(N,)`` for images ``(N, R, R[, 1])`` (clipped to [-1, 1])."""
        return np.asarray(self.model.predict(self._features(images)), dtype=np.int64)


def train_digit_classifier(
    resolution: int = 16,
    *,
    upsample: str = "bilinear",
    test_size: float = 0.25,
    random_state: int = 0,
) -> DigitClassifier:
    """Fit an RBF-SVC on real digits at ``resolution``; returns a :class:`DigitClassifier`.

    The real data (``load_digits_arrays(resolution, upsample)``) are split
    stratified with ``random_state`` into train / held-out parts;
    ``heldout_accuracy`` is the accuracy on the held-out part.
    """
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    x, y = load_digits_arrays(resolution, upsample)
    feats = x.reshape(len(x), -1).astype(np.float64)
    xtr, xte, ytr, yte = train_test_split(feats, y, test_size=test_size, stratify=y, random_state=random_state)
    model = SVC(C=10.0, gamma="scale", random_state=random_state)
    model.fit(xtr, ytr)
    acc = float(np.mean(model.predict(xte) == yte))
    return DigitClassifier(model=model, resolution=int(resolution), heldout_accuracy=acc, n_train=len(xtr), n_test=len(xte))


def _flat(images: np.ndarray) -> np.ndarray:
    a = np.asarray(images, dtype=np.float64)
    return a.reshape(len(a), -1)


def _mean_pairwise_distance(a: np.ndarray) -> float:
    """Mean Euclidean distance over unordered pairs of rows of ``a`` (needs >= 2 rows)."""
    sq = np.sum(a * a, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * a @ a.T, 0.0)
    iu = np.triu_indices(len(a), k=1)
    return float(np.mean(np.sqrt(d2[iu])))


def _nearest_distances(a: np.ndarray, b: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    sa = np.sum(a * a, axis=1)
    sb = np.sum(b * b, axis=1)
    d2 = np.maximum(sa[:, None] + sb[None, :] - 2.0 * a @ b.T, 0.0)
    if exclude_self:
        np.fill_diagonal(d2, np.inf)
    return np.sqrt(d2.min(axis=1))


def digits_metrics(
    samples: np.ndarray,
    labels: np.ndarray,
    classifier: DigitClassifier,
    real_x: np.ndarray,
    real_y: np.ndarray,
) -> dict:
    """Class-conditional sample quality for digits.

    Args:
        samples: generated images ``(N, R, R, 1)`` in [-1, 1].
        labels: requested class labels ``(N,)``.
        classifier: from :func:`train_digit_classifier` (same resolution).
        real_x, real_y: real images / labels at the same resolution (e.g. ``DigitsDataset.arrays()``).

    Returns:
        dict with
        ``accuracy`` (fraction of samples the classifier assigns the requested label),
        ``accuracy_per_class`` ``{"c": float}``,
        ``diversity_per_class`` ``{"c": float}``: mean pairwise L2 distance among the
        samples of class ``c`` divided by the same for the real images of ``c``
        (1 = as diverse as real data, 0 = mode collapse; classes with < 2 samples are omitted),
        ``diversity_mean``, ``diversity_min``,
        ``nn_distance_ratio``: mean distance from each sample to its nearest real image
        divided by the mean leave-one-out nearest-neighbour distance among the real
        images (about 1 for fresh samples, 0 for copies of training images),
        ``sample_mean``, ``sample_std``, ``real_mean``, ``real_std`` (pixel statistics),
        ``num_samples`` and ``classifier_heldout_accuracy``.
    """
    samples = np.asarray(samples)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(samples) != len(labels):
        raise ValueError(f"{len(samples)} samples but {len(labels)} labels")
    if len(samples) == 0:
        raise ValueError("no samples")
    real_y = np.asarray(real_y).astype(np.int64).reshape(-1)
    pred = classifier.predict(samples)
    out: dict[str, Any] = {
        "num_samples": int(len(samples)),
        "accuracy": float(np.mean(pred == labels)),
        "classifier_heldout_accuracy": float(classifier.heldout_accuracy),
    }
    s_flat = np.clip(_flat(samples), -1.0, 1.0)
    r_flat = _flat(real_x)
    acc_pc: dict[str, float] = {}
    div_pc: dict[str, float] = {}
    for c in np.unique(labels):
        sel = labels == c
        acc_pc[str(int(c))] = float(np.mean(pred[sel] == c))
        real_c = r_flat[real_y == c]
        if sel.sum() >= 2 and len(real_c) >= 2:
            div_pc[str(int(c))] = _mean_pairwise_distance(s_flat[sel]) / _mean_pairwise_distance(real_c)
    out["accuracy_per_class"] = acc_pc
    out["diversity_per_class"] = div_pc
    if div_pc:
        vals = np.array(list(div_pc.values()))
        out["diversity_mean"] = float(vals.mean())
        out["diversity_min"] = float(vals.min())
    real_nn = _nearest_distances(r_flat, r_flat, exclude_self=True).mean()
    out["nn_distance_ratio"] = float(_nearest_distances(s_flat, r_flat).mean() / real_nn)
    out["sample_mean"] = float(s_flat.mean())
    out["sample_std"] = float(s_flat.std())
    out["real_mean"] = float(r_flat.mean())
    out["real_std"] = float(r_flat.std())
    return out


# --------------------------------------------------------------------------- GRF


def _group_by_theta(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (unique thetas in first-appearance order, group index per sample)."""
    uniq, first, inv = np.unique(theta, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return uniq[order], remap[inv.reshape(-1)]


def _fields(samples: np.ndarray) -> np.ndarray:
    f = np.asarray(samples, dtype=np.float64)
    if f.ndim == 4:
        if f.shape[-1] != 1:
            raise ValueError(f"GRF samples must have 1 channel, got shape {f.shape}")
        f = f[..., 0]
    if f.ndim != 3 or f.shape[1] != f.shape[2]:
        raise ValueError(f"GRF samples must be (N, S, S[, 1]), got shape {np.shape(samples)}")
    return f


def _grf_reference(t: np.ndarray, n_sim: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """Reference power spectrum and pixel std at ``t``: analytic (``n_sim <= 0``) or of ``n_sim`` simulated fields."""
    if n_sim > 0:
        ref = simulate(np.repeat(t[None], n_sim, axis=0), rng, size)[..., 0].astype(np.float64)
        return radial_power_spectrum(ref)[1].mean(axis=0), float(ref.std())
    return expected_power_spectrum(t, size)[1], float(np.exp(t[0]))


def _grf_summary(per_theta: list[dict], n_sim: int, num_samples: int, baseline: bool) -> dict[str, Any]:
    """The overall entries of :func:`grf_metrics` from its per-theta entries."""
    ratios = np.array([e["std_ratio"] for e in per_theta])
    out: dict[str, Any] = {
        "reference": "analytic" if n_sim <= 0 else f"simulated (n_sim={int(n_sim)})",
        "num_thetas": len(per_theta),
        "num_samples": int(num_samples),
        "spectrum_log10_error": float(np.mean([e["spectrum_log10_error"] for e in per_theta])),
        "std_ratio_mean": float(ratios.mean()),
        "std_ratio_min": float(ratios.min()),
        "std_ratio_max": float(ratios.max()),
        "std_ratio_log_error": float(np.mean(np.abs(np.log(ratios)))) if np.all(ratios > 0) else float("inf"),
        "chi2_per_dof": float(np.mean([e["chi2_per_dof"] for e in per_theta])),
        "per_theta": per_theta,
    }
    if baseline:
        out["baseline_spectrum_log10_error"] = float(np.mean([e["baseline_spectrum_log10_error"] for e in per_theta]))
    return out


def grf_metrics(
    samples: np.ndarray,
    theta: np.ndarray,
    n_sim: int = 0,
    *,
    baseline: bool = True,
    seed: int = 0,
) -> dict:
    """Compare generated GRFs with the simulator, per test theta and overall.

    Args:
        samples: generated fields ``(N, S, S, 1)`` or ``(N, S, S)`` (physical units).
        theta: ``(N, 2)`` conditioning ``(log_amplitude, slope)`` of each sample.
            Samples with identical rows form one test-theta group.
        n_sim: reference. ``0`` (default): exact analytic expectations, i.e.
            :func:`expected_power_spectrum` and pixel std ``exp(log_amplitude)``.
            ``> 0``: the mean spectrum / pixel std of ``n_sim`` fresh simulator fields per theta.
        baseline: also compute the same errors for an independent simulator draw
            of the same size as each group (the noise floor for that sample count).
        seed: seed of the simulator draws (reference and baseline).

    Returns:
        dict with ``per_theta``: list of dicts (``log_amplitude``, ``slope``,
        ``num_samples``, ``spectrum_log10_error`` = mean over k bins of
        ``|log10 P_gen(k) - log10 P_ref(k)|``, ``std_ratio`` = generated / reference
        pixel std (pixels pooled over the group's fields), ``chi2_per_dof`` = mean
        whitened chi^2 (1 for fields from the simulator), and if ``baseline``
        ``baseline_spectrum_log10_error``, ``baseline_std_ratio``), plus overall
        ``spectrum_log10_error`` (mean over thetas), ``std_ratio_mean``,
        ``std_ratio_min``, ``std_ratio_max``, ``std_ratio_log_error``
        (mean ``|log std_ratio|``), ``chi2_per_dof`` (mean), ``baseline_spectrum_log10_error``,
        ``num_thetas``, ``num_samples``, ``reference``.
    """
    f = _fields(samples)
    theta = np.asarray(theta, dtype=np.float64).reshape(len(f), -1)
    if theta.shape[1] != 2:
        raise ValueError(f"theta must be (N, 2), got {theta.shape}")
    size = f.shape[-1]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7919]))
    uniq, group = _group_by_theta(theta)
    _, p_gen_all = radial_power_spectrum(f)
    chi2_all = whitened_chi2(f, theta)
    per_theta = []
    for i, t in enumerate(uniq):
        sel = group == i
        fg = f[sel]
        p_gen = p_gen_all[sel].mean(axis=0)
        p_ref, std_ref = _grf_reference(t, n_sim, rng, size)
        entry = {
            "log_amplitude": float(t[0]),
            "slope": float(t[1]),
            "num_samples": int(sel.sum()),
            "spectrum_log10_error": _log10_error(p_gen, p_ref),
            "std_ratio": float(fg.std() / std_ref),
            "chi2_per_dof": float(chi2_all[sel].mean()),
        }
        if baseline:
            base = simulate(np.repeat(t[None], int(sel.sum()), axis=0), rng, size)[..., 0].astype(np.float64)
            entry["baseline_spectrum_log10_error"] = _log10_error(radial_power_spectrum(base)[1].mean(axis=0), p_ref)
            entry["baseline_std_ratio"] = float(base.std() / std_ref)
        per_theta.append(entry)
    return _grf_summary(per_theta, n_sim, len(f), baseline)


def _log10_error(p: np.ndarray, ref: np.ndarray) -> float:
    tiny = np.finfo(np.float64).tiny
    return float(np.mean(np.abs(np.log10(np.maximum(p, tiny)) - np.log10(np.maximum(ref, tiny)))))


# --------------------------------------------------------------------------- plots


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _to_unit(images: np.ndarray, value_range) -> np.ndarray:
    """Map images ``(N, H, W, C)`` (C in {1, 3}) or ``(N, H, W)`` to RGB ``(N, H, W, 3)`` in [0, 1]."""
    a = np.asarray(images, dtype=np.float64)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W[, 1 or 3]), got shape {np.shape(images)}")
    if value_range is None:  # per-image min/max
        lo = a.min(axis=(1, 2, 3), keepdims=True)
        hi = a.max(axis=(1, 2, 3), keepdims=True)
    else:
        lo, hi = (float(v) for v in value_range)
    a = np.clip((a - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def _mosaic(images: np.ndarray, nrows: int, ncols: int, gap: int) -> np.ndarray:
    n, h, w, _ = images.shape
    out = np.ones((nrows * (h + gap) + gap, ncols * (w + gap) + gap, 3))
    for i in range(n):
        r, c = divmod(i, ncols)
        y0, x0 = gap + r * (h + gap), gap + c * (w + gap)
        out[y0 : y0 + h, x0 : x0 + w] = images[i]
    return out


def _label_text(lab, class_names) -> str:
    lab = np.asarray(lab)
    if lab.ndim == 0:
        if np.issubdtype(lab.dtype, np.integer):
            return class_names[int(lab)] if class_names is not None else str(int(lab))
        return f"{float(lab):.3g}"
    return ",".join(f"{v:.2g}" for v in lab.reshape(-1))


def plot_sample_grid(
    samples: np.ndarray,
    path: str | os.PathLike,
    real: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    real_labels: np.ndarray | None = None,
    ncols: int = 8,
    value_range: tuple[float, float] | None = (-1.0, 1.0),
    class_names: list[str] | None = None,
    max_images: int = 64,
) -> str:
    """Save a PNG grid of samples (left panel) next to real images (right panel, if ``real`` given).

    Args:
        samples: ``(N, H, W, C)`` with C in {1, 3} (or ``(N, H, W)``).
        path: output PNG path (parent folders are created).
        real: optional real images ``(M, H, W, C)`` shown in a second panel.
        labels: optional per-sample labels (ints, or theta rows) written above each tile.
        real_labels: optional labels for the real panel.
        ncols: grid columns per panel.
        value_range: data range mapped to black..white (``None``: each image's own
            min/max, useful for GRFs in physical units).
        class_names: names used for integer labels.
        max_images: at most this many images per panel.

    Returns:
        The path written, as ``str``.
    """
    panels = [("generated", np.asarray(samples)[:max_images], labels)]
    if real is not None:
        panels.append(("real", np.asarray(real)[:max_images], real_labels))
    panels = [(t, _to_unit(im, value_range), None if lab is None else np.asarray(lab)[: len(im)]) for t, im, lab in panels]
    ncols = max(1, min(int(ncols), max(len(im) for _, im, _ in panels)))
    nrows = max(int(np.ceil(len(im) / ncols)) for _, im, _ in panels)
    h, w = panels[0][1].shape[1:3]
    gap = max(1, h // 8)
    fig = _new_figure((1.0 * ncols * len(panels) + 0.4, 1.05 * nrows + 0.5))
    for j, (title, imgs, labs) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        ax.imshow(_mosaic(imgs, nrows, ncols, gap), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
        if labs is not None:
            for i in range(len(imgs)):
                r, c = divmod(i, ncols)
                ax.text(
                    gap + c * (w + gap) + w / 2, gap + r * (h + gap) - 0.15 * gap, _label_text(labs[i], class_names),
                    ha="center", va="bottom", fontsize=6, color="tab:red",
                )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return str(path)


def plot_power_spectra(
    samples: np.ndarray,
    theta: np.ndarray,
    path: str | os.PathLike,
    *,
    max_curves: int = 6,
) -> str:
    """Save a log-log PNG of generated vs simulator radially averaged power spectra.

    For each of the first ``max_curves`` distinct rows of ``theta`` (samples
    ``(N, S, S[, 1])`` grouped as in :func:`grf_metrics`), plots the mean spectrum
    of the generated fields (solid, with markers) and the simulator's exact
    expectation (dashed) in the same colour.  Returns the path written (``str``).
    """
    f = _fields(samples)
    theta = np.asarray(theta, dtype=np.float64).reshape(len(f), -1)
    uniq, group = _group_by_theta(theta)
    k, p_all = radial_power_spectrum(f)
    fig = _new_figure((6.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i}" for i in range(10)]
    for i, t in enumerate(uniq[:max_curves]):
        c = colours[i % len(colours)]
        sel = group == i
        ax.loglog(k, p_all[sel].mean(axis=0), "o-", color=c, ms=3, label=f"gen  logA={t[0]:.2f}, n={t[1]:.2f} ({int(sel.sum())})")
        ax.loglog(k, expected_power_spectrum(t, f.shape[-1])[1], "--", color=c, label="simulator" if i == 0 else None)
    ax.set_xlabel("|k| (cycles per box)")
    ax.set_ylabel("P(k)")
    ax.set_title("radially averaged power spectrum: generated (solid) vs simulator (dashed)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return str(path)

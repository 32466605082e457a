"""Figures of inference results: corner plots (corner), SBC rank histograms, TARP curves, PPC spectra.

Figures are drawn on their own Agg canvas (the global matplotlib backend is not changed) and
returned; with ``path`` they are saved there too.
"""

from __future__ import annotations

import corner
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import stats

__all__ = ["corner_plot", "ppc_plot", "rank_histograms", "tarp_plot"]


def _figure(figsize=None) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path):
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def corner_plot(samples, *, names=None, truth=None, exact_samples=None, path=None, title=None):
    """Corner plot of posterior ``samples`` ``(S, K)``; ``exact_samples`` overlaid as red contours.

    ``truth`` marks the true theta.  Returns the figure (saved to ``path`` when given).
    """
    samples = np.asarray(samples, np.float64)
    data = samples if exact_samples is None else np.concatenate([samples, np.asarray(exact_samples)])
    lo, hi = data.min(axis=0), data.max(axis=0)
    pad = 0.05 * np.where(hi > lo, hi - lo, 1.0)
    ranges = list(zip(lo - pad, hi + pad))
    levels = (0.393, 0.865)  # the 1- and 2-sigma contours of a 2-D Gaussian
    k = samples.shape[1]
    fig = corner.corner(samples, fig=_figure((2.5 * k + 1, 2.5 * k + 1)), labels=names, truths=truth, range=ranges,
                        levels=levels, color="C0",
                        plot_datapoints=False, fill_contours=False, smooth=1.0, hist_kwargs={"density": True})
    if exact_samples is not None:
        corner.corner(np.asarray(exact_samples), fig=fig, range=ranges, levels=levels, color="C3",
                      plot_datapoints=False, plot_density=False, fill_contours=False, smooth=1.0,
                      hist_kwargs={"density": True})
        fig.legend(handles=[Line2D([], [], color="C0", label="posterior"),
                            Line2D([], [], color="C3", label="exact")], loc="upper right")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def rank_histograms(ranks, num_draws: int, *, names=None, bins: int = 20, path=None):
    """SBC rank histograms, one panel per parameter, with the uniform expectation and its 99 % band."""
    ranks = np.asarray(ranks)
    n, k = ranks.shape
    names = names or [f"theta{i}" for i in range(k)]
    fig = _figure((4 * k, 3))
    axes = fig.subplots(1, k, squeeze=False)
    edges = np.linspace(0, num_draws + 1, bins + 1)
    expected = n / bins
    lo, hi = stats.binom.ppf([0.005, 0.995], n, 1 / bins)
    for i, ax in enumerate(axes[0]):
        ax.axhspan(lo, hi, color="0.85")
        ax.axhline(expected, color="0.4", lw=1)
        ax.hist(ranks[:, i], bins=edges, histtype="step", color="C0", lw=1.5)
        ax.set_xlabel(f"rank of {names[i]}")
    axes[0][0].set_ylabel("simulations")
    fig.tight_layout()
    return _finish(fig, path)


def tarp_plot(alpha, ecp, *, path=None):
    """TARP expected coverage against the credibility level, with the diagonal."""
    fig = _figure((4, 4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1)
    ax.plot(alpha, ecp, color="C0")
    ax.set_xlabel("credibility level")
    ax.set_ylabel("expected coverage")
    ax.set_aspect("equal")
    fig.tight_layout()
    return _finish(fig, path)


def ppc_plot(check: dict, *, path=None):
    """Observed radial power spectrum against the posterior-predictive 95 % band (:func:`ppc_spectrum`)."""
    fig = _figure((5, 4))
    ax = fig.subplots()
    ax.fill_between(check["k"], check["q025"], check["q975"], color="C0", alpha=0.3, label="predictive 95 %")
    ax.plot(check["k"], check["median"], color="C0")
    ax.plot(check["k"], check["observed"], color="k", marker=".", label="observed")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("P(k)")
    ax.legend()
    fig.tight_layout()
    return _finish(fig, path)

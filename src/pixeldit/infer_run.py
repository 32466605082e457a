"""The operations behind ``pixeldit infer``, ``calibrate`` and ``likelihood``: inference from a run.

A theta-conditional run is a neural likelihood: the *emulator route* takes the uniform prior
over the run's theta box times the learned ``log p(field | theta)``
(:func:`pixeldit.inference.log_prob`) and finds the posterior on a zooming grid for 1-3
parameters (:func:`pixeldit.inference.grid_posterior`), by MCMC above
(:func:`pixeldit.inference.mcmc_posterior`).  A folder holding an amortised posterior
(``posterior.safetensors``, :mod:`pixeldit.posterior_training`) takes the *amortised route*:
draws of ``p(theta | field)`` in one ODE solve per field (:mod:`pixeldit.inference.amortized`).

Outputs of :func:`infer_run` (``out``, default ``WORKDIR/infer``): ``posterior.npz`` (``theta``
``(N, S, K)``, per observation ``mean`` / ``std`` ``(N, K)``), ``summary.json`` (per observation:
mean, std, 68 / 95 % intervals, the log-evidence where the grid gives it) and corner plots of
the first observations, with the exact posterior's contours when the run's data is the
built-in ``grf``.  :func:`calibrate_run` (``WORKDIR/calibrate``) runs SBC and TARP on fresh
simulations; :func:`likelihood_run` evaluates ``log p(x | theta)`` on a list of thetas.

Every function is a plain library call; :mod:`pixeldit.cli` only parses and prints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from pixeldit.conditions import data_scale_of, dataset_meta
from pixeldit.data import DataError, make_rng
from pixeldit.data import grf
from pixeldit.inference import (DIVERGENCES, PROBES, Emulator, Posterior, emulator_log_likelihood, grid_posterior,
                                log_prob, mcmc_posterior)
from pixeldit.inference.amortized import sample_posterior
from pixeldit.inference.probes import DEFAULT_PROBE
from pixeldit.inference.calibration import calibrate, exact_grf_posterior
from pixeldit.inference.posterior import INTERVALS
from pixeldit.inference.plots import corner_plot, rank_histograms, tarp_plot
from pixeldit.posterior_training import CHECKPOINT_NAME as POSTERIOR_CHECKPOINT, load_posterior
from pixeldit.runconfig import ConfigError
from pixeldit.training import load_checkpoint

__all__ = ["InferenceRun", "calibrate_run", "emulator_from_checkpoint", "infer_run", "likelihood_run",
           "load_inference_run", "posterior_from_samples", "read_observed"]

INFER_DIR = "infer"
CALIBRATE_DIR = "calibrate"
GRID_MAX_PARAMS = 3  # the zooming grid up to this many parameters, MCMC above
CALIBRATION_SEED_STREAM = 23  # fresh simulations: a seed stream apart from the training data's


def emulator_from_checkpoint(ckpt) -> Emulator:
    """The :class:`pixeldit.inference.Emulator` of a loaded theta-run checkpoint.

    Theta: a model whose config carries ``theta_center`` encodes raw theta itself; older runs
    record the encoding beside the data (``dataset.theta_encoding``), applied here.  Data
    scale: the model was trained on ``x / data_scale`` (checkpoint metadata; 1 when absent).
    Mean mode: the built-in GRF has an exactly zero spatial mean, so its density lives on the
    zero-mean subspace (:data:`pixeldit.inference.MEAN_MODES`); other data uses the full density.
    """
    dmeta = dataset_meta(ckpt.meta)
    encoding = dmeta.get("theta_encoding") if ckpt.model_config.theta_center is None else None
    return Emulator(ckpt.model, theta_encoding=encoding, data_scale=data_scale_of(ckpt),
                    mean_mode="zero_mean" if dmeta.get("name") == "grf" else "full")


def _theta_box(model_config, dmeta: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The uniform prior: the data's prior box (GRF), else the box the model's theta encoding maps to [-1, 1]."""
    if "prior_low" in dmeta and "prior_high" in dmeta:
        return np.asarray(dmeta["prior_low"], np.float64), np.asarray(dmeta["prior_high"], np.float64)
    enc = dmeta.get("theta_encoding") or {}
    center = model_config.theta_center if model_config.theta_center is not None else enc.get("center")
    scale = model_config.theta_scale if model_config.theta_scale is not None else enc.get("scale")
    if center is None or scale is None:
        raise ConfigError("the run records no theta box (no prior bounds and no affine theta encoding): "
                          "inference needs the uniform prior's box")
    center, scale = np.asarray(center, np.float64), np.asarray(scale, np.float64)
    return center - scale, center + scale


@dataclasses.dataclass(frozen=True)
class InferenceRun:
    """A run loaded for inference: its route, model and uniform prior box.

    ``route``: ``"emulator"`` (a theta-conditional run, ``model`` an :class:`Emulator`) or
    ``"amortized"`` (a ``grf-posterior``-style run, ``model`` a
    :class:`pixeldit.posterior_model.AmortizedPosterior`: draws in one ODE solve per field).
    ``image_shape`` ``(H, W, C)`` of the fields it takes; ``data`` the training data's name
    (``"grf"``: the exact posterior is known); ``names`` the parameters' names.
    """

    route: str
    model: Any
    low: np.ndarray
    high: np.ndarray
    names: list
    image_shape: tuple
    data: str | None
    step: int
    workdir: Path

    def posterior(self, field, *, num_samples: int, seed: int = 0, divergence: str = "hutchinson",
                  probes: int = 4, probe: str = DEFAULT_PROBE, grid: Mapping[str, Any] | None = None) -> Posterior:
        """The posterior of one field ``(H, W, C)``.

        Amortised draws, or the grid (<= 3 parameters) or MCMC over the emulator's likelihood
        (``divergence``, ``probes``, ``probe``; ``grid`` options of :func:`pixeldit.inference.grid_posterior`).
        """
        if self.route == "amortized":
            draws = sample_posterior(self.model, np.asarray(field, np.float32)[None], num_samples, jax.random.key(seed))
            return posterior_from_samples(np.asarray(draws[0], np.float64))
        options = {"divergence": divergence}
        if divergence == "hutchinson":
            options.update(probes=probes, probe=probe, key=jax.random.key(seed))
        ll = emulator_log_likelihood(self.model, field, **options)
        if len(self.low) <= GRID_MAX_PARAMS:
            return grid_posterior(ll, self.low, self.high, num_samples=num_samples, seed=seed, **dict(grid or {}))
        return mcmc_posterior(ll, self.low, self.high, num_samples=num_samples, seed=seed)


def posterior_from_samples(samples) -> Posterior:
    """A :class:`Posterior` summary of draws ``(S, K)`` (mean, std, central intervals; no evidence)."""
    samples = np.asarray(samples, np.float64)
    intervals = {level: np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0).T for level in INTERVALS}
    return Posterior(samples=samples, mean=samples.mean(axis=0), std=samples.std(axis=0), intervals=intervals,
                     log_evidence=None, num_evaluations=0, extra={"method": "amortized"})


def _load_amortized(workdir: Path) -> InferenceRun:
    try:
        model = load_posterior(workdir)
    except ValueError as e:  # not a readable amortised posterior: one line, like a bad run config
        raise ConfigError(str(e)) from None
    cfg = model.config
    return InferenceRun(route="amortized", model=model, low=np.asarray(cfg.prior_low, np.float64),
                        high=np.asarray(cfg.prior_high, np.float64), names=list(cfg.theta_names),
                        image_shape=tuple(cfg.field_shape), data="grf", step=0, workdir=workdir)


def load_inference_run(workdir: str | os.PathLike, *, step: int | None = None, ema: bool = True) -> InferenceRun:
    """Load ``workdir`` for inference; the run's kind picks the route (a class-conditional run is refused).

    A folder with an amortised posterior checkpoint (``posterior.safetensors``) takes the
    amortised route; a theta-conditional run the emulator route.
    """
    workdir = Path(workdir)
    if (workdir / POSTERIOR_CHECKPOINT).is_file():
        return _load_amortized(workdir)
    ckpt = load_checkpoint(workdir, step=step, ema=ema)
    kind = ckpt.model_config.kind
    if kind != "theta":
        what = "class-conditional" if kind == "c2i" else "text-to-image" if kind == "t2i" else kind
        raise ConfigError(f"'{workdir}' is a {what} run; field inference needs a theta-conditional run "
                          "(e.g. `pixeldit train grf`)")
    dmeta = dataset_meta(ckpt.meta)
    low, high = _theta_box(ckpt.model_config, dmeta)
    shape = dmeta.get("image_shape")
    if not shape:
        raise ConfigError(f"the checkpoint in '{workdir}' records no field size")
    names = list(dmeta.get("theta_names") or [f"theta{i}" for i in range(len(low))])
    image_shape = (int(shape[0]), int(shape[1]), int(ckpt.model_config.in_channels))
    return InferenceRun(route="emulator", model=emulator_from_checkpoint(ckpt), low=low, high=high, names=names,
                        image_shape=image_shape, data=dmeta.get("name"), step=int(ckpt.step), workdir=workdir)


def read_observed(path: str | os.PathLike, image_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Observed fields ``x`` ``(N, H, W, C)`` from ``path`` (.npz), checked against the run's ``(H, W, C)``.

    ``(N, H, W)`` is read as one channel.  Returns ``(x, theta)`` with the file's ``theta``
    ``(N, K)`` when it has one (the true values, marked in the plots), else ``None``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such observed-data file: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"'{path}' is not a readable .npz file ({e})") from None
    with data:
        if "x" not in data:
            raise DataError(f"'{path}' has no array 'x' (observed fields (N, H, W[, C])); it has {sorted(data.files)}")
        x = np.asarray(data["x"])
        theta = np.asarray(data["theta"], np.float64) if "theta" in data else None
    h, w, c = (int(v) for v in image_shape)
    if x.ndim == 3 and c == 1:
        x = x[..., None]
    if x.ndim != 4 or len(x) < 1:
        raise DataError(f"'{path}': x must be fields (N, H, W[, C]), got shape {x.shape}")
    if x.shape[1:] != (h, w, c):
        raise DataError(f"'{path}': fields are {x.shape[1]}x{x.shape[2]} with {x.shape[3]} channel(s), but the run "
                        f"was trained on {h}x{w} with {c}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"'{path}': x must be numeric fields, got dtype {x.dtype}")
    bad = np.flatnonzero(~np.all(np.isfinite(x.reshape(len(x), -1)), axis=1))
    if len(bad):
        raise DataError(f"'{path}': x has NaN or infinite values (fields {bad[:5].tolist()}"
                        f"{' ...' if len(bad) > 5 else ''})")
    if theta is not None and theta.shape[0] != len(x):
        theta = None  # not one true theta per field: not a truth to mark
    return x.astype(np.float32), theta


def _check_options(divergence: str, probes: int, guidance: float = 1.0, grid: Mapping[str, Any] | None = None,
                   probe: str = DEFAULT_PROBE) -> None:
    """One-line errors for likelihood options (before any model is loaded)."""
    if guidance != 1.0:
        raise ConfigError(f"inference needs guidance 1 (the model's own velocity), got {guidance}: a classifier-free-"
                          "guided velocity is not the probability flow of any density")
    if divergence not in DIVERGENCES:
        raise ConfigError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if divergence == "hutchinson" and probes < 1:
        raise ConfigError(f"the Hutchinson divergence needs probes >= 1, got {probes}")
    if probe not in PROBES:
        raise ConfigError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}")
    cells = {k: v for k, v in dict(grid or {}).items() if k in ("coarse", "fine")}
    if any(int(v) < 3 for v in cells.values()):
        raise ConfigError(f"grid cells per parameter must be >= 3, got {cells}")


def _likelihood_meta(divergence: str, probes: int, probe: str) -> dict[str, Any]:
    hutchinson = divergence == "hutchinson"
    return {"divergence": divergence, "probes": probes if hutchinson else None, "probe": probe if hutchinson else None}


def _exact_posterior(run: InferenceRun, field, num_samples: int, seed: int) -> Posterior | None:
    """The exact GRF posterior of one field when the run's data is the built-in grf, else ``None``."""
    if run.data != "grf":
        return None
    return exact_grf_posterior(field, run.low, run.high, num_samples=num_samples, seed=seed)


def infer_run(workdir: str | os.PathLike, observed: str | os.PathLike, *, num_samples: int = 1000,
              out: str | os.PathLike | None = None, step: int | None = None, ema: bool = True, plots: int = 4,
              seed: int = 0, divergence: str = "hutchinson", probes: int = 4, guidance: float = 1.0,
              grid: Mapping[str, Any] | None = None, progress: bool = True, probe: str = DEFAULT_PROBE) -> dict[str, Any]:
    """Posterior of theta for every field of ``observed`` (.npz with ``x``) under the run ``workdir``.

    Writes ``posterior.npz``, ``summary.json`` and ``corner_<i>.png`` for the first ``plots``
    observations into ``out`` (module docstring).  ``divergence`` / ``probes`` / ``probe`` set the
    emulator's likelihood (:func:`pixeldit.inference.log_prob`), ``grid`` options of
    :func:`pixeldit.inference.grid_posterior`.  Returns the summary with the paths.
    """
    _check_options(divergence, probes, guidance, grid, probe)
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    run = load_inference_run(workdir, step=step, ema=ema)
    x, truth = read_observed(observed, run.image_shape)
    out = Path(out) if out is not None else run.workdir / INFER_DIR
    out.mkdir(parents=True, exist_ok=True)
    samples, means, stds, per_obs, figures = [], [], [], [], []
    for i in tqdm(range(len(x)), desc="posterior", unit="field", disable=not progress):
        post = run.posterior(x[i], num_samples=num_samples, seed=seed, divergence=divergence, probes=probes, probe=probe,
                             grid=grid)
        samples.append(post.samples)
        means.append(post.mean)
        stds.append(post.std)
        entry = {"index": i, **post.summary(run.names), "evaluations": post.num_evaluations}
        if truth is not None:
            entry["true_theta"] = truth[i].tolist()
        if i < plots:
            exact = _exact_posterior(run, x[i], num_samples, seed)
            if exact is not None:
                entry["exact"] = {"mean": exact.mean.tolist(), "std": exact.std.tolist()}
            path = out / f"corner_{i}.png"
            corner_plot(post.samples, names=run.names, truth=None if truth is None else truth[i],
                        exact_samples=None if exact is None else exact.samples, path=path,
                        title=f"observation {i}")
            figures.append(str(path))
        per_obs.append(entry)
    theta = np.stack(samples)  # (N, S, K)
    np.savez(out / "posterior.npz", theta=theta, mean=np.stack(means), std=np.stack(stds), names=np.asarray(run.names))
    summary = {"workdir": str(run.workdir), "step": run.step, "route": run.route, "observed": str(observed),
               "num_observations": len(x), "num_samples": num_samples, "parameters": run.names,
               "prior_low": run.low.tolist(), "prior_high": run.high.tolist(),
               "likelihood": _likelihood_meta(divergence, probes, probe), "observations": per_obs}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return dict(summary, posterior_npz=str(out / "posterior.npz"), summary_json=str(out / "summary.json"),
                plots=figures)



def calibrate_run(workdir: str | os.PathLike, *, num: int = 100, num_samples: int = 200,
                  out: str | os.PathLike | None = None, step: int | None = None, ema: bool = True, seed: int = 0,
                  divergence: str = "hutchinson", probes: int = 4, grid: Mapping[str, Any] | None = None,
                  progress: bool = True, probe: str = DEFAULT_PROBE) -> dict[str, Any]:
    """SBC and TARP of the run's posterior on ``num`` fresh simulations from the run's simulator.

    Thetas are drawn from the prior box, one field simulated at each (seeded by ``seed``, on a
    stream apart from the training data's); each field's posterior gives ``num_samples``
    draws.  Writes ``calibration.json`` (KS p per parameter, TARP deviation, PASS/FAIL lines:
    KS p >= 0.01, TARP within 0.05 of the diagonal), ``ranks.png``, ``tarp.png`` and
    ``posterior.npz`` (``theta`` ``(num, S, K)``, ``theta_true``, ``x``) into ``out``
    (default ``WORKDIR/calibrate``).  Returns the report with the paths.
    """
    if num < 2 or num_samples < 1:
        raise ConfigError(f"calibration needs num >= 2 simulations and num_samples >= 1, got {num} and {num_samples}")
    _check_options(divergence, probes, grid=grid, probe=probe)
    run = load_inference_run(workdir, step=step, ema=ema)
    if run.data != "grf":
        raise ConfigError(f"calibrate simulates fresh fields, and only the built-in grf data has a simulator here "
                          f"(this run's data: {run.data!r})")
    rng = make_rng(seed, CALIBRATION_SEED_STREAM)
    theta_true = grf.sample_prior(rng, num, run.low, run.high)
    x = grf.simulate(theta_true, rng, run.image_shape[0])
    samples = [run.posterior(x[i], num_samples=num_samples, seed=seed + i, divergence=divergence, probes=probes,
                             probe=probe, grid=grid).samples
               for i in tqdm(range(num), desc="calibrate", unit="sim", disable=not progress)]
    samples = np.stack(samples)
    cal = calibrate(samples, theta_true, run.low, run.high, seed=seed)
    out = Path(out) if out is not None else run.workdir / CALIBRATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    plots = {"ranks": str(out / "ranks.png"), "tarp": str(out / "tarp.png")}
    rank_histograms(cal.ranks, cal.num_draws, names=run.names, path=plots["ranks"])
    tarp_plot(cal.alpha, cal.ecp, path=plots["tarp"])
    np.savez(out / "posterior.npz", theta=samples, theta_true=theta_true, x=x)
    report = dict(cal.report(run.names), workdir=str(run.workdir), step=run.step, route=run.route, seed=seed,
                  likelihood=_likelihood_meta(divergence, probes, probe))
    (out / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    return dict(report, calibration_json=str(out / "calibration.json"), posterior_npz=str(out / "posterior.npz"),
                plots=plots)


def likelihood_run(workdir: str | os.PathLike, observed: str | os.PathLike, thetas, *, step: int | None = None,
                   ema: bool = True, divergence: str = "hutchinson", probes: int = 16, seed: int = 0,
                   guidance: float = 1.0, probe: str = DEFAULT_PROBE) -> dict[str, Any]:
    """``log p(x | theta)`` of every field of ``observed`` at each row of ``thetas`` ``(M, K)``.

    Returns ``theta`` ``(M, K)``, ``log_prob`` ``(N, M)`` in nats (data units; the GRF's on its
    zero-mean subspace), ``stderr`` (Hutchinson's, ``None`` for the exact divergence),
    ``bits_per_dim`` and, for the built-in grf data, the ``exact`` log-likelihood ``(N, M)``.
    """
    _check_options(divergence, probes, guidance, probe=probe)
    run = load_inference_run(workdir, step=step, ema=ema)
    if run.route != "emulator":
        raise ConfigError(f"'{workdir}' is an amortised posterior run; the likelihood needs a theta-conditional run")
    x, _ = read_observed(observed, run.image_shape)
    theta = np.asarray(thetas, np.float64)
    if theta.ndim != 2 or theta.shape[1] != len(run.low) or len(theta) < 1:
        raise ConfigError(f"theta rows must have {len(run.low)} values each ({', '.join(run.names)}), got shape "
                          f"{theta.shape}")
    if not np.all(np.isfinite(theta)):
        raise ConfigError("theta rows must be finite numbers")
    options = {"divergence": divergence}
    if divergence == "hutchinson":
        options.update(probes=probes, probe=probe, key=jax.random.key(seed))
    res = log_prob(run.model, x, theta.astype(np.float32), **options)
    exact = np.stack([grf.grf_log_likelihood(f, theta) for f in x]) if run.data == "grf" else None
    return {"workdir": str(run.workdir), "step": run.step, "theta": theta, "log_prob": res.value, "stderr": res.stderr,
            "bits_per_dim": res.bits_per_dim, "dim": res.dim, "exact": exact, "names": run.names,
            **_likelihood_meta(divergence, probes, probe)}

"""Accuracy of a trained `grf` emulator as a likelihood, against the exact GRF answer.

    PYTHONPATH=src python scripts/infer_check.py RUN_DIR [--train-steps N] [--fields 50]
        [--posterior-fields 20] [--divergence hutchinson --probes 4 --probe spectral] [--out check.json]

Loads the run's latest checkpoint (EMA weights unless --no-ema) (training it first with the built-in `grf` config and
``train.steps = N`` when RUN_DIR has none and --train-steps is given), simulates held-out
fields (a seed the training stream never uses), and reports:

* the mean over fields of the Pearson r between learned and exact log-likelihoods over a
  7 x 7 theta grid across each field's exact posterior (target >= 0.99);
* emulator-route grid posteriors on --posterior-fields fields scored against the exact
  posterior (|mean - exact| <= 0.3 std and std ratio in [0.8, 1.25] for >= 90 % of pairs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from pixeldit.conditions import dataset_meta
from pixeldit.infer_run import emulator_from_checkpoint
from pixeldit.training import load_checkpoint
from pixeldit.data import grf
from pixeldit.inference import emulator_log_likelihood, grid_posterior, log_prob
from pixeldit.inference.calibration import exact_grf_posterior, likelihood_correlation, posterior_scores
from pixeldit.runconfig import load_run_config
from pixeldit.runs import train_run

HELD_OUT_SEED = 20_261_202  # not a training stream seed (those are SeedSequence([seed, step]))


def load_emulator(workdir: Path, ema: bool = True):
    ckpt = load_checkpoint(workdir, ema=ema)
    data = dataset_meta(ckpt.meta)
    if data.get("name") != "grf":
        raise SystemExit(f"error: {workdir} is not a grf run (dataset {data.get('name')!r})")
    return emulator_from_checkpoint(ckpt), data


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--fields", type=int, default=50)
    p.add_argument("--posterior-fields", type=int, default=20)
    p.add_argument("--divergence", default="hutchinson", choices=["exact", "hutchinson"])
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--probe", default="spectral", choices=["spectral", "rademacher", "gaussian"])
    p.add_argument("--noise-fields", type=int, default=4, help="fields for the Hutchinson noise of differences")
    p.add_argument("--no-ema", action="store_true", help="the raw weights (a short run's EMA still holds the init)")
    p.add_argument("--grid", default="8,16", help="COARSE,FINE cells per parameter of the grid posterior")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    coarse, fine = (int(v) for v in a.grid.split(","))

    if not (a.workdir / "checkpoints").exists():
        if a.train_steps is None:
            raise SystemExit(f"error: no checkpoints in {a.workdir}; pass --train-steps to train one")
        train_run(load_run_config("grf", [f"train.steps={a.train_steps}"]), a.workdir, progress=False)
    emu, data = load_emulator(a.workdir, ema=not a.no_ema)
    size = int(data["image_shape"][0])
    low, high = data.get("prior_low", grf.PRIOR_LOW), data.get("prior_high", grf.PRIOR_HIGH)
    rng = np.random.default_rng(HELD_OUT_SEED)
    theta = grf.sample_prior(rng, a.fields, low, high)
    fields = grf.simulate(theta, rng, size)
    opts = dict(divergence=a.divergence)
    if a.divergence == "hutchinson":
        opts.update(probes=a.probes, probe=a.probe, key=jax.random.key(0))

    start = time.perf_counter()
    corr = likelihood_correlation(emu, fields, low, high, **opts)
    corr_s = time.perf_counter() - start
    print(f"likelihood: mean Pearson r over {a.fields} fields = {corr['mean_r']:.4f} (min {corr['r'].min():.4f}; "
          f"target >= 0.99) in {corr_s:.0f} s")

    noise = None
    if a.divergence == "hutchinson" and a.noise_fields > 0:
        # the same grids with other probes: the spread of (value - its mean over the grid) between two
        # probe draws is the Hutchinson noise that the posterior sees (offsets per field drop out)
        m = min(a.noise_fields, a.fields)
        other = dict(opts, key=jax.random.key(1))
        again = np.concatenate([log_prob(emu, fields[i:i + 4], corr["thetas"][i:i + 4], **other).value
                                for i in range(0, m, 4)])
        centred = lambda v: v - v.mean(axis=1, keepdims=True)  # noqa: E731
        noise = float(np.std(centred(corr["learned"][:m]) - centred(again)) / np.sqrt(2))
        print(f"Hutchinson ({a.probes} probes) noise of log-likelihood differences over the posterior region: "
              f"{noise:.3f} nats (exact log-likelihood spread over the same grids: "
              f"{np.mean(corr['exact_spread'][:m]):.1f} nats)")

    n = min(a.posterior_fields, a.fields)
    if n == 0:  # the likelihood check only
        result = {"workdir": str(a.workdir), "divergence": a.divergence, "probes": a.probes, "probe": a.probe,
                  "fields": a.fields, "mean_r": corr["mean_r"], "r": corr["r"].tolist(), "likelihood_seconds": corr_s,
                  "hutchinson_noise_nats": noise, "passed_likelihood": corr["mean_r"] >= 0.99}
        if a.out is not None:
            a.out.write_text(json.dumps(result, indent=1))
        return result
    got, exact, secs = [], [], []
    for f in fields[:n]:
        start = time.perf_counter()
        got.append(grid_posterior(emulator_log_likelihood(emu, f, **opts), low, high, coarse=coarse, fine=fine))
        secs.append(time.perf_counter() - start)
        exact.append(exact_grf_posterior(f, low, high))
    scores = posterior_scores(np.stack([q.mean for q in got]), np.stack([q.std for q in got]),
                              np.stack([q.mean for q in exact]), np.stack([q.std for q in exact]))
    print(f"emulator posterior on {n} fields: {100 * scores['fraction_ok_all']:.0f} % of (field, parameter) pairs "
          f"pass (per parameter {np.round(100 * scores['fraction_ok'], 0).tolist()} %; target >= 90 %); "
          f"median |mean - exact| = {np.median(scores['mean_z']):.2f} exact std, std ratio median "
          f"{np.median(scores['std_ratio']):.2f}; {np.median(secs):.1f} s per field (median)")
    result = {
        "workdir": str(a.workdir), "divergence": a.divergence,
        "probes": a.probes if a.divergence == "hutchinson" else None,
        "probe": a.probe if a.divergence == "hutchinson" else None, "grid": [coarse, fine],
        "evaluations": [q.num_evaluations for q in got], "fields": a.fields, "mean_r": corr["mean_r"],
        "hutchinson_noise_nats": noise, "r": corr["r"].tolist(), "likelihood_seconds": corr_s,
        "posterior_fields": n, "fraction_ok": scores["fraction_ok"].tolist(),
        "fraction_ok_all": scores["fraction_ok_all"],
        "mean_z": scores["mean_z"].tolist(), "std_ratio": scores["std_ratio"].tolist(),
        "posterior_seconds": secs, "passed_likelihood": corr["mean_r"] >= 0.99, "passed_posterior": scores["passed"],
    }
    if a.out is not None:
        a.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

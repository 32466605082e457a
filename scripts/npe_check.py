"""Check a trained amortised GRF posterior against the exact posterior, and its calibration.

``python scripts/npe_check.py RUN_DIR [--fields 100] [--sbc 300] [--draws 4000] [--out FILE.json]``

* Exact posterior of each field (``pixeldit.inference.calibration.exact_grf_posterior``: the
  GRF likelihood times the uniform prior on the zooming grid); its mean and std against the
  model's (``posterior_scores``), over ``--fields`` fields drawn from the prior (seeded apart
  from training).  ``--exact-cache`` keeps the exact means and stds (or covariances) in an npz.
* The model's exact log-density against the exact log posterior (first 10 fields).
* SBC and TARP (``pixeldit.inference.calibration.calibrate``) over ``--sbc`` simulations.
* Draws per second for one field.
"""

import argparse
import json
import os
import time

import jax
import numpy as np

from pixeldit.data.grf import grf_log_likelihood, sample_prior, simulate
from pixeldit.inference.calibration import calibrate, exact_grf_posterior, posterior_scores
from pixeldit.inference.amortized import posterior_log_prob, sample_posterior
from pixeldit.posterior_training import load_posterior

CHECK_SEED = 20261202  # fields of the check, independent of the training stream (GRFDataset seed 0)


def exact_moments(fields, low, high, cache=None):
    """Exact posterior means and stds ``(N, K)`` of ``fields`` (the library's grid), cached in an npz."""
    if cache and os.path.exists(cache):
        with np.load(cache) as z:
            std = z["std"] if "std" in z else np.sqrt(np.diagonal(z["cov"], axis1=1, axis2=2))
            if len(z["mean"]) != len(fields):
                raise SystemExit(f"error: {cache} holds {len(z['mean'])} fields, the check uses {len(fields)}")
            return z["mean"], std
    exact = [exact_grf_posterior(f, low, high) for f in fields]
    mean, std = np.stack([p.mean for p in exact]), np.stack([p.std for p in exact])
    if cache:
        np.savez(cache, mean=mean, std=std)
    return mean, std


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--fields", type=int, default=100)
    ap.add_argument("--sbc", type=int, default=300)
    ap.add_argument("--draws", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--exact-cache", default=None, help="npz of the exact means and stds (same --fields); written if absent")
    args = ap.parse_args()
    model = load_posterior(args.run)
    cfg = model.config
    low, high = np.asarray(cfg.prior_low), np.asarray(cfg.prior_high)
    rng = np.random.default_rng(CHECK_SEED)
    key = jax.random.key(CHECK_SEED)
    report = {"run": args.run, "steps": args.steps}

    # exact posterior comparison
    theta = sample_prior(rng, args.fields, low, high)
    fields = simulate(theta, rng, cfg.image_size)
    t0 = time.perf_counter()
    ex_mean, ex_std = exact_moments(fields[..., 0].astype(np.float64), low, high, args.exact_cache)
    t_exact = time.perf_counter() - t0
    draws = np.asarray(sample_posterior(model, fields, args.draws, key, steps=args.steps), np.float64)
    sc = posterior_scores(draws.mean(1), draws.std(1), ex_mean, ex_std)
    z, ratio = sc["mean_z"], sc["std_ratio"]
    report["exact"] = {
        "fields": args.fields,
        "draws_per_field": args.draws,
        "frac_mean_ok": float(np.mean(sc["mean_ok"])),
        "frac_std_ok": float(np.mean(sc["std_ok"])),
        "frac_both_ok": sc["fraction_ok_all"],
        "frac_both_ok_per_param": sc["fraction_ok"].tolist(),
        "passed": sc["passed"],
        "median_abs_mean_err_in_std": np.median(z, axis=0).tolist(),
        "p90_abs_mean_err_in_std": np.quantile(z, 0.9, axis=0).tolist(),
        "median_std_ratio": np.median(ratio, axis=0).tolist(),
        "std_ratio_p05_p95": np.quantile(ratio, [0.05, 0.95], axis=0).tolist(),
        "exact_std_median": np.median(ex_std, axis=0).tolist(),
        "exact_grid_seconds": round(t_exact, 1),
    }

    # exact log-density against the exact log posterior, first 10 fields, 5 x 5 points at mean +- 2 std
    offsets = np.stack(np.meshgrid(*[np.linspace(-2, 2, 5)] * 2, indexing="ij"), -1).reshape(-1, 2)
    log_volume = float(np.sum(np.log(high - low)))  # the uniform prior's density is exp(-log_volume)
    diffs, corrs = [], []
    for i in range(min(10, args.fields)):
        field = fields[i, ..., 0].astype(np.float64)
        post = exact_grf_posterior(field, low, high)
        pts = np.clip(post.mean + offsets * post.std, low + 1e-6, high - 1e-6)
        ex_lp = grf_log_likelihood(field, pts) - log_volume - post.log_evidence
        q_lp = np.asarray(posterior_log_prob(model, pts[None].astype(np.float32), fields[i : i + 1]))[0]
        diffs.append(np.abs(q_lp - ex_lp))
        corrs.append(np.corrcoef(q_lp, ex_lp)[0, 1])
    report["log_prob"] = {
        "fields": len(corrs),
        "points_per_field": len(offsets),
        "median_abs_diff_nats": float(np.median(np.concatenate(diffs))),
        "mean_pearson_r": float(np.mean(corrs)),
    }

    # SBC and TARP
    key_sbc = jax.random.fold_in(key, 1)
    theta_s = sample_prior(rng, args.sbc, low, high)
    fields_s = simulate(theta_s, rng, cfg.image_size)
    draws_s = np.concatenate([
        np.asarray(sample_posterior(model, fields_s[i : i + 100], 1000, jax.random.fold_in(key_sbc, i), steps=args.steps))
        for i in range(0, args.sbc, 100)
    ]).astype(np.float64)
    cal = calibrate(draws_s, theta_s, low, high, seed=CHECK_SEED)
    hist = [np.histogram(cal.ranks[:, j], bins=20, range=(0, cal.num_draws + 1))[0].tolist()
            for j in range(cal.ranks.shape[1])]
    report["sbc"] = {"sims": args.sbc, "ks_p": cal.ks_p.tolist(), "rank_hist_20": hist}
    report["tarp"] = {"max_gap": cal.tarp_deviation, "ecp_at_0.5": float(cal.ecp[50]), "ecp_at_0.9": float(cal.ecp[90])}
    report["checks"] = cal.report(list(cfg.theta_names))["checks"]

    # speed: one field, after compilation
    one = fields[:1]
    for n in (1000, 10000):
        sample_posterior(model, one, n, key, steps=args.steps).block_until_ready()
        t0 = time.perf_counter()
        reps = 5
        for r in range(reps):
            sample_posterior(model, one, n, jax.random.fold_in(key, r), steps=args.steps).block_until_ready()
        dt = (time.perf_counter() - t0) / reps
        report[f"draws_per_second_{n}"] = round(n / dt)
        report[f"seconds_for_{n}_draws"] = round(dt, 4)
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()

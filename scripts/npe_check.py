"""Check a trained amortised GRF posterior against the exact posterior, and its calibration.

``python scripts/npe_check.py RUN_DIR [--fields 100] [--sbc 300] [--draws 4000] [--out FILE.json]``

* Exact posterior of each field on a grid (``pixeldit.data.grf.grf_log_likelihood`` times the
  uniform prior on the box), refined in three stages around its mass; its mean and std against
  the model's, over ``--fields`` fields drawn from the prior (seeded apart from training).
* SBC: rank of the true theta among the draws, KS test of the normalised ranks per parameter.
* TARP (Lemos et al. 2023): expected coverage against credibility, reference points uniform in
  the prior box, distances in prior-box-standardised units; the largest gap to the diagonal.
* Draws per second for one field.
"""

import argparse
import json
import os
import time

import jax
import numpy as np
from scipy import stats

from pixeldit.data.grf import grf_log_likelihood, sample_prior, simulate
from pixeldit.inference.amortized import posterior_log_prob, sample_posterior
from pixeldit.posterior_training import load_posterior

CHECK_SEED = 20261202  # fields of the check, independent of the training stream (GRFDataset seed 0)


def _grid_moments(field, lo, hi, n):
    a = np.linspace(lo[0], hi[0], n)
    s = np.linspace(lo[1], hi[1], n)
    aa, ss = np.meshgrid(a, s, indexing="ij")
    th = np.stack([aa.ravel(), ss.ravel()], -1)
    ll = grf_log_likelihood(field[None], th)
    w = np.exp(ll - ll.max())
    w /= w.sum()
    mean = w @ th
    cov = (th - mean).T @ (w[:, None] * (th - mean))
    return mean, cov, th[np.argmax(ll)]


def exact_posterior(field, low, high, n=80):
    """Mean and std of the exact posterior (uniform prior on the box) by a refined grid."""
    low, high = np.asarray(low), np.asarray(high)
    _, _, mode = _grid_moments(field, low, high, 60)
    cell = (high - low) / 59
    lo, hi = np.maximum(mode - 4 * cell, low), np.minimum(mode + 4 * cell, high)
    mean, cov, _ = _grid_moments(field, lo, hi, 50)
    std = np.sqrt(np.diag(cov))
    lo, hi = np.maximum(mean - 8 * std, low), np.minimum(mean + 8 * std, high)
    return _grid_moments(field, lo, hi, n)[:2]


def exact_log_posterior(field, points, mean, cov, low, high, n=120):
    """Normalised exact log posterior at ``points`` (M, 2); the evidence from a grid of +- 8 std."""
    std = np.sqrt(np.diag(cov))
    lo, hi = np.maximum(mean - 8 * std, low), np.minimum(mean + 8 * std, high)
    axes = [np.linspace(lo[j], hi[j], n) for j in range(2)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    ll = grf_log_likelihood(field[None], grid)
    cell = np.prod([(a[1] - a[0]) for a in axes])
    log_z = ll.max() + np.log(np.sum(np.exp(ll - ll.max())) * cell)
    return grf_log_likelihood(field[None], points) - log_z


def tarp_gap(draws, truth, low, high, rng, num_alpha=101):
    """Largest |ECP(alpha) - alpha| of TARP; draws (N, S, K), truth (N, K)."""
    width = np.asarray(high) - np.asarray(low)
    d = (draws - low) / width
    t = (truth - low) / width
    ref = rng.random(t.shape)
    dist_draws = np.linalg.norm(d - ref[:, None, :], axis=-1)
    dist_true = np.linalg.norm(t - ref, axis=-1)
    f = np.mean(dist_draws < dist_true[:, None], axis=1)
    alpha = np.linspace(0, 1, num_alpha)
    ecp = np.mean(f[None, :] < alpha[:, None], axis=1)
    return float(np.max(np.abs(ecp - alpha))), alpha.tolist(), ecp.tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--fields", type=int, default=100)
    ap.add_argument("--sbc", type=int, default=300)
    ap.add_argument("--draws", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--exact-cache", default=None, help="npz of the exact means/covariances (same --fields)")
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
    cache = f"{args.exact_cache}" if args.exact_cache else None
    if cache and os.path.exists(cache):
        with np.load(cache) as z:
            ex_mean, ex_cov = z["mean"], z["cov"]
    else:
        exact = [exact_posterior(f[..., 0].astype(np.float64), low, high) for f in fields]
        ex_mean = np.array([m for m, _ in exact])
        ex_cov = np.array([c for _, c in exact])
        if cache:
            np.savez(cache, mean=ex_mean, cov=ex_cov)
    ex_std = np.sqrt(np.diagonal(ex_cov, axis1=1, axis2=2))
    # Gaussian-stage NLL (training units) if mu, L L^T were the exact posterior's mean and covariance
    u_scale = 2.0 / (high - low)
    nll_floor = np.mean(0.5 * len(low) + 0.5 * np.linalg.slogdet(ex_cov * np.outer(u_scale, u_scale))[1])
    t_exact = time.perf_counter() - t0
    draws = np.asarray(sample_posterior(model, fields, args.draws, key, steps=args.steps), np.float64)
    q_mean, q_std = draws.mean(1), draws.std(1)
    z = np.abs(q_mean - ex_mean) / ex_std
    ratio = q_std / ex_std
    ok = (z <= 0.3) & (ratio >= 0.8) & (ratio <= 1.25)
    report["exact"] = {
        "fields": args.fields,
        "draws_per_field": args.draws,
        "frac_mean_ok": float(np.mean(z <= 0.3)),
        "frac_std_ok": float(np.mean((ratio >= 0.8) & (ratio <= 1.25))),
        "frac_both_ok": float(np.mean(ok)),
        "frac_both_ok_per_param": np.mean(ok, axis=0).tolist(),
        "median_abs_mean_err_in_std": np.median(z, axis=0).tolist(),
        "p90_abs_mean_err_in_std": np.quantile(z, 0.9, axis=0).tolist(),
        "median_std_ratio": np.median(ratio, axis=0).tolist(),
        "std_ratio_p05_p95": np.quantile(ratio, [0.05, 0.95], axis=0).tolist(),
        "exact_std_median": np.median(ex_std, axis=0).tolist(),
        "exact_grid_seconds": round(t_exact, 1),
        "gaussian_nll_floor": float(nll_floor),
    }

    # exact log-density against the exact log posterior, first 10 fields, 5 x 5 points at mean +- 2 std
    offsets = np.stack(np.meshgrid(*[np.linspace(-2, 2, 5)] * 2, indexing="ij"), -1).reshape(-1, 2)
    diffs, corrs = [], []
    for i in range(min(10, args.fields)):
        pts = np.clip(ex_mean[i] + offsets * ex_std[i], low + 1e-6, high - 1e-6)
        ex_lp = exact_log_posterior(fields[i, ..., 0].astype(np.float64), pts, ex_mean[i], ex_cov[i], low, high)
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
    ranks = np.sum(draws_s < theta_s[:, None, :], axis=1)  # (N, K) in 0..1000
    u = (ranks + rng.random(ranks.shape)) / (draws_s.shape[1] + 1)
    ks = [float(stats.kstest(u[:, j], "uniform").pvalue) for j in range(u.shape[1])]
    gap, alpha, ecp = tarp_gap(draws_s, theta_s, low, high, rng)
    hist = [np.histogram(ranks[:, j], bins=20, range=(0, 1001))[0].tolist() for j in range(ranks.shape[1])]
    report["sbc"] = {"sims": args.sbc, "ks_p": ks, "rank_hist_20": hist}
    report["tarp"] = {"max_gap": gap, "ecp_at_0.5": ecp[50], "ecp_at_0.9": ecp[90]}

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

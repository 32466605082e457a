"""``pixeldit infer`` and ``calibrate`` and the inference part of ``pixeldit bench``.

Thin typer functions over :mod:`pixeldit.infer_run` and :mod:`pixeldit.infer_bench`;
:mod:`pixeldit.cli` registers them on its app with its one-line error handling (this module
imports nothing from it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

__all__ = ["DIVERGENCE_HELP", "OBSERVED_HELP", "bench_inference", "calibrate", "infer"]

OBSERVED_HELP = ".npz file with observed fields x (N, H, W[, C]) of the run's size (and optionally their true theta)."
DEFAULT_PROBE = "spectral"  # pixeldit.inference.probes.DEFAULT_PROBE, not imported: the CLI starts without jax
PROBE_HELP = ("Hutchinson probe kind: spectral (random-phase fields, far less noise for fields with near-stationary "
              "statistics), rademacher or gaussian.")
DIVERGENCE_HELP = "Divergence of the likelihood's ODE: hutchinson (probe estimate) or exact (one JVP per pixel: small fields)."


def _parse_grid(text: str) -> dict[str, int]:
    """``"8,16"`` -> ``{"coarse": 8, "fine": 16}``."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise typer.BadParameter(f"expected COARSE,FINE cells per parameter, e.g. 8,16, got {text!r}")
    return {"coarse": int(parts[0]), "fine": int(parts[1])}


def _fmt_param(name: str, d: dict) -> str:
    lo, hi = d["interval68"]
    return f"{name} {d['mean']:.4g} +- {d['std']:.3g} (68 %: {lo:.4g} .. {hi:.4g})"


def infer(
    run: Path = typer.Argument(..., help="A theta-conditional run directory (e.g. runs/grf)."),
    observed: Path = typer.Option(..., "--observed", "-x", help=OBSERVED_HELP),
    num_samples: int = typer.Option(1000, "--num-samples", "-n", help="Posterior draws per observation."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default RUN/infer)."),
    divergence: str = typer.Option("hutchinson", "--divergence", help=DIVERGENCE_HELP),
    probes: int = typer.Option(4, "--probes", help="Hutchinson probes (the same for every theta)."),
    probe: str = typer.Option(DEFAULT_PROBE, "--probe", help=PROBE_HELP),
    grid: Optional[str] = typer.Option(None, "--grid", help="Search and final grid cells per parameter, COARSE,FINE (default 8,16)."),
    plots: int = typer.Option(4, "--plots", help="Corner plots for this many first observations."),
    seed: int = typer.Option(0, "--seed", help="Seed of the probes and the posterior draws."),
    guidance: float = typer.Option(1.0, "--guidance", help="Must be 1: a guided velocity has no density."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    raw: bool = typer.Option(False, "--raw", help="Use the raw training weights instead of the EMA weights."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Posterior of theta for observed fields: posterior.npz (theta (N, S, K)), summary.json, corner plots."""
    from pixeldit import infer_run

    grid_options = _parse_grid(grid) if grid else None
    res = infer_run.infer_run(run, observed, num_samples=num_samples, out=out, step=step, ema=not raw, plots=plots,
                              seed=seed, divergence=divergence, probes=probes, guidance=guidance, grid=grid_options,
                              progress=progress, probe=probe)
    for obs in res["observations"][:10]:
        typer.echo(f"observation {obs['index']}: " + "; ".join(_fmt_param(n, obs[n]) for n in res["parameters"]))
    if len(res["observations"]) > 10:
        typer.echo(f"... {len(res['observations']) - 10} more in the summary")
    for path in res["plots"]:
        typer.echo(f"plot: {path}")
    typer.echo(f"samples: {res['posterior_npz']}\nsummary: {res['summary_json']}")


def calibrate(
    run: Path = typer.Argument(..., help="A theta-conditional run directory on the built-in grf data."),
    num: int = typer.Option(100, "--num", "-n", help="Fresh simulations (thetas from the prior)."),
    num_samples: int = typer.Option(200, "--num-samples", help="Posterior draws per simulation (SBC ranks 0..S)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default RUN/calibrate)."),
    divergence: str = typer.Option("hutchinson", "--divergence", help=DIVERGENCE_HELP),
    probes: int = typer.Option(4, "--probes", help="Hutchinson probes (the same for every theta)."),
    probe: str = typer.Option(DEFAULT_PROBE, "--probe", help=PROBE_HELP),
    grid: Optional[str] = typer.Option(None, "--grid", help="Search and final grid cells per parameter, COARSE,FINE (default 8,16)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the simulations, probes and draws."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    raw: bool = typer.Option(False, "--raw", help="Use the raw training weights instead of the EMA weights."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Simulation-based calibration (rank histograms, KS test) and TARP coverage on fresh simulations."""
    from pixeldit import infer_run

    grid_options = _parse_grid(grid) if grid else None
    res = infer_run.calibrate_run(run, num=num, num_samples=num_samples, out=out, step=step, ema=not raw, seed=seed,
                                  divergence=divergence, probes=probes, grid=grid_options, progress=progress,
                                  probe=probe)
    for line in res["checks"]:
        typer.echo(line)
    for name, path in res["plots"].items():
        typer.echo(f"plot {name}: {path}")
    typer.echo(f"report: {res['calibration_json']}")


def bench_inference(run: Optional[Path], repeats: int, as_json: bool) -> None:
    """``pixeldit bench --inference``: time the run's inference routes and print the numbers."""
    from pixeldit import infer_bench

    res = infer_bench.inference_benchmark(run, repeats=repeats)
    typer.echo(json.dumps(res) if as_json else "\n".join(infer_bench.format_inference_benchmark(res)))

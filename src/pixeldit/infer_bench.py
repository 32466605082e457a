"""``pixeldit bench --inference``: wall-clock numbers of the inference routes of a run.

Numbers only mean something with the machine and its load named next to them; each result
carries the CPU count and the load average.  The timings themselves are
:mod:`pixeldit.inference.timing`'s (compiled first, best of ``repeats``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from pixeldit.data import grf, make_rng
from pixeldit.infer_run import InferenceRun, load_inference_run
from pixeldit.inference.timing import grf_emulator, time_grid_posterior, time_log_prob

__all__ = ["format_inference_benchmark", "inference_benchmark"]


def _time_amortized(run: InferenceRun, num_draws: int, repeats: int) -> dict[str, Any]:
    """Posterior draws per second for one field of the run's size (compiled first; best of ``repeats``)."""
    field = grf.simulate(grf.sample_prior(make_rng(0), 1, run.low, run.high)[0], make_rng(1), run.image_shape[0])
    run.posterior(field, num_samples=num_draws)  # compile
    best = np.inf
    for i in range(max(repeats, 1)):
        start = time.perf_counter()
        run.posterior(field, num_samples=num_draws, seed=i + 1)
        best = min(best, time.perf_counter() - start)
    return {"draws": num_draws, "seconds": best, "draws_per_s": num_draws / best}


def inference_benchmark(workdir: str | os.PathLike | None = None, *, sizes: Sequence[int] = (32, 64),
                        exact_max_size: int = 32, probes: int = 4, fields: int = 2, repeats: int = 1,
                        posterior: bool = True) -> dict[str, Any]:
    """Wall-clock numbers of the inference routes (:mod:`pixeldit.inference.timing`).

    An amortised-posterior run: draws per second for one field (1,000 and 10,000 draws, the
    encoder included).  Otherwise the emulator is the theta run ``workdir`` (a trained model:
    its solver takes as many steps as its velocity needs) or, without one, a freshly
    initialised ``grf``-preset model (few steps: a lower bound on the cost).  Log-likelihood
    fields per second with the Hutchinson divergence at each side in ``sizes`` and with the
    exact one up to ``exact_max_size`` (one JVP per pixel per solver stage: 4,096 at 64x64,
    minutes per field on a 2-core CPU); then the grid posterior (Hutchinson, ``probes`` probes)
    of a first 32x32 field (compilation included) and of a second.
    """
    run = load_inference_run(workdir) if workdir is not None else None
    out: dict[str, Any] = {"run": str(workdir) if workdir is not None else "untrained grf preset",
                           "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}
    if run is not None and run.route == "amortized":
        out["amortized"] = [_time_amortized(run, n, repeats) for n in (1000, 10_000)]
        return out
    emulator = run.model if run is not None else grf_emulator()
    out["log_likelihood"] = []
    for size in sizes:
        for divergence in ("hutchinson", "exact") if size <= exact_max_size else ("hutchinson",):
            out["log_likelihood"].append(time_log_prob(emulator, int(size), divergence=divergence, probes=probes,
                                                       fields=fields if divergence == "hutchinson" else 1,
                                                       repeats=repeats))
    if posterior:  # the first observation compiles the solve; the second shows the steady cost
        out["grid_posterior_first"] = time_grid_posterior(emulator, 32, probes=probes, seed=0)
        out["grid_posterior"] = time_grid_posterior(emulator, 32, probes=probes, seed=1)
    return out


def format_inference_benchmark(result: Mapping[str, Any]) -> list[str]:
    """Lines for the terminal: one per timing."""
    lines = [f"run: {result['run']} (load average {result['load_average'][0]:.1f} on {result['cpu_count']} CPUs)"]
    for r in result.get("amortized", []):
        lines.append(f"amortised posterior: {r['draws_per_s']:,.0f} draws/s per field ({r['draws']:,} draws in "
                     f"{r['seconds']:.3g} s)")
    for r in result.get("log_likelihood", []):
        how = f"hutchinson ({r['probes']} probes)" if r["divergence"] == "hutchinson" else "exact"
        lines.append(f"log-likelihood {r['size']}x{r['size']} {how}: {r['pairs_per_s']:.3g} fields/s "
                     f"({r['seconds']:.3g} s for {r['pairs']}, {r['cpu_seconds']:.3g} CPU s, "
                     f"{r['mean_steps']:.0f} solver steps)")
    if "grid_posterior" in result:
        g, first = result["grid_posterior"], result["grid_posterior_first"]
        lines.append(f"emulator posterior 32x32: {g['seconds']:.3g} s per observation ({g['cpu_seconds']:.3g} CPU s, "
                     f"{g['evaluations']} likelihood evaluations; the first {first['seconds']:.3g} s with compilation)")
    return lines

"""``pixeldit infer / calibrate / likelihood`` driven in-process with typer's CliRunner.

One tiny ``grf`` run (8x8 fields, 4 patch tokens) trained for two steps serves the module; the
end-to-end runs use small grids so that one compiled likelihood solve (64 thetas, 4 probes)
serves both ``infer`` and ``calibrate``.  Bad inputs fail before anything compiles.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from typer.testing import CliRunner

from pixeldit import runconfig, runs
from pixeldit.cli import app
from pixeldit.data import grf
from pixeldit.inference.amortized import sample_posterior
from pixeldit.model import C2IConfig, ThetaConfig, build_model
from pixeldit.posterior_model import AmortizedPosterior, PosteriorConfig
from pixeldit.posterior_training import load_posterior, save_posterior
from pixeldit.training import save_model_checkpoint

runner = CliRunner()

TINY = ["model.hidden_size=16", "model.num_groups=2", "model.patch_depth=1", "model.pixel_depth=1",
        "model.pixel_hidden_size=4", "model.patch_size=4", "data.size=8", "train.batch_size=8", "train.steps=2",
        "train.checkpoint_every=2", "train.log_every=1", "train.sample_every=0", "train.warmup_steps=0",
        "train.ema_decay=0.5"]
GRID = ["--grid", "4,5"]
TINY_MODEL = dict(in_channels=1, hidden_size=16, num_groups=2, patch_depth=1, pixel_depth=1, pixel_hidden_size=4,
                  patch_size=4)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    if result.exit_code != 0:
        raise AssertionError(f"pixeldit {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}"
                             f"\n{result.exception!r}")
    return result


def fails(*args, message: str):
    """The command exits 1 with one ``error:`` line naming ``message`` and no traceback."""
    result = invoke(*args)
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def grf_run(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("infer") / "grf"
    runs.train_run(runconfig.load_run_config("grf", TINY), wd, progress=False)
    return wd


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    theta = grf.sample_prior(rng, 2)
    x = grf.simulate(theta, rng, 8)
    path = tmp_path_factory.mktemp("obs") / "obs.npz"
    np.savez(path, x=x, theta=theta)
    return path, x, theta


def test_infer_writes_posterior_summary_and_corner_plots(grf_run, observed, tmp_path):
    path, _, theta = observed
    out = tmp_path / "post"
    res = ok("infer", grf_run, "--observed", path, "--num-samples", 50, "--out", out, "--plots", 1, *GRID,
             "--no-progress")
    assert "observation 0: log_amplitude" in res.output and "observation 1:" in res.output
    with np.load(out / "posterior.npz") as f:
        samples = f["theta"]
        assert samples.shape == (2, 50, 2) and f["mean"].shape == (2, 2)
    lo, hi = np.array(grf.PRIOR_LOW), np.array(grf.PRIOR_HIGH)
    assert np.all((samples >= lo) & (samples <= hi))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"] == ["log_amplitude", "slope"] and summary["num_samples"] == 50
    first, second = summary["observations"]
    for obs in (first, second):
        for name in ("log_amplitude", "slope"):
            lo68, hi68 = obs[name]["interval68"]
            lo95, hi95 = obs[name]["interval95"]
            assert lo95 <= lo68 < hi68 <= hi95
        assert np.isfinite(obs["log_evidence"])
    np.testing.assert_allclose(first["true_theta"], theta[0])
    # the exact GRF posterior (drawn as contours) of the plotted observation sits at its true theta
    exact = first["exact"]
    assert np.all(np.abs(np.array(exact["mean"]) - theta[0]) < 4 * np.array(exact["std"]) + 1e-3)
    assert "exact" not in second
    assert (out / "corner_0.png").stat().st_size > 0 and not (out / "corner_1.png").exists()


def test_calibrate_writes_report_with_checks(grf_run, tmp_path):
    out = tmp_path / "cal"
    res = ok("calibrate", grf_run, "--num", 3, "--num-samples", 10, "--out", out, *GRID, "--no-progress")
    report = json.loads((out / "calibration.json").read_text())
    assert report["num_simulations"] == 3 and report["num_draws"] == 10
    assert len(report["checks"]) == 3 and all(line.split()[0] in ("PASS", "FAIL") for line in report["checks"])
    assert report["checks"][0] in res.output
    with np.load(out / "posterior.npz") as f:
        assert f["theta"].shape == (3, 10, 2) and f["theta_true"].shape == (3, 2) and f["x"].shape == (3, 8, 8, 1)
    assert (out / "ranks.png").stat().st_size > 0 and (out / "tarp.png").stat().st_size > 0


def test_likelihood_prints_learned_and_exact_values(grf_run, observed):
    path, x, _ = observed
    res = ok("likelihood", grf_run, "--observed", path, "--theta", "0,2;0.5,3", "--divergence", "exact")
    lines = [line for line in res.output.splitlines() if line.startswith("field")]
    assert len(lines) == 4 and "over 63 dimensions" in res.output  # 8x8 minus the GRF's zero-mean mode
    exact = grf.grf_log_likelihood(x[1], np.array([[0.5, 3.0]]))[0]
    assert lines[3].startswith("field 1 theta (0.5, 3):") and f"exact {exact:.3f}" in lines[3]


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit code 1
# ---------------------------------------------------------------------------------------------


def test_observed_without_x(grf_run, tmp_path):
    np.savez(tmp_path / "o.npz", fields=np.zeros((1, 8, 8, 1)))
    fails("infer", grf_run, "--observed", tmp_path / "o.npz", message="has no array 'x'")


@pytest.mark.parametrize("shape", [(8, 8), (1, 2, 8, 8, 1), (0, 8, 8, 1)])
def test_observed_of_wrong_rank(grf_run, tmp_path, shape):
    np.savez(tmp_path / "o.npz", x=np.zeros(shape, np.float32))
    fails("infer", grf_run, "--observed", tmp_path / "o.npz", message="x must be fields (N, H, W[, C])")


@pytest.mark.parametrize("shape", [(2, 16, 16, 1), (2, 8, 8, 3), (2, 8, 16)])
def test_observed_of_another_size(grf_run, tmp_path, shape):
    np.savez(tmp_path / "o.npz", x=np.zeros(shape, np.float32))
    fails("infer", grf_run, "--observed", tmp_path / "o.npz", message="but the run was trained on 8x8 with 1")


def test_observed_with_nan(grf_run, tmp_path):
    x = np.zeros((3, 8, 8, 1), np.float32)
    x[1, 2, 3, 0] = np.nan
    np.savez(tmp_path / "o.npz", x=x)
    fails("infer", grf_run, "--observed", tmp_path / "o.npz", message="NaN or infinite values (fields [1])")
    fails("likelihood", grf_run, "--observed", tmp_path / "o.npz", "--theta", "0,2", message="NaN or infinite")


def test_missing_observed_file(grf_run, tmp_path):
    fails("infer", grf_run, "--observed", tmp_path / "none.npz", message="no such observed-data file")


def test_class_conditional_run_is_refused(tmp_path, observed):
    cfg = C2IConfig(num_classes=3, **TINY_MODEL)
    save_model_checkpoint(build_model(cfg, rngs=nnx.Rngs(0)), tmp_path / "c2i", image_shape=(8, 8, 1))
    for command in (["infer"], ["calibrate"], ["likelihood", "--theta", "0,2"]):
        args = [command[0], tmp_path / "c2i", *command[1:]]
        if command[0] != "calibrate":
            args += ["--observed", observed[0]]
        fails(*args, message="is a class-conditional run; field inference needs a theta-conditional run")
    fails("bench", "--inference", "--run", tmp_path / "c2i", message="is a class-conditional run")


def test_guidance_and_options_are_checked_first(tmp_path, observed):
    # no run needed: these fail before the checkpoint is read
    fails("infer", tmp_path / "none", "--observed", observed[0], "--guidance", "2",
          message="needs guidance 1 (the model's own velocity), got 2.0")
    fails("likelihood", tmp_path / "none", "--observed", observed[0], "--theta", "0,2", "--guidance", "1.5",
          message="needs guidance 1")
    fails("infer", tmp_path / "none", "--observed", observed[0], "--divergence", "trace",
          message="divergence must be one of exact, hutchinson, got 'trace'")
    fails("calibrate", tmp_path / "none", "--grid", "2,8", message="grid cells per parameter must be >= 3")


def test_likelihood_theta_of_wrong_width(grf_run, observed):
    fails("likelihood", grf_run, "--observed", observed[0], "--theta", "0,2,1", message="theta rows must have 2 values")


def test_calibrate_needs_a_simulator(tmp_path):
    cfg = ThetaConfig(theta_dim=2, **TINY_MODEL).with_encoding([0.0, 0.0], [1.0, 2.0])
    data = {"name": "fields.npz", "image_shape": [8, 8, 1], "condition": "theta", "theta_dim": 2}
    save_model_checkpoint(build_model(cfg, rngs=nnx.Rngs(0)), tmp_path / "npz", image_shape=(8, 8, 1),
                          extra_meta={"dataset": data})
    fails("calibrate", tmp_path / "npz", message="only the built-in grf data has a simulator here (this run's data: "
          "'fields.npz')")


def test_inference_benchmark_times_both_divergences(grf_run):
    from pixeldit.infer_bench import format_inference_benchmark, inference_benchmark

    res = inference_benchmark(grf_run, sizes=(8,), exact_max_size=8, fields=1, repeats=0, posterior=False)
    assert [(r["size"], r["divergence"]) for r in res["log_likelihood"]] == [(8, "hutchinson"), (8, "exact")]
    assert all(r["pairs_per_s"] > 0 and r["mean_steps"] >= 1 for r in res["log_likelihood"])
    lines = format_inference_benchmark(res)
    assert lines[1].startswith("log-likelihood 8x8 hutchinson (4 probes):") and "exact" in lines[2]


# ---------------------------------------------------------------------------------------------
# amortised route: a folder with an (untrained, tiny) amortised posterior
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def posterior_run(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("npe") / "post"
    save_posterior(AmortizedPosterior(PosteriorConfig.preset("tiny"), rngs=nnx.Rngs(0)), wd)
    return wd


def test_infer_takes_the_amortised_route(posterior_run, observed, tmp_path):
    path, x, _ = observed
    out = tmp_path / "amortised"
    ok("infer", posterior_run, "--observed", path, "--num-samples", 300, "--out", out, "--plots", 1, "--no-progress")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["route"] == "amortized" and "log_evidence" not in summary["observations"][0]
    with np.load(out / "posterior.npz") as f:
        samples, mean = f["theta"], f["mean"]
    assert samples.shape == (2, 300, 2)
    model = load_posterior(posterior_run)
    direct = np.asarray(sample_posterior(model, x[1:2], 300, jax.random.key(0)))[0]
    np.testing.assert_allclose(samples[1], direct, rtol=1e-6)  # the library's draws, per field
    np.testing.assert_allclose(mean[1], direct.mean(axis=0), rtol=1e-6)
    assert (out / "corner_0.png").stat().st_size > 0


def test_calibrate_and_bench_on_the_amortised_route(posterior_run, tmp_path):
    ok("calibrate", posterior_run, "--num", 4, "--num-samples", 20, "--out", tmp_path / "cal", "--no-progress")
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert report["route"] == "amortized" and report["num_simulations"] == 4
    res = ok("bench", "--inference", "--run", posterior_run)
    assert "amortised posterior:" in res.output and "draws/s per field (10,000 draws" in res.output


def test_likelihood_refuses_an_amortised_run(posterior_run, observed):
    fails("likelihood", posterior_run, "--observed", observed[0], "--theta", "0,2",
          message="is an amortised posterior run; the likelihood needs a theta-conditional run")


def test_unreadable_amortised_checkpoint(tmp_path, observed):
    (tmp_path / "post").mkdir()
    (tmp_path / "post" / "posterior.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    fails("infer", tmp_path / "post", "--observed", observed[0], message="posterior.safetensors")


def test_cli_probe_default_is_the_library_default():
    from pixeldit import cli_infer
    from pixeldit.inference.probes import DEFAULT_PROBE

    assert cli_infer.DEFAULT_PROBE == DEFAULT_PROBE  # the CLI keeps its own copy to start without jax

"""Posterior run configs (the built-in ``grf-posterior``) and ``pixeldit train`` of one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from pixeldit import runconfig
from pixeldit.cli import app
from pixeldit.inference.amortized import sample_posterior
from pixeldit.posterior_checkpoint import STATE_DIR, state_steps
from pixeldit.posterior_model import PosteriorConfig
from pixeldit.posterior_run import is_posterior_source, load_posterior_run
from pixeldit.posterior_training import CHECKPOINT_NAME, PosteriorTrainConfig, is_posterior_workdir, load_posterior

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
TINY = {"data.size": 8, "model.patch_size": 4, "model.hidden_size": 16, "model.depth": 1, "model.num_heads": 2, "model.summary_dim": 16,
        "model.flow_hidden": 16, "model.flow_depth": 1, "train.steps": 3, "train.batch_size": 4,
        "train.flow_samples": 2, "train.log_every": 1}  # the built-in run at test size: compiles in seconds


def test_builtin_config_loads():
    run = load_posterior_run("grf-posterior")
    assert "grf-posterior" in runconfig.builtin_configs() and is_posterior_source("grf-posterior")
    assert not is_posterior_source("grf") and not is_posterior_source("no_such_config")
    assert run.model == PosteriorConfig.preset("grf")  # the data section gives size 32 and the prior box
    assert run.train == PosteriorTrainConfig(steps=56000, batch_size=64, flow_samples=8, seed=0)
    assert run.log_every == 250


def test_overrides_and_bad_keys():
    run = load_posterior_run("grf-posterior", ["train.steps=7", "data.size=16", "model.depth=1"])
    assert (run.train.steps, run.model.image_size, run.model.depth) == (7, 16, 1)
    for bad, match in [("model.hidden=3", r"unknown key\(s\) in \[model\].*hidden_size"),
                       ("train.lr=1e-3", r"unknown key\(s\) in \[train\].*learning_rate"),
                       ("data.source=digits", "data.source must be 'grf'"),
                       ("sample.steps=4", "sections model, train, data only"),
                       ("train.steps=0", "steps must be >= 1"),
                       ("train.log_every=0", "log_every must be an integer >= 1")]:
        with pytest.raises(runconfig.ConfigError, match=match):
            load_posterior_run("grf-posterior", [bad])
    with pytest.raises(runconfig.ConfigError, match="amortised posterior run"):
        runconfig.load_run_config("grf-posterior")  # the image-model loader names what this config is


def test_cli_trains_a_loadable_posterior(tmp_path):
    wd = tmp_path / "post"
    args = ["train", "grf-posterior", "-w", str(wd)] + [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "step 3/3" in r.output and "checkpoint:" in r.output
    assert is_posterior_workdir(wd) and (wd / CHECKPOINT_NAME).is_file()
    saved = json.loads((wd / runconfig.RUN_FILE).read_text())
    assert saved["model"]["kind"] == "posterior" and saved["train"]["steps"] == 3
    assert json.loads((wd / "summary.json").read_text())["steps_done"] == 3
    model = load_posterior(wd)
    assert model.config == PosteriorConfig.preset("tiny")
    field = np.random.default_rng(0).normal(size=(1, 8, 8, 1)).astype(np.float32)
    draws = np.asarray(sample_posterior(model, field, 5, jax.random.key(0)))
    assert draws.shape == (1, 5, 2) and np.all(np.isfinite(draws))
    assert load_posterior_run(wd).train.steps == 3  # the workdir is a config source too
    again = runner.invoke(app, ["train", "-w", str(wd)])  # finished: not trained again
    assert again.exit_code == 0, again.output
    assert "training finished" in again.output and "step 1/3" not in again.output
    other = runner.invoke(app, ["train", "-w", str(wd), "--set", "train.batch_size=5"])
    assert other.exit_code == 1 and "train.batch_size: 4 vs 5" in other.output
    assert other.output.strip().splitlines()[-1].startswith("error: cannot resume") and "Traceback" not in other.output
    assert sorted(p.name for p in wd.iterdir()) == sorted(
        [CHECKPOINT_NAME, "history.json", "posterior_state", runconfig.RUN_FILE, "summary.json", "train.lock"])
    assert json.loads((wd / runconfig.RUN_FILE).read_text())["train"]["batch_size"] == 4  # not overwritten
    shutil.rmtree(wd / STATE_DIR)  # a posterior saved without a training checkpoint cannot be resumed
    old = runner.invoke(app, ["train", "-w", str(wd)])
    assert old.exit_code == 1 and "no training checkpoint to resume from" in old.output
    bad = runner.invoke(app, ["train", "grf-posterior", "-w", str(tmp_path / "b"), "--data", "x.npz"])
    assert bad.exit_code == 1 and "--data does not apply" in bad.output


def test_emulator_workdir_is_not_a_posterior(tmp_path):
    assert not is_posterior_workdir(tmp_path)
    (tmp_path / runconfig.RUN_FILE).write_text(json.dumps({"model": {"kind": "theta"}}))
    assert not is_posterior_workdir(tmp_path)


def _command(workdir, pause: float | None = None) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT / "src"))
    env.pop("PIXELDIT_TEST_SAVE_PAUSE", None)
    if pause:
        env["PIXELDIT_TEST_SAVE_PAUSE"] = str(pause)
    sets = dict(TINY, **{"train.steps": 5, "train.checkpoint_every": 2})
    args = ["train", "grf-posterior", "-w", str(workdir)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return subprocess.Popen([sys.executable, "-m", "pixeldit", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_command_signalled_during_a_save_resumes_to_the_same_run(tmp_path):
    """SIGTERM while the step-2 checkpoint is written: that save finishes, exit 143, one line; rerunning resumes."""
    proc = _command(tmp_path / "a", pause=2.0)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "pausing in the save of step 2" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    err = "".join(lines) + err
    assert proc.returncode == 143, err
    assert "Traceback" not in err and f"interrupted (SIGTERM): checkpoint at step 2 in {tmp_path / 'a'}" in err, err
    assert state_steps(tmp_path / "a") == [2] and not (tmp_path / "a" / CHECKPOINT_NAME).exists()
    assert sorted(os.listdir(tmp_path / "a" / STATE_DIR)) == ["2.safetensors"]  # no temporary file left
    for wd in (tmp_path / "a", tmp_path / "b"):  # resume a; train b without a break
        out, err = _command(wd).communicate(timeout=300)
    history = [json.loads((wd / "history.json").read_text()) for wd in (tmp_path / "a", tmp_path / "b")]
    assert history[0]["step"] == [1, 2, 3, 4, 5]
    for key in ("step", "loss", "nll", "flow"):
        assert history[0][key] == history[1][key], key
    a, b = load_posterior(tmp_path / "a"), load_posterior(tmp_path / "b")
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(a.encode(x), b.encode(x))

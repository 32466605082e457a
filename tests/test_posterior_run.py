"""Posterior run configs (the built-in ``grf-posterior``) and ``pixeldit train`` of one."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from pixeldit import runconfig
from pixeldit.cli import app
from pixeldit.inference.amortized import sample_posterior
from pixeldit.posterior_model import PosteriorConfig
from pixeldit.posterior_run import is_posterior_source, load_posterior_run
from pixeldit.posterior_training import CHECKPOINT_NAME, PosteriorTrainConfig, is_posterior_workdir, load_posterior

runner = CliRunner()


def test_builtin_config_loads():
    run = load_posterior_run("grf-posterior")
    assert "grf-posterior" in runconfig.builtin_configs() and is_posterior_source("grf-posterior")
    assert not is_posterior_source("grf") and not is_posterior_source("no_such_config")
    assert run.model == PosteriorConfig.preset("grf")  # the data section gives size 32 and the prior box
    assert run.train == PosteriorTrainConfig(steps=6000, batch_size=64, flow_samples=16, seed=0)
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
    tiny = {"data.size": 8, "model.hidden_size": 16, "model.depth": 1, "model.num_heads": 2, "model.summary_dim": 16,
            "model.flow_hidden": 16, "model.flow_depth": 1, "train.steps": 3, "train.batch_size": 4,
            "train.flow_samples": 2, "train.log_every": 1}  # the built-in run at test size: compiles in seconds
    args = ["train", "grf-posterior", "-w", str(wd)] + [a for k, v in tiny.items() for a in ("--set", f"{k}={v}")]
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
    again = runner.invoke(app, ["train", "-w", str(wd)])  # no resume: one clear line
    assert again.exit_code == 1 and "already holds a trained posterior" in again.output
    bad = runner.invoke(app, ["train", "grf-posterior", "-w", str(tmp_path / "b"), "--data", "x.npz"])
    assert bad.exit_code == 1 and "--data does not apply" in bad.output


def test_emulator_workdir_is_not_a_posterior(tmp_path):
    assert not is_posterior_workdir(tmp_path)
    (tmp_path / runconfig.RUN_FILE).write_text(json.dumps({"model": {"kind": "theta"}}))
    assert not is_posterior_workdir(tmp_path)

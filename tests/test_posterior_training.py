"""Training loss, a short training run, the checkpoint of the amortised posterior, and resuming its training."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from pixeldit.posterior_checkpoint import STATE_DIR, IncompatibleResumeError, state_steps
from pixeldit.posterior_model import AmortizedPosterior, PosteriorConfig, standardize
from pixeldit.posterior_training import (
    CHECKPOINT_NAME,
    PosteriorTrainConfig,
    ema_decay_at,
    load_posterior,
    posterior_loss,
    save_posterior,
    train_posterior,
)
from pixeldit.training import Interrupted, WorkdirLockedError
from pixeldit.training.lock import LOCK_FILE


def test_loss_terms_at_initialisation():
    """Zero velocity: the flow term is |z1 - eps|^2 exactly; the NLL is the Gaussian stage's."""
    model = AmortizedPosterior(PosteriorConfig.preset("tiny"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    theta = jnp.asarray([[0.1, 2.0], [-0.5, 3.5], [0.9, 1.1], [0.0, 2.5]])
    key = jax.random.key(1)
    loss, parts = posterior_loss(model, x, theta, key, flow_samples=3)
    mu, chol = model.gaussian(model.encode(x))
    w = np.stack([np.linalg.solve(np.asarray(c), np.asarray(r)) for c, r in zip(chol, standardize(theta, model.config) - mu)])
    nll = np.mean(0.5 * np.sum(w**2, -1) + np.sum(np.log(np.diagonal(np.asarray(chol), axis1=1, axis2=2)), -1))
    _, eps_key = jax.random.split(key)
    eps = np.asarray(jax.random.normal(eps_key, (4, 3, 2)))
    flow = np.mean(np.sum((w[:, None, :] - eps) ** 2, -1))
    np.testing.assert_allclose(parts["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(parts["flow"], flow, rtol=1e-5)
    np.testing.assert_allclose(loss, nll + flow, rtol=1e-5)


def test_ema_decay_warms_up():
    np.testing.assert_allclose([ema_decay_at(s, 0.999) for s in (0, 8, 10_000)], [0.1, 0.5, 0.999], rtol=1e-6)


def test_train_config_validation():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        PosteriorTrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="ema_decay"):
        PosteriorTrainConfig(ema_decay=1.0)


def test_only_the_grf_simulator_shape_trains():
    cfg = PosteriorConfig.preset("tiny", prior_low=(0.0,), prior_high=(1.0,), theta_names=("a",))
    with pytest.raises(ValueError, match="1-channel fields and 2 parameters"):
        train_posterior(cfg, PosteriorTrainConfig(steps=1), log=None)


@pytest.mark.slow
def test_short_run_learns_and_checkpoint_round_trips(tmp_path):
    cfg = PosteriorConfig.preset("tiny")
    tc = PosteriorTrainConfig(steps=40, batch_size=16, warmup_steps=5, ema_decay=0.9)
    model, history = train_posterior(cfg, tc, workdir=tmp_path, log=None, log_every=20)
    assert history["steps_done"] == 40 and all(np.isfinite(history["loss"]))
    assert history["nll"][-1] < history["nll"][0]
    assert (tmp_path / CHECKPOINT_NAME).is_file() and (tmp_path / "history.json").is_file()
    loaded = load_posterior(tmp_path)
    assert loaded.config == cfg
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
    np.testing.assert_array_equal(model.encode(x), loaded.encode(x))
    z = jnp.ones((2, 2))
    np.testing.assert_array_equal(model(z, jnp.full((2,), 0.5), x), loaded(z, jnp.full((2,), 0.5), x))


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="found none"):
        load_posterior(tmp_path)
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / CHECKPOINT_NAME))
    with pytest.raises(ValueError, match="not an amortised posterior checkpoint"):
        load_posterior(tmp_path)


def test_save_replaces_atomically(tmp_path):
    model = AmortizedPosterior(PosteriorConfig.preset("tiny"), rngs=nnx.Rngs(0))
    save_posterior(model, tmp_path)
    save_posterior(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


# ---------------------------------------------------------------------------------------------
# checkpoints of the training state and resume
# ---------------------------------------------------------------------------------------------

RESUME_TC = PosteriorTrainConfig(steps=6, batch_size=4, flow_samples=2, warmup_steps=1, ema_decay=0.9,
                                 checkpoint_every=2)


def _signal_at(monkeypatch, signum, batch):
    """Send ``signum`` to this process while the simulations of ``batch`` are drawn (that step still runs)."""
    from pixeldit.data.grf import GRFDataset

    original = GRFDataset.get_batch

    def get_batch(self, step, batch_size):
        if step == batch:
            os.kill(os.getpid(), signum)
        return original(self, step, batch_size)

    monkeypatch.setattr(GRFDataset, "get_batch", get_batch)
    return lambda: monkeypatch.setattr(GRFDataset, "get_batch", original)


def _curve(history):
    return {k: history[k] for k in ("step", "loss", "nll", "flow")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    wd = tmp_path_factory.mktemp("uninterrupted")
    _, history = train_posterior(PosteriorConfig.preset("tiny"), RESUME_TC, workdir=wd, log=None, log_every=4)
    return wd, history


def test_interrupted_run_resumes_to_the_same_curve_and_weights(tmp_path, monkeypatch, uninterrupted):
    ref_dir, ref_history = uninterrupted
    assert ref_history["step"] == [4, 6] and state_steps(ref_dir) == [4, 6]  # the newest two are kept
    restore = _signal_at(monkeypatch, signal.SIGTERM, batch=2)
    with pytest.raises(Interrupted) as info:
        train_posterior(PosteriorConfig.preset("tiny"), RESUME_TC, workdir=tmp_path, log=None, log_every=4)
    restore()
    assert (info.value.signum, info.value.step) == (signal.SIGTERM, 3)  # batch 2 makes step 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert state_steps(tmp_path) == [2, 3] and not (tmp_path / CHECKPOINT_NAME).exists()
    lines = []
    _, history = train_posterior(PosteriorConfig.preset("tiny"), RESUME_TC, workdir=tmp_path, log=lines.append,
                                 log_every=4)
    assert lines[0] == "resuming from the checkpoint at step 3/6"
    assert _curve(history) == _curve(ref_history)  # the step-4 record averages steps 1-4 over both runs
    resumed, reference = load_file(str(tmp_path / CHECKPOINT_NAME)), load_file(str(ref_dir / CHECKPOINT_NAME))
    assert resumed.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, uninterrupted, caplog):
    ref_dir, ref_history = uninterrupted
    tc = dataclasses.replace(RESUME_TC, steps=4)  # a run cut short after its step-4 checkpoint ...
    with pytest.raises(IncompatibleResumeError, match=r"train\.steps: 6 vs 4"):
        train_posterior(PosteriorConfig.preset("tiny"), tc, workdir=ref_dir, log=None, log_every=4)
    shutil.copytree(ref_dir / STATE_DIR, tmp_path / STATE_DIR)
    (tmp_path / STATE_DIR / "6.safetensors").write_bytes(b"\0" * 64)  # ... whose newest file was damaged
    _, history = train_posterior(PosteriorConfig.preset("tiny"), RESUME_TC, workdir=tmp_path, log=None, log_every=4)
    assert "checkpoint at step 6 is unreadable" in caplog.text
    assert (tmp_path / "damaged_checkpoints" / "posterior-6.safetensors").is_file()
    assert _curve(history) == _curve(ref_history)
    resumed, reference = load_file(str(tmp_path / CHECKPOINT_NAME)), load_file(str(ref_dir / CHECKPOINT_NAME))
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


def test_finished_run_is_not_trained_again(uninterrupted):
    ref_dir, ref_history = uninterrupted
    before = {p.name: p.stat().st_mtime_ns for p in (ref_dir / STATE_DIR).iterdir()}
    before[CHECKPOINT_NAME] = (ref_dir / CHECKPOINT_NAME).stat().st_mtime_ns
    lines = []
    tc = dataclasses.replace(RESUME_TC, checkpoint_every=0, max_seconds=100.0)  # settings a resume may change
    model, history = train_posterior(PosteriorConfig.preset("tiny"), tc, workdir=ref_dir, log=lines.append)
    assert lines == ["resuming from the checkpoint at step 6/6 (training finished)"]
    assert _curve(history) == _curve(ref_history) and history["steps_done"] == 6
    after = {p.name: p.stat().st_mtime_ns for p in (ref_dir / STATE_DIR).iterdir()}
    after[CHECKPOINT_NAME] = (ref_dir / CHECKPOINT_NAME).stat().st_mtime_ns
    assert after == before
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
    np.testing.assert_array_equal(model.encode(x), load_posterior(ref_dir).encode(x))


def test_resume_refuses_another_model(uninterrupted):
    ref_dir, _ = uninterrupted
    with pytest.raises(IncompatibleResumeError, match=r"model\.summary_dim: 16 vs 8.*new --workdir"):
        train_posterior(PosteriorConfig.preset("tiny", summary_dim=8), RESUME_TC, workdir=ref_dir, log=None)


def test_checkpoint_every_zero_saves_only_at_the_end(tmp_path):
    tc = dataclasses.replace(RESUME_TC, steps=3, checkpoint_every=0)
    train_posterior(PosteriorConfig.preset("tiny"), tc, workdir=tmp_path, log=None)
    assert state_steps(tmp_path) == [3]
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0"):
        PosteriorTrainConfig(checkpoint_every=-1)


def test_a_workdir_in_use_is_refused(tmp_path):
    """Another process holds the workdir's training lock: one error naming it, and nothing is written."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, sys, time; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
         "print('held', flush=True); time.sleep(60)", str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLockedError, match="in use by another training run"):
            train_posterior(PosteriorConfig.preset("tiny"), RESUME_TC, workdir=tmp_path, log=None)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]

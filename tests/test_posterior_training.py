"""Training loss, a short training run, and the checkpoint of the amortised posterior."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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

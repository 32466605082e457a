"""Amortised posterior model: configuration checks, shapes, standardisation, initial state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixeldit.data.grf import GRFDataset

from pixeldit.posterior_model import (
    AmortizedPosterior,
    PosteriorConfig,
    spectral_shells,
    standardize,
    standardize_log_det,
    unstandardize,
)


@pytest.fixture(scope="module")
def tiny():
    return AmortizedPosterior(PosteriorConfig.preset("tiny"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prior_low=(0.0, 2.0), prior_high=(1.0, 2.0)), "low < high"),
        (dict(prior_low=(0.0,), prior_high=(1.0, 2.0)), "one entry per parameter"),
        (dict(image_size=10, patch_size=4), "multiple of patch_size"),
        (dict(hidden_size=24, num_heads=4), "divisible by 4"),
        (dict(depth=0), "depth must be >= 1"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PosteriorConfig.preset("tiny", **kwargs)


def test_unknown_preset_and_keys():
    with pytest.raises(ValueError, match="unknown posterior preset"):
        PosteriorConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown posterior config keys"):
        PosteriorConfig.from_dict({"image_size": 8, "colour": 1})


def test_config_round_trips_through_dict():
    c = PosteriorConfig.preset("tiny")
    assert PosteriorConfig.from_dict(c.to_dict()) == c


def test_standardize_maps_the_prior_box_to_unit_box():
    c = PosteriorConfig()
    corners = jnp.asarray([c.prior_low, c.prior_high])
    np.testing.assert_allclose(standardize(corners, c), [[-1.0, -1.0], [1.0, 1.0]], atol=1e-6)
    theta = jnp.asarray([[0.3, 2.2], [-0.7, 3.9]])
    np.testing.assert_allclose(unstandardize(standardize(theta, c), c), theta, atol=1e-6)
    # widths 2 and 3 -> du/dtheta = 1 and 2/3
    assert standardize_log_det(c) == pytest.approx(np.log(2.0 / 3.0))


def test_shapes_and_initial_state(tiny):
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    s = tiny.encode(x)
    assert s.shape == (3, 16)
    mu, chol = tiny.gaussian(s)
    assert mu.shape == (3, 2) and chol.shape == (3, 2, 2)
    np.testing.assert_array_equal(np.triu(np.asarray(chol), 1), 0.0)
    assert np.all(np.diagonal(np.asarray(chol), axis1=1, axis2=2) > 0)
    v = tiny(jnp.ones((3, 2)), jnp.full((3,), 0.3), x)
    assert v.shape == (3, 2)
    np.testing.assert_array_equal(v, 0.0)  # zero final layer: the flow starts as the identity


def test_velocity_broadcasts_over_draws(tiny):
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
    s = tiny.encode(x)
    model = nnx.clone(tiny)
    model.velocity.final_layer.kernel.set_value(jnp.ones_like(model.velocity.final_layer.kernel.get_value()))
    z = jax.random.normal(jax.random.key(3), (2, 5, 2))
    v = model.velocity(z, 0.4, s[:, None, :])
    assert v.shape == (2, 5, 2)
    np.testing.assert_allclose(v[1, 3], model.velocity(z[1, 3][None], 0.4, s[1][None])[0], rtol=1e-5)


def test_encoder_sees_the_field_scale_only_through_log_rms(tiny):
    """Scaling a field changes the summary (the amplitude is a parameter)."""
    x = jax.random.normal(jax.random.key(4), (1, 8, 8, 1))
    assert not np.allclose(tiny.encode(x), tiny.encode(2.0 * x))


def test_fixed_features_are_z_scored_by_the_given_simulations():
    model = AmortizedPosterior(PosteriorConfig.preset("tiny"), rngs=nnx.Rngs(0))  # its own: the buffers change
    x = GRFDataset(model.config.image_size, seed=3).get_batch(0, 512)["x"]
    raw = np.asarray(model.encoder.fixed_features(jnp.asarray(x)))
    assert np.all(np.asarray(model.encoder.feature_shift.get_value()) == 0)  # identity before
    model.encoder.set_standardization(x)
    shift = np.asarray(model.encoder.feature_shift.get_value())
    scale = np.asarray(model.encoder.feature_scale.get_value())
    z = (raw - shift) / scale
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1.0, rtol=1e-3)
    assert raw.shape[1] == 1 + spectral_shells(8, 8).shape[1]  # log-RMS and one log power per shell
    assert np.ptp(raw.mean(0)) > 3.0  # why: the raw log shell powers sit nats apart


def test_buffers_are_not_parameters(tiny):
    params = nnx.state(tiny, nnx.Param)
    names = {"/".join(str(p) for p in k) for k, _ in nnx.to_flat_state(params)}
    assert not any("feature_s" in n for n in names)

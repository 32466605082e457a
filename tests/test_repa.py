import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from golden import assert_close
from paper_golden import load

from pixeldit.repa import (
    REPAConfig,
    REPAProjector,
    c2i_alignment_loss,
    load_projector,
    projector_from_reference,
    projector_to_reference,
    repa_loss,
    split_projector_keys,
)

C2I_PREFIX = "diffusion_trainer.proj.0."


def _golden_projector():
    config, g = load("repa.npz")
    weights = {k[len("proj/0."):]: g[k] for k in g.files if k.startswith("proj/")}  # proj/0.{0,2,4}.*
    projector = REPAProjector(config["hidden"], config["proj_hidden"], config["enc_dim"], rngs=nnx.Rngs(0))
    load_projector(projector, weights)
    return projector, g


@pytest.mark.parametrize("style", ["c2i", "t2i"])
@pytest.mark.parametrize("encoder_tokens", [4, 16, 36])
def test_loss_and_gradients_match_the_reference(style, encoder_tokens):
    """4 encoder tokens: block tokens pooled (c2i); 16: same grid; 36: bilinear resize."""
    projector, g = _golden_projector()
    config = REPAConfig(style=style)
    src, dst = jnp.asarray(g["src"]), jnp.asarray(g[f"dst_{encoder_tokens}"])
    graphdef, params = nnx.split(projector)

    def loss_fn(params, src):
        return repa_loss(config, nnx.merge(graphdef, params), src, dst)

    with jax.default_matmul_precision("highest"):
        loss, (grad_params, grad_src) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, src)
    case = f"{style}_{encoder_tokens}"
    assert_close(loss, g[f"{case}/loss"])
    assert_close(grad_src, g[f"{case}/grad_src"])
    for i in (0, 2, 4):
        layer = grad_params["proj"]["layers"][i]
        assert_close(np.asarray(layer["kernel"][...]).T, g[f"{case}/grad/0.{i}.weight"])
        assert_close(layer["bias"][...], g[f"{case}/grad/0.{i}.bias"])


def test_no_gradient_reaches_the_encoder_tokens():
    projector, g = _golden_projector()
    grad = jax.grad(lambda t: repa_loss(REPAConfig(), projector, jnp.asarray(g["src"]), t))(jnp.asarray(g["dst_16"]))
    assert not np.any(np.asarray(grad))


def test_aligned_tokens_have_zero_c2i_loss():
    x = jax.random.normal(jax.random.key(0), (2, 9, 5))
    np.testing.assert_allclose(c2i_alignment_loss(3.0 * x, x), 0.0, atol=1e-6)
    np.testing.assert_allclose(c2i_alignment_loss(-x, x), 2.0, atol=1e-6)


@pytest.mark.parametrize("style", ["c2i", "t2i"])
def test_reference_keys_round_trip(style):
    projector = REPAProjector(24, 20, 12, rngs=nnx.Rngs(3))
    sd = projector_to_reference(projector, style)
    prefix = C2I_PREFIX if style == "c2i" else "_repa_projector."
    assert sorted(sd) == sorted(f"{prefix}{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias"))
    assert sd[f"{prefix}0.weight"].shape == (20, 24)  # torch layout (out, in)
    others = {"ema_denoiser.final_layer.weight": np.zeros(3, np.float32)}
    back, found = projector_from_reference({**sd, **others})
    assert found == style
    x = jax.random.normal(jax.random.key(1), (2, 4, 24))
    np.testing.assert_array_equal(back(x), projector(x))
    weights, rest, split_style = split_projector_keys({**sd, **others})
    assert split_style == style and sorted(rest) == sorted(others) and len(weights) == 6


def test_golden_c2i_keys_load():
    """The generator's torch module is the reference's nn.Sequential(nn.Sequential(...)) (c2i keys)."""
    projector, g = _golden_projector()
    sd = {C2I_PREFIX + k[len("proj/0."):]: g[k] for k in g.files if k.startswith("proj/")}
    back, style = projector_from_reference(sd)
    assert style == "c2i"
    np.testing.assert_array_equal(back(jnp.asarray(g["src"])), projector(jnp.asarray(g["src"])))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="align_layer"):
        REPAConfig(align_layer=0)
    with pytest.raises(ValueError, match="style"):
        REPAConfig(style="x")
    with pytest.raises(ValueError, match="square token grid"):
        c2i_alignment_loss(jnp.ones((1, 16, 3)), jnp.ones((1, 5, 3)))
    with pytest.raises(ValueError, match="no REPA projector keys"):
        projector_from_reference({"denoiser.x": np.zeros(1)})
    projector = REPAProjector(4, 4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected shape"):
        load_projector(projector, {f"{i}.{p}": np.zeros((5, 4) if p == "weight" else (4,)) for i in (0, 2, 4) for p in ("weight", "bias")})


def test_t2i_preset_and_projector_for_model():
    config = REPAConfig.t2i()
    assert (config.align_layer, config.loss_weight, config.hidden_dim) == (14, 0.1, 2048)
    projector = REPAProjector.for_model(REPAConfig(), 48, rngs=nnx.Rngs(0))
    assert projector(jnp.ones((1, 4, 48))).shape == (1, 4, 768)
    assert projector.proj.layers[2].kernel.shape == (48, 48)  # c2i: hidden = the model width

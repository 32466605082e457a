import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from golden import assert_close, nchw_to_nhwc
from paper_golden import load
from safetensors.numpy import save_file
from seeded import seeded_array, seeded_state_dict

from pixeldit.encoders import DINOv2, DINOv2Config, DINOv2Encoder, PatchEncoder, TinyEncoder, build_encoder
from pixeldit.encoders.dinov2 import config_from_state_dict, load_dinov2, load_torch_state_dict



def _model(config: DINOv2Config, meta: dict) -> DINOv2:
    model = DINOv2(config, rngs=nnx.Rngs(0))
    load_torch_state_dict(model, seeded_state_dict(meta["shapes"], meta["seed"]))
    return model


@nnx.jit
def _run(model, images):
    return model(images)


def _image(spec: dict) -> jax.Array:
    return jnp.asarray(nchw_to_nhwc(seeded_array(tuple(spec["shape_nchw"]), spec["seed"], -2.0, 2.0)))


@pytest.mark.parametrize("case", ["native", "other"])
def test_tiny_matches_timm(case):
    """``native``: timm's own forward; ``other``: a 3 x 5 grid from the 4 x 4 table, resized as the hub does."""
    meta, g = load("dinov2_tiny.npz")
    model = _model(DINOv2Config.preset("tiny"), meta)
    with jax.default_matmul_precision("highest"):
        tokens = _run(model, _image(meta[case]))
    assert_close(tokens, g[f"{case}_tokens"])


@pytest.mark.slow
def test_vitb14_matches_timm_at_the_reference_resolution():
    """ViT-B/14 with its 37 x 37 table, at 224 px (16 x 16 tokens): the reference's 256 px setting."""
    meta, g = load("dinov2_vitb14.npz")
    sd = seeded_state_dict(meta["shapes"], meta["seed"])
    config = config_from_state_dict(sd)
    assert config == DINOv2Config.preset("B/14")
    model = DINOv2(config, rngs=nnx.Rngs(0))
    load_torch_state_dict(model, sd)
    images = jnp.asarray(nchw_to_nhwc(seeded_array(tuple(meta["image_shape_nchw"]), meta["image_seed"], -2.0, 2.0)))
    with jax.default_matmul_precision("highest"):
        tokens = np.asarray(_run(model, images))
    assert tokens.shape == (1, 256, 768)
    assert_close(tokens[:, meta["keep"]], g["tokens"])
    np.testing.assert_allclose(np.abs(tokens).mean(), g["tokens_abs_mean"], rtol=1e-5)


def test_loading_is_strict_and_hub_mask_token_is_dropped():
    meta, _ = load("dinov2_tiny.npz")
    model = DINOv2(DINOv2Config.preset("tiny"), rngs=nnx.Rngs(0))
    sd = seeded_state_dict(meta["shapes"], meta["seed"])
    load_torch_state_dict(model, {**sd, "mask_token": np.zeros((1, 32), np.float32)})  # torch-hub files carry it
    with pytest.raises(ValueError, match="unexpected weights"):
        load_torch_state_dict(model, {**sd, "head.weight": np.zeros((3, 32), np.float32)})
    with pytest.raises(ValueError, match="expected shape"):
        load_torch_state_dict(model, {**sd, "norm.bias": np.zeros((31,), np.float32)})
    missing = dict(sd)
    missing.pop("blocks.1.ls2.gamma")
    with pytest.raises(KeyError, match="blocks.1.ls2.gamma"):
        load_torch_state_dict(model, missing)


def test_load_from_a_weight_file(tmp_path):
    meta, g = load("dinov2_tiny.npz")
    save_file(seeded_state_dict(meta["shapes"], meta["seed"]), tmp_path / "dinov2.safetensors")
    model = load_dinov2(tmp_path / "dinov2.safetensors", DINOv2Config.preset("tiny"))
    with jax.default_matmul_precision("highest"):
        assert_close(_run(model, _image(meta["native"])), g["native_tokens"])


def test_encoder_preprocesses_as_the_reference_and_is_frozen():
    model = DINOv2(DINOv2Config.preset("tiny"), rngs=nnx.Rngs(0))
    encoder = DINOv2Encoder(model)
    assert isinstance(encoder, PatchEncoder)
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    tokens = encoder(images)
    assert tokens.shape == (2, 4, 32)  # 32 px -> 28 px -> a 2 x 2 grid of 14 px patches
    grad = jax.grad(lambda x: encoder(x).sum())(images)
    assert not np.any(np.asarray(grad))


def test_tiny_encoder_is_a_patch_encoder():
    encoder = TinyEncoder(patch_size=8, dim=16, rngs=nnx.Rngs(0))
    assert isinstance(encoder, PatchEncoder)
    assert encoder(jnp.ones((2, 32, 24, 3))).shape == (2, 12, 16)
    with pytest.raises(ValueError, match="divisible by 8"):
        encoder(jnp.ones((1, 30, 24, 3)))


def test_bfloat16_matmuls_stay_close_to_float32():
    meta, g = load("dinov2_tiny.npz")
    bf16 = _model(dataclasses.replace(DINOv2Config.preset("tiny"), dtype="bfloat16"), meta)
    tokens = np.asarray(_run(bf16, _image(meta["native"])), dtype=np.float64)
    rel = np.linalg.norm(tokens - g["native_tokens"]) / np.linalg.norm(g["native_tokens"])
    assert 1e-4 < rel < 2e-2  # bfloat16 rounding: visible (4e-3 here), small


def test_fixed_size_resize_for_t2i():
    encoder = DINOv2Encoder(DINOv2(DINOv2Config.preset("tiny"), rngs=nnx.Rngs(0)), size=(42, 28))
    assert encoder(jnp.zeros((1, 64, 64, 3))).shape == (1, 6, 32)  # 42 x 28 px -> 3 x 2 patches


def test_build_encoder_from_a_run_setting(tmp_path):
    assert isinstance(build_encoder("tiny", dim=16, base_patch_size=4), TinyEncoder)
    meta, _ = load("dinov2_tiny.npz")
    # the tiny weights widened to 64 (one head of 64, as every released DINOv2 has): sizes read off the file
    wide = {32: 64, 96: 192, 128: 256}
    shapes = {k: tuple(wide.get(d, d) for d in shape) for k, shape in meta["shapes"].items()}
    save_file(seeded_state_dict(shapes, meta["seed"]), tmp_path / "dinov2.safetensors")
    encoder = build_encoder(str(tmp_path / "dinov2.safetensors"), dim=64, base_patch_size=16)
    assert isinstance(encoder, DINOv2Encoder) and encoder(jnp.ones((1, 32, 32, 3))).shape == (1, 4, 64)
    with pytest.raises(ValueError, match="REPA encoder_dim is 768 but the DINOv2 weights in .* give 64-wide tokens"):
        build_encoder(str(tmp_path / "dinov2.safetensors"), dim=768, base_patch_size=16)

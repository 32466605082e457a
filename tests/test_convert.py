"""Reference weight import/export: exact round trips, loud mismatches, checkpoint files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import golden
from pixeldit.convert import (
    ConversionError,
    config_from_reference,
    extract_model_state_dict,
    from_reference,
    from_reference_file,
    load_reference_state_dict,
    read_checkpoint_file,
    save_reference_safetensors,
    to_reference_state_dict,
)
from pixeldit.model import ThetaConfig, build_model


@pytest.fixture(scope="module")
def c2i():
    cfg, d = golden.load("c2i_small.npz")
    return cfg, golden.state_dict(d)


def test_round_trip_is_exact(c2i):
    cfg, sd = c2i
    model = from_reference("c2i", cfg["reference_kwargs"], sd)
    out = to_reference_state_dict(model)
    assert set(out) == set(sd)
    for k in sd:
        assert out[k].shape == sd[k].shape, k
        np.testing.assert_array_equal(out[k], sd[k], err_msg=k)


def test_t2i_round_trip_is_exact():
    cfg, d = golden.load("t2i_small.npz")
    sd = golden.state_dict(d)
    out = to_reference_state_dict(from_reference("t2i", cfg["reference_kwargs"], sd))
    assert set(out) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(out[k], sd[k], err_msg=k)


def test_theta_model_export_import_round_trip():
    cfg = ThetaConfig(num_groups=2, hidden_size=16, pixel_hidden_size=4, patch_depth=2, pixel_depth=1, patch_size=2)
    a = build_model(cfg, rngs=nnx.Rngs(0))
    b = build_model(cfg, rngs=nnx.Rngs(1))
    load_reference_state_dict(b, to_reference_state_dict(a))
    for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))):
        np.testing.assert_array_equal(x, y)


def test_missing_key_is_listed(c2i):
    cfg, sd = c2i
    sd = dict(sd)
    del sd["patch_blocks.1.attn.qkv.weight"]
    with pytest.raises(ConversionError, match=r"missing \(1\): patch_blocks\.1\.attn\.qkv\.weight"):
        from_reference("c2i", cfg["reference_kwargs"], sd)


def test_unexpected_and_misshaped_keys_are_listed(c2i):
    cfg, sd = c2i
    sd = dict(sd)
    sd["patch_blocks.7.attn.qkv.weight"] = sd["patch_blocks.0.attn.qkv.weight"]
    sd["final_layer.linear.weight"] = np.zeros((4, 8), np.float32)
    with pytest.raises(ConversionError) as e:
        from_reference("c2i", cfg["reference_kwargs"], sd)
    msg = str(e.value)
    assert "unexpected (1): patch_blocks.7.attn.qkv.weight" in msg
    assert "final_layer.linear.weight: expected (3, 8), got (4, 8)" in msg


def test_failed_load_leaves_model_untouched(c2i):
    cfg, sd = c2i
    model = from_reference("c2i", cfg["reference_kwargs"], sd)
    before = to_reference_state_dict(model)
    bad = {k: v * 2 for k, v in sd.items()}
    del bad["t_embedder.mlp.0.bias"]
    with pytest.raises(ConversionError):
        load_reference_state_dict(model, bad)
    after = to_reference_state_dict(model)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_unknown_reference_kwargs_rejected():
    with pytest.raises(ValueError, match="unknown reference c2i constructor arguments: \\['depth'\\]"):
        config_from_reference("c2i", {"depth": 3})
    with pytest.raises(ValueError, match="kind must be"):
        config_from_reference("sd3", {})


def test_t2i_ignores_inert_reference_kwargs():
    cfg = config_from_reference("t2i", {"num_text_blocks": 4, "repa_encoder_index": 8, "hidden_size": 64, "num_groups": 4})
    assert cfg.hidden_size == 64


def test_lightning_prefixes_and_ema_selection(c2i):
    _, sd = c2i
    raw = {"state_dict": {}}
    for k, v in sd.items():
        raw["state_dict"][f"denoiser._orig_mod.{k}"] = v
        raw["state_dict"][f"ema_denoiser.{k}"] = v + 1
    raw["state_dict"]["diffusion_trainer.proj.0.0.weight"] = np.zeros(3)
    ema = extract_model_state_dict(raw)
    plain = extract_model_state_dict(raw, ema=False)
    assert set(ema) == set(plain) == set(sd)
    np.testing.assert_array_equal(ema["final_layer.linear.bias"], sd["final_layer.linear.bias"] + 1)
    np.testing.assert_array_equal(plain["final_layer.linear.bias"], sd["final_layer.linear.bias"])


def test_t2i_pickle_layout_is_unwrapped(c2i):
    _, sd = c2i
    raw = {"state_dict": {f"core.{k}": v for k, v in sd.items()}}
    raw["state_dict"]["_repa_projector.0.weight"] = np.zeros(2)
    assert set(extract_model_state_dict(raw)) == set(sd)


def test_ema_requested_but_absent(c2i):
    _, sd = c2i
    with pytest.raises(ConversionError, match="ema_denoiser"):
        extract_model_state_dict({f"denoiser.{k}": v for k, v in sd.items()})


def test_safetensors_round_trip(tmp_path, c2i):
    cfg, sd = c2i
    model = from_reference("c2i", cfg["reference_kwargs"], sd)
    path = save_reference_safetensors(model, tmp_path / "w.safetensors")
    loaded = read_checkpoint_file(path)
    assert set(loaded) == set(sd)
    model2 = from_reference_file("c2i", cfg["reference_kwargs"], path)
    x = jnp.ones((1, 16, 16, 3))
    np.testing.assert_array_equal(model(x, jnp.ones(1) * 0.3, jnp.array([1])), model2(x, jnp.ones(1) * 0.3, jnp.array([1])))


def test_bf16_safetensors_are_read(tmp_path, c2i):
    from safetensors.flax import save_file

    _, sd = c2i
    save_file({k: jnp.asarray(v, dtype=jnp.bfloat16) for k, v in sd.items()}, str(tmp_path / "bf16.safetensors"))
    loaded = read_checkpoint_file(tmp_path / "bf16.safetensors")
    k = "final_layer.linear.weight"
    assert loaded[k].dtype == np.float32
    np.testing.assert_allclose(loaded[k], sd[k], rtol=1e-2)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        read_checkpoint_file(tmp_path / "nope.ckpt")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint type '.onnx'"):
        read_checkpoint_file(tmp_path / "w.onnx")

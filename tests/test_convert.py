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
    reference_train_state,
    save_reference_safetensors,
    to_reference_state_dict,
    train_state_to_reference,
)
from pixeldit.model import C2IConfig, T2IConfig, ThetaConfig, build_model
from pixeldit.repa import REPAConfig, REPAProjector, projector_to_reference
from pixeldit.training import TrainConfig, ema_model, train_model


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


# --- reference training checkpoints with a REPA projector --------------------------------------


def _train_config(style):
    return TrainConfig(batch_size=2, repa=REPAConfig(style=style, align_layer=1, hidden_dim=24, encoder_dim=16))


def _projector(style, model_dim, seed):
    return projector_to_reference(REPAProjector(model_dim, 24, 16, rngs=nnx.Rngs(seed)), style)


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_reference_training_checkpoint_with_projector_round_trip(kind):
    small = dict(in_channels=3, patch_size=4, hidden_size=32, num_groups=2, patch_depth=2, pixel_depth=1, pixel_hidden_size=8)
    cfg = C2IConfig(**small, num_classes=10) if kind == "c2i" else T2IConfig(**small, txt_embed_dim=8, txt_max_length=4)
    raw_model, ema = (to_reference_state_dict(build_model(cfg, rngs=nnx.Rngs(s))) for s in (1, 2))
    proj = _projector(kind, 32, 3)
    if kind == "c2i":  # a Lightning checkpoint: raw and EMA weights, the projector under diffusion_trainer.proj.0
        sd = {**{f"denoiser.{k}": v for k, v in raw_model.items()}, **{f"ema_denoiser.{k}": v for k, v in ema.items()}, **proj}
        raw = {"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}, "global_step": 7}
        assert any(k.startswith("diffusion_trainer.proj.0.0.") for k in sd)
    else:  # the t2i trainer's layout: model keys and _repa_projector.*
        sd = raw = {**raw_model, **proj}
        assert any(k.startswith("_repa_projector.4.") for k in sd)
    state = reference_train_state(raw, cfg, _train_config(kind))
    np.testing.assert_array_equal(to_reference_state_dict(train_model(state))["final_layer.linear.weight"],
                                  raw_model["final_layer.linear.weight"])
    np.testing.assert_array_equal(to_reference_state_dict(ema_model(state))["final_layer.linear.weight"],
                                  (ema if kind == "c2i" else raw_model)["final_layer.linear.weight"])
    assert int(state.step) == (7 if kind == "c2i" else 0)
    back = train_state_to_reference(state, kind)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_reference_training_checkpoint_errors():
    cfg = C2IConfig(in_channels=3, patch_size=4, hidden_size=32, num_groups=2, patch_depth=2, pixel_depth=1,
                    pixel_hidden_size=8, num_classes=10)
    model = {f"denoiser.{k}": v for k, v in to_reference_state_dict(build_model(cfg, rngs=nnx.Rngs(1))).items()}
    with pytest.raises(ConversionError, match="has no REPA projector but train_config.repa is set"):
        reference_train_state(model, cfg, _train_config("c2i"))
    with pytest.raises(ConversionError, match="has a REPA projector but train_config.repa is None"):
        reference_train_state({**model, **_projector("c2i", 32, 0)}, cfg, TrainConfig())
    with pytest.raises(ConversionError, match="t2i-style, train_config.repa.style is c2i"):
        reference_train_state({**model, **_projector("t2i", 32, 0)}, cfg, _train_config("c2i"))
    with pytest.raises(ConversionError, match="REPA projector: .*0.weight"):
        reference_train_state({**model, **_projector("c2i", 48, 0)}, cfg, _train_config("c2i"))

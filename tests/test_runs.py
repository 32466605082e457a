"""Run configs, data/model resolution and the theta encoding of :mod:`pixeldit.runs`, and one tiny REPA run."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixeldit import conditions, runconfig, runs
from pixeldit.embedders import ThetaEmbedder, encode_theta
from pixeldit.model import C2IConfig, preset
from pixeldit.repa import REPAConfig


def test_builtin_configs_resolve_against_their_data():
    digits = runconfig.load_run_config("digits")
    cfg = runs.resolve_model_config(digits.model, runs.load_run_dataset(digits))
    assert (cfg.kind, cfg.in_channels, cfg.num_classes) == ("c2i", 1, 10)
    grf = runconfig.load_run_config("grf")
    ds = runs.load_run_dataset(grf)
    cfg = runs.resolve_model_config(grf.model, ds)
    assert (cfg.kind, cfg.in_channels, cfg.theta_dim, cfg.theta_channels) == ("theta", 1, 2, 2)
    # the model carries the affine encoding of the GRF prior box (log_amplitude in [-1, 1], slope in [1, 4])
    assert cfg.theta_center == (0.0, 2.5) and cfg.theta_scale == (1.0, 1.5)
    assert ds.get_batch(0, 3)["y"].shape == (3, 2)  # raw theta: the model encodes it


def test_run_config_round_trips_through_run_json(tmp_path):
    run = runconfig.load_run_config("grf", ["train.steps=7", "sample.theta=[[0.1, 2.0]]", "train.betas=[0.9, 0.99]"])
    runconfig.save_run_config(run, tmp_path)
    again = runconfig.read_run_config(tmp_path)
    assert again == run
    assert json.loads((tmp_path / runconfig.RUN_FILE).read_text())["sample"]["theta"] == [[0.1, 2.0]]
    assert runconfig.load_run_config(tmp_path, ["train.steps=9"]).train.steps == 9  # a workdir is a config source


def test_data_override_replaces_the_data_section(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 8, 8, 1), np.float32))
    run = runconfig.load_run_config("digits", ["data.normalize='minmax'"], data=tmp_path / "d.npz")
    assert run.data.source == str(tmp_path / "d.npz") and run.data.resolution is None
    with pytest.raises(runconfig.ConfigError, match="data.resolution"):
        runconfig.load_run_config("digits", ["data.resolution=8"], data=tmp_path / "d.npz")


def test_unconditional_data_becomes_one_class(tmp_path):
    np.savez(tmp_path / "u.npz", x=np.ones((5, 8, 8, 1), np.float32))
    run = runconfig.load_run_config("digits", data=tmp_path / "u.npz")
    ds = runs.load_run_dataset(run)
    cfg = runs.resolve_model_config(run.model, ds)
    assert cfg.num_classes == 1
    np.testing.assert_array_equal(ds.get_batch(0, 4)["y"], 0)
    assert ds.metadata()["unconditional"] is True


def test_theta_npz_picks_a_theta_model(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "t.npz", x=rng.normal(size=(6, 8, 8, 1)).astype(np.float32),
             theta=rng.uniform(10, 30, size=(6, 3)).astype(np.float32))
    run = runconfig.load_run_config("digits", ["model.kind='auto'"], data=tmp_path / "t.npz")
    ds = runs.load_run_dataset(run)
    cfg = runs.resolve_model_config(run.model, ds)
    assert (cfg.kind, cfg.theta_dim, cfg.theta_channels) == ("theta", 3, 2)
    z = np.asarray(encode_theta(ds.get_batch(0, 6)["y"], cfg.theta_center, cfg.theta_scale))[..., 0]
    assert z.min() == pytest.approx(-1.0, abs=1e-6) and z.max() == pytest.approx(1.0, abs=1e-6)  # data range -> [-1, 1]
    with pytest.raises(runconfig.ConfigError, match="does not fit"):
        runs.resolve_model_config({"kind": "c2i"}, ds)


def test_encode_theta_keeps_nan_rows_null():
    enc = {"kind": "affine", "center": [0.0, 2.5], "scale": [1.0, 1.5]}
    out = conditions.encode_theta(np.array([[1.0, 4.0], [np.nan, np.nan]]), enc)
    np.testing.assert_allclose(out[0], [[1.0, 1.0], [1.0, 1.0]])
    assert np.isnan(out[1]).all()
    np.testing.assert_array_equal(conditions.encode_theta(np.ones((2, 2)), None), np.ones((2, 2)))


def test_scalar_theta_keeps_its_magnitude_raw_and_encoded():
    """Scalar theta tokens skip the RMSNorm (which would keep only the sign); the affine encoding keeps it too."""
    raw = ThetaEmbedder(2, 1, 16, rngs=nnx.Rngs(0))
    a, b = raw(jnp.array([[0.5, 1.0]])), raw(jnp.array([[1.0, 4.0]]))
    assert float(jnp.abs(a - b).max()) > 0.1
    enc = {"kind": "affine", "center": [0.0, 2.5], "scale": [1.0, 1.5]}
    emb = ThetaEmbedder(2, 2, 16, rngs=nnx.Rngs(0))
    a = emb(jnp.asarray(conditions.encode_theta(np.array([[0.5, 1.0]]), enc)))
    b = emb(jnp.asarray(conditions.encode_theta(np.array([[1.0, 4.0]]), enc)))
    assert float(jnp.abs(a - b).max()) > 0.1


def test_conditions():
    from pixeldit.model import C2IConfig, ThetaConfig

    c2i = C2IConfig(in_channels=1, hidden_size=16, num_groups=2, patch_depth=1, pixel_depth=1, patch_size=4,
                    num_classes=10)
    y, y_null = conditions.make_conditions(c2i, {}, 5, labels=(3,))
    np.testing.assert_array_equal(y, 3)
    np.testing.assert_array_equal(y_null, 10)
    theta = ThetaConfig(hidden_size=16, num_groups=2, patch_depth=1, pixel_depth=1, theta_channels=2)
    y, y_null = conditions.make_conditions(theta, {"name": "grf"}, 4, seed=1)
    assert y.shape == (4, 2) and np.isnan(y_null).all()
    lo, hi = np.array([-1.0, 1.0]), np.array([1.0, 4.0])
    assert ((y >= lo) & (y <= hi)).all()
    y, _ = conditions.make_conditions(theta, {}, 3, theta=((0.5, 2.0),))
    np.testing.assert_allclose(y, [[0.5, 2.0]] * 3)
    with pytest.raises(runconfig.ConfigError, match="theta rows"):
        conditions.make_conditions(theta, {}, 3, theta=((0.5, 2.0, 1.0),))


def test_default_test_theta_lies_inside_the_prior():
    t = conditions.default_test_theta({"name": "grf"})
    assert t.shape == (9, 2)
    assert (t[:, 0] > -1).all() and (t[:, 0] < 1).all() and (t[:, 1] > 1).all() and (t[:, 1] < 4).all()


def test_theta_encoding_none_feeds_raw_scalars():
    run = runconfig.load_run_config("grf", ["model.theta_encoding='none'"])
    cfg = runs.resolve_model_config(run.model, runs.load_run_dataset(run))
    assert cfg.theta_channels == 1 and cfg.theta_center is None


@pytest.mark.slow  # two tiny trainings (~20 s on 2 cores)
def test_theta_run_with_the_encoding_beside_the_data_resumes_and_samples(tmp_path):
    """A theta checkpoint whose config has no theta_center (its encoding recorded in the dataset
    metadata, its batches encoded by ThetaEncodedDataset) resumes and samples as before."""
    from pixeldit import training

    tiny = ["model.hidden_size=16", "model.num_groups=2", "model.patch_depth=1", "model.pixel_depth=1",
            "model.pixel_hidden_size=4", "data.size=8", "train.batch_size=4", "train.sample_every=0",
            "sample.steps=2", "sample.num_samples=2", "sample.batch_size=2"]
    run = runconfig.load_run_config("grf", tiny + ["train.steps=2"])
    raw = runs.load_run_dataset(run)
    encoding = {"kind": "affine", "center": [0.0, 2.5], "scale": [1.0, 1.5]}
    legacy = conditions.ThetaEncodedDataset(raw, encoding)
    cfg = runs.resolve_model_config(run.model, raw).replace(theta_center=None, theta_scale=None)
    runconfig.save_run_config(run, tmp_path)
    training.train(cfg, run.train, legacy, tmp_path, progress=False)
    assert training.read_checkpoint_meta(tmp_path)["dataset"]["theta_encoding"] == encoding

    summary = runs.train_run(runconfig.load_run_config("grf", tiny + ["train.steps=4"]), tmp_path, progress=False)
    assert (summary["start_step"], summary["step"]) == (2, 4)
    out = runs.sample_run(tmp_path, progress=False)
    assert out["num_samples"] == 2


def test_paper_recipe_config_is_the_reference_yaml():
    run = runconfig.load_run_config("imagenet256-xl16", ["train.repa.encoder=/weights/dinov2.pth"])
    fields = {k: v for k, v in run.model.items() if k != "kind"}
    assert C2IConfig(**fields) == preset("XL/16")
    tc = run.train
    assert (tc.batch_size, tc.steps, tc.lr, tc.ema_decay, tc.grad_clip) == (256, 1_600_000, 1e-4, 0.9999, 1.0)
    assert (tc.time_distribution, tc.time_shift, tc.compute_dtype, tc.p_uncond) == ("logit_normal", 1.0, "bfloat16", 0.1)
    assert tc.repa == REPAConfig(align_layer=8, loss_weight=0.5, hidden_dim=1152, encoder_dim=768,
                                 encoder="/weights/dinov2.pth")
    s = run.sample
    assert (s.method, s.steps, s.guidance, s.guidance_interval, s.timeshift) == ("flow_dpm", 100, 3.25, (0.1, 1.0), 1.0)
    assert run.eval.samples_per_class * 1000 == 50_000


@pytest.mark.slow
def test_digits_run_with_repa_and_the_tiny_encoder(tmp_path):
    sets = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "train.sample_every=0", "model.hidden_size=32",
            "model.patch_depth=2", "train.repa.encoder=tiny", "train.repa.align_layer=1", "train.repa.encoder_dim=16"]
    summary = runs.train_run(runconfig.load_run_config("digits", sets), tmp_path, progress=False)
    assert summary["step"] == 2
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["repa_loss"] > 0 and r["loss"] > r["flow_loss"] for r in lines)
    with pytest.raises(ValueError, match="train.repa.encoder must name the encoder"):
        runs.repa_encoder(runconfig.load_run_config("digits", ["train.repa.align_layer=1"]).train, None)
def test_streaming_data_section(tmp_path):
    from PIL import Image

    from pixeldit.data.stream import StreamBatches

    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png")
    folder = tmp_path / "imgs"
    run = runconfig.load_run_config("digits", ["data.streaming=true", "data.resolution=8", "data.flip=true"], data=folder)
    ds = runs.load_run_dataset(run)
    assert isinstance(ds, StreamBatches) and ds.image_shape == (8, 8, 1)
    cfg = runs.resolve_model_config(run.model, ds)
    assert (cfg.kind, cfg.in_channels, cfg.num_classes) == ("c2i", 1, 2)
    assert ds.get_batch(0, 4)["x"].shape == (4, 8, 8, 1)
    ds.close()
    with pytest.raises(runconfig.ConfigError, match=r"data.resolution, data.flip need\(s\) data.streaming = true"):
        runconfig.load_run_config("digits", ["data.resolution=8", "data.flip=true"], data=folder)
    with pytest.raises(runconfig.ConfigError, match="data.upsample do"):
        runconfig.load_run_config("digits", ["data.streaming=true", "data.upsample='nearest'"], data=folder)

"""The ``pixeldit`` command, driven in-process with typer's CliRunner.

Every run uses one tiny model on 8x8 digits (``TINY``), so the train step and the samplers
compile once for the whole module; the workdir of the first run is shared by the sample,
eval, convert and info tests.  Bad-data and bad-config cases fail before anything compiles.
Smoke runs of the real built-in configs (their own, larger models) are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pixeldit import runconfig, runs
from pixeldit.sampling import REFERENCE_T2I_TIME
from pixeldit.cli import app

runner = CliRunner()

TINY_MODEL = {"hidden_size": 16, "num_groups": 2, "patch_depth": 1, "pixel_depth": 1, "pixel_hidden_size": 4,
              "patch_size": 4}
TINY_TRAIN = {"batch_size": 8, "steps": 2, "checkpoint_every": 1, "log_every": 1, "sample_every": 0,
              "warmup_steps": 0, "ema_decay": 0.5}
# Sampling draws of 2 and 6 images (guidance 2 from digits.toml): two compiled samplers for the module.
TINY_SAMPLE = {"num_samples": 6, "method": "euler", "steps": 2, "batch_size": 6, "preview_samples": 2}


def sets(section: str, values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += ["--set", f"{section}.{k}={json.dumps(v)}"]
    return out


TINY_ARGS = sets("model", TINY_MODEL) + sets("train", TINY_TRAIN) + sets("sample", TINY_SAMPLE) + ["--no-progress"]
TINY = TINY_ARGS + ["--set", "data.resolution=8"]  # 8x8 digits: 4 patch tokens


def invoke(*args, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok and result.exit_code != 0:
        raise AssertionError(f"pixeldit {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}"
                             f"\n{result.exception!r}")
    return result


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("cli") / "digits"
    invoke("train", "digits", "--workdir", wd, *TINY)
    return wd


# ---------------------------------------------------------------------------------------------
# train / resume
# ---------------------------------------------------------------------------------------------


def test_train_writes_run(digits_run):
    assert (digits_run / "checkpoints" / "2").is_dir()
    run = json.loads((digits_run / runconfig.RUN_FILE).read_text())
    assert run["name"] == "digits" and run["model"]["hidden_size"] == 16 and run["data"]["resolution"] == 8
    steps = [json.loads(line)["step"] for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    summary = json.loads((digits_run / "summary.json").read_text())
    assert summary["step"] == 2 and summary["num_params"] > 0


def test_resume_continues_step_count(digits_run, tmp_path):
    wd = tmp_path / "resume"
    shutil.copytree(digits_run, wd)
    r = invoke("train", "digits", "--workdir", wd, *TINY, "--set", "train.steps=3")
    assert "done: step 3 (1 this run)" in r.output
    steps = [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # without a config, --workdir alone resumes with the stored run.json
    r = invoke("train", "--workdir", wd, "--set", "train.steps=4", "--no-progress")
    assert "done: step 4 (1 this run)" in r.output
    assert json.loads((wd / runconfig.RUN_FILE).read_text())["train"]["steps"] == 4


def test_resume_with_changed_model_names_the_field(digits_run, tmp_path):
    wd = tmp_path / "changed"
    shutil.copytree(digits_run, wd)
    r = invoke("train", "digits", "--workdir", wd, *TINY, "--set", "model.pixel_hidden_size=8", ok=False)
    assert r.exit_code == 1
    assert "pixel_hidden_size" in r.output and "error:" in r.output
    assert json.loads((wd / runconfig.RUN_FILE).read_text())["model"]["pixel_hidden_size"] == 4  # run.json kept


def test_ctrl_c_saves_a_checkpoint(tmp_path, monkeypatch):
    real = runs.load_run_dataset

    class Interrupting:
        def __init__(self, ds):
            self.ds = ds

        def __getattr__(self, name):
            return getattr(self.ds, name)

        def get_batch(self, step, batch_size):
            if step == 1:
                raise KeyboardInterrupt
            return self.ds.get_batch(step, batch_size)

    monkeypatch.setattr(runs, "load_run_dataset", lambda run: Interrupting(real(run)))
    wd = tmp_path / "interrupted"
    r = invoke("train", "digits", "--workdir", wd, *TINY, "--set", "train.checkpoint_every=100", ok=False)
    assert r.exit_code == 130
    assert "interrupted (SIGINT): checkpoint at step 1" in r.output
    assert (wd / "checkpoints" / "1").is_dir()


def test_preview_grids_during_training(tmp_path):
    wd = tmp_path / "preview"
    invoke("train", "digits", "--workdir", wd, *TINY, "--set", "train.sample_every=2")
    png = wd / "samples" / "step_000002.png"
    with Image.open(png) as im:
        assert im.size[0] > 100 and im.size[1] > 20


# ---------------------------------------------------------------------------------------------
# sample / eval / info
# ---------------------------------------------------------------------------------------------


def test_sample_writes_png_and_npz(digits_run, tmp_path):
    out = tmp_path / "s"
    r = invoke("sample", digits_run, "--num", 6, "--labels", "3,7", "--guidance", 2.0, "--steps", 2,
               "--method", "euler", "--seed", 4, "--out", out, "--no-progress")
    assert "6 samples from step 2" in r.output
    with Image.open(out / "samples.png") as im:
        im.load()
        assert im.size[0] > 50
    with np.load(out / "samples.npz") as f:
        assert f["x"].shape == (6, 8, 8, 1) and np.isfinite(f["x"]).all()
        np.testing.assert_array_equal(f["y"], [3, 7, 3, 7, 3, 7])
        settings = json.loads(str(f["settings"]))
    assert settings["guidance"] == 2.0 and settings["seed"] == 4 and settings["ema"] is True


def test_sample_adm_out_writes_evaluator_batches_and_resumes(digits_run, tmp_path):
    args = ("sample", digits_run, "--num", 12, "--labels", "3,7", "--set", "sample.batch_size=6", "--no-progress",
            "--adm-out", tmp_path / "adm")
    r = invoke(*args)
    assert "12 samples from step 2: 2 batches drawn, 0 already there" in r.output
    with np.load(tmp_path / "adm" / "samples_12.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (12, 8, 8, 3)  # grayscale digits as RGB
    np.testing.assert_array_equal(labels, [3, 7] * 6)
    (tmp_path / "adm" / "batch_000001.npz").unlink()
    assert "1 batches drawn, 1 already there" in invoke(*args).output
    np.testing.assert_array_equal(np.load(tmp_path / "adm" / "samples_12.npz")["arr_0"], images)


def test_sample_is_reproducible_and_raw_differs(digits_run, tmp_path):
    args = ("sample", digits_run, "--num", 2, "--no-progress")
    invoke(*args, "--out", tmp_path / "a")
    invoke(*args, "--out", tmp_path / "b")
    invoke(*args, "--out", tmp_path / "c", "--raw")
    a, b, c = (np.load(tmp_path / d / "samples.npz")["x"] for d in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_command_fills_the_compilation_cache(digits_run, tmp_path):
    """The real entry point (subprocess) caches compiled programs under $XDG_CACHE_HOME/pixeldit/jax."""
    drop = ("XLA_FLAGS", "PIXELDIT_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    cmd = [sys.executable, "-m", "pixeldit", "sample", str(digits_run), "--num", "2", "--steps", "2",
           "--method", "euler", "--no-progress"]
    for out in ("a", "b"):
        subprocess.run([*cmd, "--out", str(tmp_path / out)], env=env, check=True, capture_output=True, timeout=600)
    cached = [p for p in (tmp_path / "xdg" / "pixeldit" / "jax").rglob("*") if p.is_file()]
    assert cached, "no compiled program was written to the cache"
    a, b = (np.load(tmp_path / d / "samples.npz")["x"] for d in "ab")
    np.testing.assert_array_equal(a, b)  # the run that loaded cached programs gives the same samples


def test_sample_rejects_bad_labels(digits_run, tmp_path):
    r = invoke("sample", digits_run, "--labels", "12", "--out", tmp_path, ok=False)
    assert r.exit_code == 1 and "labels must be in [0, 9]" in r.output


def test_eval_digits_writes_metrics(digits_run, tmp_path):
    out = tmp_path / "eval"
    r = invoke("eval", digits_run, "--out", out, "--set", "eval.samples_per_class=2", "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "accuracy_per_class", "diversity_per_class", "diversity_mean", "diversity_min",
                "classifier_heldout_accuracy", "checks", "plots", "step"):
        assert key in metrics, key
    assert metrics["num_samples"] == 20 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["classifier_heldout_accuracy"] > 0.9
    with Image.open(metrics["plots"]["samples_vs_real"]) as im:
        im.load()
    assert "accuracy >= 0.9" in r.output


def test_eval_inception_reports_fid_and_caches_the_data_statistics(digits_run, tmp_path, monkeypatch):
    # the FID Inception itself is tested in tests/fid; here a fixed feature map stands in for it
    monkeypatch.setattr(runs, "load_fid_inception", lambda path: lambda x: x.reshape(x.shape[0], -1)[:, ::13])
    args = ("eval", digits_run, "--set", "eval.samples_per_class=2", "--set", "eval.num_samples=6", "--no-progress",
            "--inception", tmp_path / "pt_inception.pth", "--fid-stats", tmp_path / "stats.npz")
    invoke(*args, "--out", tmp_path / "a")
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert first["fid"] > 0 and first["fid_num_samples"] == 6 and first["fid_num_real"] == 1797
    with np.load(tmp_path / "stats.npz") as f:
        stats = dict(f)
    np.savez(tmp_path / "stats.npz", **dict(stats, mu=stats["mu"] + 1.0))  # shifted: the cache must be what is read
    invoke(*args, "--out", tmp_path / "b")
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert again["fid"] > first["fid"] + 1.0


def test_info_prints_parameter_count(digits_run):
    from pixeldit.model import count_params, preset

    r = invoke("info", "XL/16", "--no-flops")
    assert f"parameters: {count_params(preset('XL/16')):,}" in r.output
    info = json.loads(invoke("info", digits_run, "--json", "--no-flops").output)
    assert info["num_params"] == json.loads((digits_run / "summary.json").read_text())["num_params"]
    assert info["image_size"] == [8, 8] and info["source"].startswith("workdir")


def test_info_flops_count_every_block(digits_run):
    one = json.loads(invoke("info", "digits", "--json", *sets("model", TINY_MODEL), "--set", "data.resolution=8").output)
    deeper = {**TINY_MODEL, "patch_depth": 3}
    three = json.loads(invoke("info", "digits", "--json", *sets("model", deeper), "--set", "data.resolution=8").output)
    assert one["num_params"] == json.loads((digits_run / "summary.json").read_text())["num_params"]
    assert one["flops_per_forward"] > 0
    assert three["flops_per_forward"] > one["flops_per_forward"] * 1.2  # blocks in a scan are counted too


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory) -> Path:
    """digits_run's EMA weights as a reference-named .safetensors file."""
    path = tmp_path_factory.mktemp("export") / "exported.safetensors"
    r = invoke("convert", digits_run, path)
    assert "reference-named tensors" in r.output
    return path


def test_convert_round_trip(digits_run, exported, tmp_path):
    from safetensors.numpy import load_file

    first = exported
    cfg = json.loads((digits_run / "config.json").read_text())["model_config"]
    kwargs = {k: v for k, v in cfg.items() if k not in ("kind", "dtype", "param_dtype", "remat", "scan_unroll")}
    (tmp_path / "kwargs.json").write_text(json.dumps(kwargs))
    imported = tmp_path / "imported"
    r = invoke("convert", first, imported, "--kwargs", tmp_path / "kwargs.json", "--image-size", 8, 8)
    assert "c2i checkpoint" in r.output
    second = tmp_path / "again.safetensors"
    invoke("convert", imported, second)
    a, b = load_file(str(first)), load_file(str(second))
    assert set(a) == set(b) and "y_embedder.embedding_table.weight" in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the imported checkpoint samples like the original's EMA weights (settings of digits_run's run.json)
    invoke("sample", digits_run, "--num", 2, "--out", tmp_path / "orig", "--no-progress")
    invoke("sample", imported, "--num", 2, "--out", tmp_path / "conv", "--no-progress",
           *sets("sample", {k: TINY_SAMPLE[k] for k in ("method", "steps", "batch_size")}), "--guidance", 2.0)
    np.testing.assert_allclose(np.load(tmp_path / "orig" / "samples.npz")["x"],
                               np.load(tmp_path / "conv" / "samples.npz")["x"], atol=1e-5)


def test_convert_lightning_ckpt_takes_ema_weights(digits_run, exported, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    sd = load_file(str(exported))
    ckpt = {"state_dict": {**{f"ema_denoiser.{k}": torch.from_numpy(v) for k, v in sd.items()},
                           **{f"denoiser.{k}": torch.zeros(v.shape) for k, v in sd.items()}}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    cfg = json.loads((digits_run / "config.json").read_text())["model_config"]
    (tmp_path / "kw.json").write_text(json.dumps(
        {"kind": "c2i", **{k: v for k, v in cfg.items() if k not in ("kind", "dtype", "param_dtype", "remat", "scan_unroll")}}))
    invoke("convert", tmp_path / "last.ckpt", tmp_path / "wd", "--kwargs", tmp_path / "kw.json")
    invoke("convert", tmp_path / "wd", tmp_path / "back.safetensors")
    back = load_file(str(tmp_path / "back.safetensors"))
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_convert_errors(digits_run, exported, tmp_path):
    ref = exported
    r = invoke("convert", ref, tmp_path / "x", ok=False)
    assert r.exit_code == 1 and "--kwargs" in r.output and "--preset" in r.output
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 16, "bogus_arg": 1}))
    r = invoke("convert", ref, tmp_path / "y", "--kwargs", tmp_path / "bad.json", ok=False)
    assert r.exit_code == 1 and "bogus_arg" in r.output
    (tmp_path / "wrong.json").write_text(json.dumps({**TINY_MODEL, "hidden_size": 32, "in_channels": 1, "num_classes": 10}))
    r = invoke("convert", ref, tmp_path / "z", "--kwargs", tmp_path / "wrong.json", ok=False)
    assert r.exit_code == 1 and "error:" in r.output and "shape" in r.output
    r = invoke("convert", digits_run, tmp_path / "out.bin", ok=False)
    assert r.exit_code == 1 and ".safetensors" in r.output


# ---------------------------------------------------------------------------------------------
# bad data: clear messages naming the file, before anything compiles
# ---------------------------------------------------------------------------------------------


def _png(path: Path, size=(8, 8), value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def train_on(data, tmp_path):
    return invoke("train", "digits", "--data", data, "--workdir", tmp_path / "wd", *TINY_ARGS, ok=False)


def test_bad_data_mixed_sizes(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png", size=(12, 12))
    r = train_on(tmp_path / "imgs", tmp_path)
    assert r.exit_code == 1 and "b.png" in r.output and "same size" in r.output


def test_bad_data_side_not_divisible_by_patch(tmp_path):
    _png(tmp_path / "imgs" / "odd.png", size=(6, 6))
    r = train_on(tmp_path / "imgs", tmp_path)
    assert r.exit_code == 1 and "odd.png" in r.output and "patch_size=4" in r.output


def test_bad_data_nan_in_npz(tmp_path):
    x = np.zeros((4, 8, 8, 1), np.float32)
    x[2, 3, 3, 0] = np.nan
    np.savez(tmp_path / "fields.npz", x=x)
    r = train_on(tmp_path / "fields.npz", tmp_path)
    assert r.exit_code == 1 and "fields.npz" in r.output and "NaN" in r.output


def test_bad_data_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = train_on(tmp_path / "empty", tmp_path)
    assert r.exit_code == 1 and "empty" in r.output and "no images" in r.output


def test_bad_data_unreadable_file(tmp_path):
    _png(tmp_path / "imgs" / "good.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png at all")
    r = train_on(tmp_path / "imgs", tmp_path)
    assert r.exit_code == 1 and "broken.png" in r.output and "cannot read" in r.output


def test_bad_data_missing_path(tmp_path):
    r = train_on(tmp_path / "nowhere", tmp_path)
    assert r.exit_code == 1 and "nowhere" in r.output


# ---------------------------------------------------------------------------------------------
# bad configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.bogus=1", ["[train]", "bogus", "known keys", "batch_size"]),
        ("model.hidden_sise=32", ["[model]", "hidden_sise"]),
        ("sample.method=rk99", ["sample.method", "rk99"]),
        ("data.size=32", ["data.size", "digits"]),
        ("optim.lr=1", ["[optim]", "sections"]),
        ("train.steps=-3", ["steps", "-3"]),
        ("train.lr", ["section.key=value"]),
        ("model.hidden_size=63", ["hidden_size=63", "num_groups"]),
        ("model.num_classes=7", ["num_classes=7", "10"]),
    ],
)
def test_bad_config_is_named(override, words, tmp_path):
    r = invoke("train", "digits", "--workdir", tmp_path / "wd", "--set", override, "--no-progress", ok=False)
    assert r.exit_code == 1, r.output
    assert "error:" in r.output, r.output
    for w in words:
        assert w in r.output, (w, r.output)
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_bad_config_file(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text('[model]\nhidden_size = 32\n[data]\nsource = "digits"\nresolutoin = 16\n')
    r = invoke("train", bad, "--workdir", tmp_path / "wd", ok=False)
    assert r.exit_code == 1 and "resolutoin" in r.output and "[data]" in r.output
    r = invoke("train", "no_such_config", ok=False)
    assert r.exit_code == 1 and "digits" in r.output and "grf" in r.output
    bad.write_text("[model\n")
    r = invoke("train", bad, ok=False)
    assert r.exit_code == 1 and "cannot parse" in r.output


def test_builtin_configs_validate():
    assert {"digits", "grf"} <= set(runconfig.builtin_configs())
    for name in ("digits", "grf"):
        run = runconfig.load_run_config(name)
        ds = runs.load_run_dataset(run)
        cfg = runs.resolve_model_config(run.model, ds)
        assert cfg.kind == ("c2i" if name == "digits" else "theta")


def test_override_values_parse_as_toml():
    assert runconfig.parse_override("train.lr=3e-4") == ("train", "lr", 3e-4)
    assert runconfig.parse_override("sample.labels=[1, 7]") == ("sample", "labels", [1, 7])
    assert runconfig.parse_override("data.source=my images/") == ("data", "source", "my images/")
    assert runconfig.parse_override("train.remat=true") == ("train", "remat", True)


# ---------------------------------------------------------------------------------------------
# smoke runs of the built-in configs (their real model sizes; a handful of steps)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_digits_config(tmp_path):
    wd = tmp_path / "digits"
    invoke("train", "digits", "--workdir", wd, "--set", "train.steps=3", "--set", "train.sample_every=3",
           "--set", "sample.steps=2", "--no-progress")
    assert (wd / "samples" / "step_000003.png").is_file()
    invoke("eval", wd, "--set", "eval.samples_per_class=2", "--set", "sample.steps=2", "--no-progress")
    assert json.loads((wd / "eval" / "metrics.json").read_text())["num_samples"] == 20


@pytest.mark.slow
def test_smoke_grf_config(tmp_path):
    wd = tmp_path / "grf"
    invoke("train", "grf", "--workdir", wd, "--set", "train.steps=3", "--set", "train.sample_every=0", "--no-progress")
    r = invoke("sample", wd, "--num", 4, "--theta", "0.5,2.0;-0.5,3.5", "--steps", 2, "--no-progress")
    with np.load(wd / "samples" / "samples.npz") as f:
        assert f["x"].shape == (4, 32, 32, 1)
        np.testing.assert_allclose(f["theta"], [[0.5, 2.0], [-0.5, 3.5]] * 2)
    assert "grid:" in r.output
    invoke("eval", wd, "--set", "eval.samples_per_theta=2", "--set", "eval.n_sim=4", "--set", "sample.steps=2",
           "--set", "eval.test_theta=[[0.0, 2.5], [0.5, 3.0]]", "--no-progress")
    m = json.loads((wd / "eval" / "metrics.json").read_text())
    for key in ("spectrum_log10_error", "std_ratio_mean", "std_ratio_min", "std_ratio_max", "per_theta", "checks"):
        assert key in m, key
    assert m["num_thetas"] == 2
    with Image.open(m["plots"]["power_spectra"]) as im:
        im.load()


@pytest.mark.slow
def test_unconditional_image_folder(tmp_path):
    for i in range(6):
        _png(tmp_path / "imgs" / f"{i}.png", value=40 * i)
    wd = tmp_path / "wd"
    invoke("train", "digits", "--data", tmp_path / "imgs", "--workdir", wd, *TINY_ARGS)
    invoke("sample", wd, "--num", 3, "--out", tmp_path / "s", "--no-progress")
    assert np.load(tmp_path / "s" / "samples.npz")["x"].shape == (3, 8, 8, 1)
    invoke("eval", wd, "--set", "eval.num_samples=4", "--no-progress")
    m = json.loads((wd / "eval" / "metrics.json").read_text())
    assert "std_ratio" in m and m["num_samples"] == 4


@pytest.mark.slow
def test_convert_and_sample_t2i(tmp_path):
    from flax import nnx

    from pixeldit.convert import save_reference_safetensors
    from pixeldit.model import T2IConfig, build_model

    kwargs = dict(in_channels=3, hidden_size=16, num_groups=2, patch_depth=1, pixel_depth=1, pixel_hidden_size=4,
                  patch_size=4, txt_embed_dim=8, txt_max_length=4)
    save_reference_safetensors(build_model(T2IConfig(**kwargs), rngs=nnx.Rngs(0)), tmp_path / "t2i.safetensors")
    (tmp_path / "kw.json").write_text(json.dumps({"kind": "t2i", **kwargs}))
    invoke("convert", tmp_path / "t2i.safetensors", tmp_path / "wd", "--kwargs", tmp_path / "kw.json",
           "--image-size", 8, 8)
    assert json.loads((tmp_path / "wd" / "config.json").read_text())["time_convention"] == REFERENCE_T2I_TIME
    r = invoke("sample", tmp_path / "wd", "--num", 2, ok=False)
    assert r.exit_code == 1 and "--condition" in r.output
    np.savez(tmp_path / "tokens.npz", y=np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32))
    invoke("sample", tmp_path / "wd", "--num", 2, "--condition", tmp_path / "tokens.npz", "--steps", 2,
           "--method", "euler", "--guidance", 2.0, "--out", tmp_path / "s", "--no-progress")
    x = np.load(tmp_path / "s" / "samples.npz")["x"]
    assert x.shape == (2, 8, 8, 3) and np.isfinite(x).all()

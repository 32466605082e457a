"""Continuing a reference (Lightning) training run: ``pixeldit convert CKPT WORKDIR --config ...``.

``golden/resume_c2i.npz`` holds one training step of the reference's c2i ``REPATrainer``
(``scripts/golden/make_resume_golden.py``): the checkpoint's weights, the batch, every random draw,
the encoder tokens and the losses.  The checkpoint goes through the user path into a workdir; the
state a resumed run restores from it, stepped by the train step the training loop uses on the same
inputs and draws, must give the reference's losses and gradient norm (float32 products at full
precision, as the reference computes them: the REPA projector is outside the model's own choice).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from golden import assert_close, load, nchw_to_nhwc
from seeded import seeded_state_dict

from pixeldit import cli
from pixeldit.convert import train_state_to_reference
from pixeldit.model import config_from_dict
from pixeldit.training import (
    TrainConfig,
    abstract_train_state,
    checkpoint_manager,
    latest_checkpoint_step,
    read_checkpoint_meta,
    read_metrics,
    restore_train_state,
    shared_train_step,
)

import torch  # noqa: E402  (the test and torch extras; a parity test fails, never skips, without it)

CONFIG, GOLDEN = load("resume_c2i.npz")
STEP = CONFIG["global_step"]


def _reference_state_dict() -> dict[str, np.ndarray]:
    """The reference checkpoint's state dict: stored weights plus the EMA rebuilt from its seed."""
    sd = {k[len("sd/"):]: GOLDEN[k] for k in GOLDEN.files if k.startswith("sd/")}
    ema = CONFIG["ema"]
    sd.update({ema["prefix"] + k: v for k, v in seeded_state_dict(ema["shapes"], seed=ema["seed"]).items()})
    return sd


def _write_ckpt(path: Path, state_dict: dict[str, np.ndarray], **extra) -> Path:
    """A Lightning-style ``.ckpt``: a torch pickle with ``state_dict`` and ``global_step``."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
    torch.save({"state_dict": tensors, "global_step": STEP, "epoch": 3, **extra}, path)
    return path


def _run_settings(steps: int = STEP + 1, repa: bool = True) -> list[str]:
    """``--set`` options giving the golden model on the built-in digits run (1 channel, 10 classes, 16 px)."""
    m, r = CONFIG["model"], CONFIG["repa"]
    sets = [f"model.{k}={m[k]}" for k in ("patch_size", "hidden_size", "num_groups", "patch_depth", "pixel_depth",
                                           "pixel_hidden_size")]
    sets += [f"train.steps={steps}", f"train.batch_size={CONFIG['batch']}", "train.sample_every=0",
             "train.checkpoint_every=1000", "train.log_every=1"]
    if repa:
        sets += ['train.repa.style="c2i"', f"train.repa.align_layer={r['align_layer']}",
                 f"train.repa.loss_weight={r['feat_loss_weight']}", f"train.repa.hidden_dim={r['proj_hidden_dim']}",
                 f"train.repa.encoder_dim={r['proj_encoder_dim']}", 'train.repa.encoder="tiny"']
    return [a for s in sets for a in ("--set", s)]


def _convert(capsys, ckpt: Path, workdir: Path, *args) -> tuple[int, str, str]:
    code = cli.run(["convert", str(ckpt), str(workdir), "--config", "digits", *_run_settings(), *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _write_ckpt(tmp_path_factory.mktemp("reference") / "last.ckpt", _reference_state_dict())


class FixedTokens(nnx.Module):
    """The frozen encoder's place: the reference step's encoder tokens, whatever the images."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = nnx.Variable(jnp.asarray(tokens))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.tokens[...]


def _restore(workdir: Path):
    """The train state a resumed run starts from, and its train config."""
    meta = read_checkpoint_meta(workdir)
    model_config, train_config = config_from_dict(meta["model_config"]), TrainConfig.from_dict(meta["train_config"])
    with checkpoint_manager(workdir, read_only=True) as mngr:
        state = restore_train_state(mngr, mngr.latest_step(), abstract_train_state(model_config, train_config))
    return state, model_config, train_config


def test_first_step_after_conversion_matches_the_reference_step(ckpt, tmp_path, capsys, reference_precision):
    workdir = tmp_path / "run"
    code, out, err = _convert(capsys, ckpt, workdir)
    assert code == 0, err
    assert f"at step {STEP}, REPA projector included" in out and f"pixeldit train --workdir {workdir}" in out
    state, model_config, tc = _restore(workdir)
    assert int(state.step) == STEP
    back = train_state_to_reference(state, "c2i")  # raw weights, EMA and projector, as the checkpoint held them
    expected = _reference_state_dict()
    assert sorted(back) == sorted(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    encoder_graphdef, encoder_state = nnx.split(FixedTokens(GOLDEN["in/encoder_tokens"]))
    step_fn, _ = shared_train_step(state.graphdef, tc, model_config.dtype, encoder_graphdef)
    batch = {"x": jnp.asarray(nchw_to_nhwc(GOLDEN["in/x"])), "y": jnp.asarray(GOLDEN["in/y"]),
             "draws": {"t": GOLDEN["in/t"], "noise": nchw_to_nhwc(GOLDEN["in/noise"]), "drop": GOLDEN["in/drop"]}}
    assert GOLDEN["in/drop"].any() and not GOLDEN["in/drop"].all()  # both label paths are exercised
    new_state, metrics = step_fn(state, batch, encoder_state)
    assert_close(metrics["flow_loss"], GOLDEN["out/flow_loss"])
    assert_close(metrics["repa_loss"], GOLDEN["out/repa_loss"])
    assert_close(metrics["loss"], GOLDEN["out/loss"])
    assert_close(metrics["grad_norm"], GOLDEN["out/grad_norm"])
    assert int(new_state.step) == STEP + 1


def test_train_continues_the_converted_run(ckpt, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _convert(capsys, ckpt, workdir)[0] == 0
    run = json.loads((workdir / "run.json").read_text())
    assert run["history"][0]["converted_from"] == str(ckpt.resolve()) and run["history"][0]["at_step"] == STEP
    assert cli.run(["train", "--workdir", str(workdir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"done: step {STEP + 1} (1 this run)" in out
    assert latest_checkpoint_step(workdir) == STEP + 1
    (record,) = read_metrics(workdir)
    assert record["step"] == STEP + 1 and np.isfinite(record["repa_loss"]) and np.isfinite(record["flow_loss"])


def _one_error(capsys, code: int) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def _without(sd: dict, prefix: str) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(prefix)}


def test_projector_missing_while_the_config_has_repa(tmp_path, capsys):
    ckpt = _write_ckpt(tmp_path / "no_proj.ckpt", _without(_reference_state_dict(), "diffusion_trainer."))
    code = cli.run(["convert", str(ckpt), str(tmp_path / "w"), "--config", "digits", *_run_settings()])
    assert "has no REPA projector but train_config.repa is set" in _one_error(capsys, code)
    assert latest_checkpoint_step(tmp_path / "w") is None


def test_projector_present_while_the_config_has_no_repa(ckpt, tmp_path, capsys):
    code = cli.run(["convert", str(ckpt), str(tmp_path / "w"), "--config", "digits", *_run_settings(repa=False)])
    assert "has a REPA projector but train_config.repa is None" in _one_error(capsys, code)


def test_projector_of_the_wrong_style(tmp_path, capsys):
    sd = _reference_state_dict()
    t2i = {k.replace("diffusion_trainer.proj.0.", "_repa_projector."): v for k, v in sd.items()}
    ckpt = _write_ckpt(tmp_path / "t2i_proj.ckpt", t2i)
    code = cli.run(["convert", str(ckpt), str(tmp_path / "w"), "--config", "digits", *_run_settings()])
    assert "t2i-style, train_config.repa.style is c2i" in _one_error(capsys, code)


@pytest.mark.parametrize("setting, words", [
    ("model.hidden_size=64", ["does not match the model", "wrong shape", "expected (64,"]),
    ("train.repa.hidden_dim=20", ["REPA projector", "0.weight"]),
    (f"train.steps={STEP - 1}", [f"train.steps={STEP - 1} is below the checkpoint's global_step {STEP}"]),
])
def test_mismatches_are_one_line_errors(ckpt, tmp_path, capsys, setting, words):
    code = cli.run(["convert", str(ckpt), str(tmp_path / "w"), "--config", "digits", *_run_settings(),
                    "--set", setting])
    line = _one_error(capsys, code)
    for w in words:
        assert w in line, (w, line)
    assert latest_checkpoint_step(tmp_path / "w") is None


def test_option_conflicts_and_existing_workdir(ckpt, tmp_path, capsys):
    code = cli.run(["convert", str(ckpt), str(tmp_path / "w"), "--config", "digits", "--preset", "XL/16"])
    assert "do not apply with --config" in _one_error(capsys, code)
    code = cli.run(["convert", str(ckpt), str(tmp_path / "w"), "--set", "train.steps=5"])
    assert "apply with --config" in _one_error(capsys, code)
    workdir = tmp_path / "run"
    assert _convert(capsys, ckpt, workdir)[0] == 0
    code, _, err = _convert(capsys, ckpt, workdir)
    assert code == 1 and "already holds checkpoints" in err

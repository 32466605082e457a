"""Tests for pixeldit.training: train step, EMA, checkpointing, resume, failure handling.

All tests use one tiny real c2i config on 8x8 single-channel images.  Runs that
go through :func:`train` share one compiled train step (same numerics), so only
the first of them pays the compilation.
"""

import dataclasses
import json
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pixeldit import training as T
from pixeldit.model import C2IConfig, ThetaConfig

CFG = C2IConfig(
    in_channels=1, patch_size=4, hidden_size=32, num_groups=2, patch_depth=2, pixel_depth=1, pixel_hidden_size=8, num_classes=10
)
# Shared numerics of every train() call below; only resume-free fields vary between tests.
BASE = T.TrainConfig(
    batch_size=16,
    steps=6,
    lr=3e-3,
    warmup_steps=10,
    ema_decay=0.9,
    p_uncond=0.1,
    grad_clip=1.0,
    log_every=1,
    checkpoint_every=2,
    keep_checkpoints=3,
)


def tc(**kw) -> T.TrainConfig:
    return dataclasses.replace(BASE, **kw)


class ToyDataset:
    """Four fixed 8x8 binary images with labels 0..3; batches deterministic in (seed, step)."""

    def __init__(self, seed=0, nan_at=(), interrupt_at=()):
        self.seed = seed
        rng = np.random.default_rng(1234)
        self.x = (0.8 * np.sign(rng.normal(size=(4, 8, 8, 1)))).astype(np.float32)
        self.nan_at = set(nan_at)
        self.interrupt_at = set(interrupt_at)
        self.calls = []

    def get_batch(self, step, batch_size):
        self.calls.append(step)
        if step in self.interrupt_at:
            raise KeyboardInterrupt
        idx = np.random.default_rng([self.seed, step]).integers(0, 4, size=batch_size)
        x = self.x[idx].copy()
        if step in self.nan_at:
            x[0, 0, 0, 0] = np.nan
        return {"x": x, "y": idx.astype(np.int32)}

    def metadata(self):
        return {"name": "toy", "size": 4, "seed": self.seed}


def host(tree):
    return jax.tree.map(lambda a: np.array(a), tree)


def full_state(workdir, step=None):
    mngr = T.checkpoint_manager(workdir, read_only=True)
    step = mngr.latest_step() if step is None else step
    state = T.restore_train_state(mngr, step, T.abstract_train_state(CFG, BASE))
    mngr.close()
    return state


def tree_allclose(a, b, atol=1e-6, rtol=0.0):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return all(np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol) for x, y in zip(la, lb))


def ckpt_dirs(workdir):
    return sorted(p.name for p in (Path(workdir) / T.CHECKPOINT_SUBDIR).iterdir() if p.is_dir())


# --------------------------------------------------------------------------- config


def test_train_config_validation_and_roundtrip():
    c = tc(betas=[0.8, 0.95], compute_dtype="bfloat16", grad_clip=None)
    assert c.betas == (0.8, 0.95)
    d = json.loads(json.dumps(c.to_dict()))
    assert T.TrainConfig.from_dict(d) == c
    with pytest.raises(ValueError) as e:
        T.TrainConfig(batch_size=0, lr=-1.0, p_uncond=1.5, time_distribution="beta", compute_dtype="float16")
    msg = str(e.value)
    for field in ("batch_size", "lr", "p_uncond", "time_distribution", "compute_dtype"):
        assert field in msg
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        T.TrainConfig.from_dict({"batch_size": 2, "bogus": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0


def test_lr_schedule_warmup_then_constant():
    s = T.lr_schedule(tc(lr=1.0, warmup_steps=4))
    np.testing.assert_allclose([float(s(i)) for i in range(6)], [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert float(T.lr_schedule(tc(lr=0.5, warmup_steps=0))(0)) == 0.5


def test_effective_model_config_overrides():
    eff = T.effective_model_config(CFG, tc(compute_dtype="bfloat16", remat=True))
    assert eff.dtype == "bfloat16" and eff.remat is True and eff.hidden_size == CFG.hidden_size
    assert T.effective_model_config(CFG, BASE) == CFG


# --------------------------------------------------------------------------- train step


@pytest.fixture(scope="module")
def stepped():
    """Five direct steps of the shared (train()'s) compiled step, recorded on the host."""
    config = BASE  # CFG dropout on (p_uncond=0.1), weight decay off
    state = jax.device_put(T.create_train_state(CFG, config), jax.devices()[0])
    step_fn, counter = T.shared_train_step(state.graphdef, config)
    ds = ToyDataset()
    params, emas, metrics, new_traces = [host(state.params)], [host(state.ema_params)], [], []
    for s in range(5):
        before = counter[0]
        state, m = step_fn(state, T.prepare_batch(ds.get_batch(s, config.batch_size)))
        params.append(host(state.params))
        emas.append(host(state.ema_params))
        metrics.append({k: float(v) for k, v in m.items()})
        new_traces.append(counter[0] - before)
    return dict(config=config, state=state, step_fn=step_fn, counter=counter, params=params, emas=emas,
                metrics=metrics, new_traces=new_traces, ds=ds)


def test_no_retrace_across_steps(stepped):
    # traced at most once (not at all if an earlier train() call in this process compiled it)
    assert stepped["new_traces"][0] <= 1 and stepped["new_traces"][1:] == [0, 0, 0, 0]
    # the counter does see a new trace when the batch shape changes (lowering only, no compile)
    before = stepped["counter"][0]
    stepped["step_fn"].lower(stepped["state"], T.prepare_batch(stepped["ds"].get_batch(0, 4)))
    assert stepped["counter"][0] == before + 1
    # a separately built step counts its own traces
    traces = []
    fn = T.make_train_step(stepped["state"].graphdef, BASE, on_trace=lambda: traces.append(1))
    fn.lower(stepped["state"], T.prepare_batch(stepped["ds"].get_batch(0, BASE.batch_size)))
    assert len(traces) == 1


def test_master_weights_float32_and_state_is_array_pytree(stepped):
    state = stepped["state"]
    assert int(state.step) == 5
    for leaf in jax.tree.leaves(state):
        assert isinstance(leaf, jax.Array)
    for leaf in jax.tree.leaves((state.params, state.ema_params)):
        assert leaf.dtype == jnp.float32


def test_every_parameter_receives_gradient(stepped):
    # Zero-initialised output/modulation layers block the gradient of everything upstream at
    # step 0; the zero-init chain is opened one layer per step (final layer, then the gates,
    # then the gated branches), so look after a few steps.  With weight decay off, Adam leaves
    # a parameter exactly unchanged iff all its gradients so far were zero.
    params = stepped["params"]
    flat0 = jax.tree_util.tree_leaves_with_path(params[0])
    assert len(flat0) > 10
    first_move = {}
    for k in range(1, len(params)):
        for (path, a), b in zip(flat0, jax.tree.leaves(params[k])):
            if not np.array_equal(a, b):
                first_move.setdefault(jax.tree_util.keystr(path), k)
    frozen = [jax.tree_util.keystr(path) for path, _ in flat0 if jax.tree_util.keystr(path) not in first_move]
    assert not frozen, f"parameters without gradient after {len(params) - 1} steps: {frozen}"
    assert max(first_move.values()) <= 4, first_move
    assert all(m["grad_norm"] > 0 and math.isfinite(m["loss"]) for m in stepped["metrics"])


def test_ema_matches_hand_computed(stepped):
    d = stepped["config"].ema_decay
    params, emas = stepped["params"], stepped["emas"]
    expected = params[0]
    for k in range(1, len(params)):
        expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, expected, params[k])
        assert tree_allclose(emas[k], expected, atol=1e-7, rtol=1e-6)
    # the EMA moved, and lags behind the parameters
    assert not tree_allclose(emas[-1], params[0], atol=0)
    assert not tree_allclose(emas[-1], params[-1], atol=1e-9)


def test_step_metrics_lr_follows_warmup(stepped):
    lrs = [m["lr"] for m in stepped["metrics"]]
    np.testing.assert_allclose(lrs, [3e-4, 6e-4, 9e-4, 1.2e-3, 1.5e-3], rtol=1e-6)


# --------------------------------------------------------------------------- train loop


def test_train_writes_checkpoints_metrics_and_final_save(tmp_path, caplog):
    seen = []

    def cb(step, model):
        leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
        seen.append((step, type(model).__name__, float(jnp.sum(leaf))))

    config = tc(steps=5, checkpoint_every=2, sample_every=2, keep_checkpoints=10)
    result = T.train(CFG, config, ToyDataset(), tmp_path, callbacks=cb, progress=False)
    summary = result.summary
    assert summary["step"] == 5 and summary["start_step"] == 0 and len(summary["losses"]) == 5
    assert summary["checkpoint_path"].endswith("/5")
    assert summary["final_loss"] == summary["losses"][-1]
    assert summary["traces"] <= 1
    assert ckpt_dirs(tmp_path) == ["2", "4", "5"]  # every 2 steps + the final step
    assert [s for s, _, _ in seen] == [2, 4] and seen[0][1] == "PixelDiT"

    recs = T.read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    for r in recs:
        assert {"step", "loss", "grad_norm", "lr", "steps_per_sec", "time"} <= set(r)
    np.testing.assert_allclose([r["loss"] for r in recs], summary["losses"])

    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model_config"] == CFG.to_dict() and meta["train_config"] == config.to_dict()
    assert meta["dataset"] == ToyDataset().metadata()
    assert T.read_checkpoint_meta(tmp_path)["step"] == 5

    state = full_state(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        loaded = T.load_checkpoint(tmp_path)
    assert not [r for r in caplog.records if r.name.startswith("absl")]  # loading is quiet
    model, mcfg = loaded.model, loaded.model_config
    assert mcfg == CFG and loaded.train_config == config.to_dict() and loaded.step == 5 and loaded.ema
    assert loaded.dataset == ToyDataset().metadata()
    assert tree_allclose(nnx.state(model, nnx.Param), state.ema_params, atol=0)
    # train() hands back the trained EMA model and the final state, without a reload
    assert tree_allclose(nnx.state(result.model, nnx.Param), state.ema_params, atol=0)
    assert int(result.state.step) == 5 and type(result.model).__name__ == "PixelDiT"
    raw = T.load_checkpoint(tmp_path, step=4, ema=False).model
    assert tree_allclose(nnx.state(raw, nnx.Param), full_state(tmp_path, 4).params, atol=0)
    with pytest.raises(FileNotFoundError):
        T.load_checkpoint(tmp_path, step=3)

    # already at `steps`: nothing to do, nothing rewritten
    again = T.train(CFG, config, ToyDataset(), tmp_path, progress=False).summary
    assert again["steps_run"] == 0 and again["final_loss"] is None


def test_resume_equivalence_and_same_seed(tmp_path):
    n, k = 7, 3
    straight = T.train(CFG, tc(steps=n), ToyDataset(), tmp_path / "a", progress=False).summary
    first = T.train(CFG, tc(steps=k, checkpoint_every=100), ToyDataset(), tmp_path / "b", progress=False).summary
    assert ckpt_dirs(tmp_path / "b") == [str(k)]
    # resume with different resume-free settings (steps, checkpointing, logging)
    second = T.train(CFG, tc(steps=n, checkpoint_every=3, log_every=2), ToyDataset(), tmp_path / "b", progress=False).summary
    assert second["start_step"] == k and second["step"] == n

    assert straight["losses"] == first["losses"] + second["losses"]  # identical, not just close
    sa, sb = full_state(tmp_path / "a"), full_state(tmp_path / "b")
    assert int(sa.step) == int(sb.step) == n
    for part in ("params", "ema_params", "opt_state", "rng"):
        assert tree_allclose(getattr(sa, part), getattr(sb, part), atol=1e-6), part
    losses_b = {r["step"]: r["loss"] for r in T.read_metrics(tmp_path / "b")}
    losses_a = {r["step"]: r["loss"] for r in T.read_metrics(tmp_path / "a")}
    assert all(losses_b[s] == losses_a[s] for s in losses_b) and set(losses_b) >= {1, 2, 3, 4, 6}

    # same seed, fresh directory -> identical trace; another seed -> different trace
    same = T.train(CFG, tc(steps=n), ToyDataset(), tmp_path / "c", progress=False).summary
    assert same["losses"] == straight["losses"]
    other = T.train(CFG, tc(steps=2, seed=1), ToyDataset(), tmp_path / "d", progress=False).summary
    assert other["losses"] != straight["losses"][:2]


def test_keep_checkpoints_honoured(tmp_path):
    T.train(CFG, tc(steps=6, checkpoint_every=1, keep_checkpoints=2), ToyDataset(), tmp_path, progress=False)
    assert ckpt_dirs(tmp_path) == ["5", "6"]
    assert T.latest_checkpoint_step(tmp_path) == 6


def test_nan_loss_stops_without_saving(tmp_path):
    ds = ToyDataset(nan_at={4})  # batch 4 produces step 5
    # log_every large: the NaN is found by the lagged check, just before the step-6 save
    with pytest.raises(T.NonFiniteLossError, match=r"at step 5\b") as e:
        T.train(CFG, tc(steps=10, checkpoint_every=2, log_every=100), ds, tmp_path, progress=False)
    assert e.value.step == 5
    assert "latest checkpoint: step 4" in str(e.value)
    assert ckpt_dirs(tmp_path) == ["2", "4"]
    assert T.latest_checkpoint_step(tmp_path) == 4
    state = full_state(tmp_path)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state.params))
    # a repaired data stream resumes from the last good checkpoint
    summary = T.train(CFG, tc(steps=6), ToyDataset(), tmp_path, progress=False).summary
    assert summary["start_step"] == 4 and summary["step"] == 6


def test_incompatible_checkpoint_refused(tmp_path):
    T.train(CFG, tc(steps=2), ToyDataset(), tmp_path, progress=False)
    with pytest.raises(T.IncompatibleCheckpointError) as e:
        T.train(CFG.replace(hidden_size=64), tc(steps=4, time_std=0.5), ToyDataset(seed=5), tmp_path, progress=False)
    msg = str(e.value)
    assert "model.hidden_size: checkpoint=32 requested=64" in msg
    assert "train.time_std: checkpoint=1.0 requested=0.5" in msg
    assert "dataset.seed: checkpoint=0 requested=5" in msg
    assert len(e.value.differences) == 3
    assert T.latest_checkpoint_step(tmp_path) == 2
    # the dataset check can be switched off; model/training differences cannot
    with pytest.raises(T.IncompatibleCheckpointError, match="p_uncond"):
        T.train(CFG, tc(steps=4, p_uncond=0.5), ToyDataset(seed=5), tmp_path, progress=False, check_dataset=False)


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_clip_by_global_norm_matches_optax(scale):
    """The scalar-factor clip gives optax's clipped gradients and the same (empty) state."""
    g = {"a": jnp.arange(6.0).reshape(2, 3) * scale, "b": jnp.ones(4) * -scale}
    ours, theirs = T.clip_by_global_norm(2.0), optax.clip_by_global_norm(2.0)
    assert ours.init(g) == theirs.init(g)
    u1, _ = ours.update(g, ours.init(g))
    u2, _ = theirs.update(g, theirs.init(g))
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    assert float(optax.tree.norm(u1)) == pytest.approx(min(2.0, float(optax.tree.norm(g))), rel=1e-6)
    zero, _ = ours.update(jax.tree.map(jnp.zeros_like, g), ours.init(g))
    assert all(np.all(np.asarray(z) == 0) for z in jax.tree.leaves(zero))


def test_compute_layout_fields_may_change_on_resume():
    """remat and scan_unroll change how the model is computed, not its parameters: resume allows them."""
    meta = {"model_config": CFG.to_dict(), "train_config": tc(steps=2).to_dict()}
    new = {"model_config": CFG.replace(remat=False, scan_unroll=True).to_dict(), "train_config": tc(steps=4).to_dict()}
    T.check_compatible(meta, new)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    config = tc(steps=2, keep_checkpoints=1)
    T.train(CFG, config, ToyDataset(), tmp_path, progress=False)
    before = full_state(tmp_path)

    # A kill after every file of step 4 was written but before the commit (rename).
    async def crash(self, *args, **kwargs):
        raise RuntimeError("simulated crash during checkpoint commit")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        T.train(CFG, tc(steps=4, keep_checkpoints=1), ToyDataset(), tmp_path, progress=False)
    monkeypatch.undo()
    names = ckpt_dirs(tmp_path)
    assert "4" not in names and "2" in names
    assert any(n.startswith("4.orbax-checkpoint-tmp") for n in names), names  # orbax wrote to a temp dir
    # plus a torn directory of a newer step, as left by a kill in the middle of writing
    torn = tmp_path / T.CHECKPOINT_SUBDIR / "9.orbax-checkpoint-tmp-123"
    (torn / "params").mkdir(parents=True)
    (torn / "params" / "junk").write_bytes(b"\0" * 10)

    assert T.latest_checkpoint_step(tmp_path) == 2
    after = full_state(tmp_path)
    for part in ("params", "ema_params", "opt_state", "rng", "step"):
        assert tree_allclose(getattr(before, part), getattr(after, part), atol=0)
    model = T.load_checkpoint(tmp_path).model
    assert tree_allclose(nnx.state(model, nnx.Param), before.ema_params, atol=0)

    # resuming cleans the temporary directories up and continues from step 2
    summary = T.train(CFG, tc(steps=4, keep_checkpoints=1), ToyDataset(), tmp_path, progress=False).summary
    assert summary["start_step"] == 2
    assert ckpt_dirs(tmp_path) == ["4"]


def test_keyboard_interrupt_saves_current_step(tmp_path):
    ds = ToyDataset(interrupt_at={3})
    with pytest.raises(KeyboardInterrupt):
        T.train(CFG, tc(steps=10, checkpoint_every=100, log_every=100), ds, tmp_path, progress=False)
    assert T.latest_checkpoint_step(tmp_path) == 3
    summary = T.train(CFG, tc(steps=5), ToyDataset(), tmp_path, progress=False).summary
    assert summary["start_step"] == 3 and summary["step"] == 5


@pytest.mark.slow
def test_overfits_tiny_dataset(tmp_path):
    # no condition dropping here: with it, the null-condition samples keep an irreducible error
    summary = T.train(
        CFG, tc(steps=300, checkpoint_every=1000, log_every=50, p_uncond=0.0), ToyDataset(), tmp_path, progress=False
    ).summary
    losses = np.asarray(summary["losses"])
    assert len(losses) == 300 and np.isfinite(losses).all()
    ratio = losses[:10].mean() / losses[-20:].mean()
    assert ratio >= 10, f"loss only fell {ratio:.1f}x ({losses[:10].mean():.3f} -> {losses[-20:].mean():.3f})"


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights(tmp_path):
    summary = T.train(CFG, tc(steps=3, compute_dtype="bfloat16"), ToyDataset(), tmp_path, progress=False).summary
    assert all(math.isfinite(l) for l in summary["losses"])
    loaded = T.load_checkpoint(tmp_path)
    model, mcfg = loaded.model, loaded.model_config
    assert mcfg.dtype == "bfloat16"
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_resume_check_reads_older_theta_configs():
    """Theta configs once stored their derived token fields and had no encoding fields: still compatible."""
    cfg = ThetaConfig(hidden_size=16, num_groups=2, patch_depth=1, pixel_depth=1)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("theta_center", "theta_scale")}
    old.update(txt_embed_dim=1, txt_max_length=2)
    T.check_compatible({"model_config": old}, {"model_config": cfg.to_dict()})  # no error
    encoded = cfg.with_encoding([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(T.IncompatibleCheckpointError, match="model.theta_center"):
        T.check_compatible({"model_config": old}, {"model_config": encoded.to_dict()})

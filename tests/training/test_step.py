"""REPA in the train step: the model's tokens after a patch block, the joint loss, the projector's
update and the frozen encoder (tiny c2i model on 16x16 RGB images, the tiny encoder)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixeldit import flow, training as T
from pixeldit.encoders import TinyEncoder
from pixeldit.embedders import patchify
from pixeldit.model import C2IConfig, T2IConfig, build_model
from pixeldit.repa import REPAConfig, repa_loss
from pixeldit.rope import rope_2d_angles

CFG = C2IConfig(
    in_channels=3, patch_size=4, hidden_size=32, num_groups=2, patch_depth=3, pixel_depth=1, pixel_hidden_size=8,
    num_classes=10,
)
REPA = REPAConfig(align_layer=2, encoder_dim=16, encoder="tiny")
TC = T.TrainConfig(batch_size=4, steps=3, lr=1e-3, ema_decay=0.9, log_every=1, checkpoint_every=2, repa=REPA)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32), "y": rng.integers(0, 10, 4).astype(np.int32)}


def encoder():
    return TinyEncoder(patch_size=8, dim=REPA.encoder_dim, rngs=nnx.Rngs(5))  # 2x2 tokens: pooled from 4x4


class Data:
    def get_batch(self, step, batch_size):
        return batch(step)


def tokens_by_hand(model, x, t, y, k):
    """The c2i forward up to patch block ``k``, one block at a time (no scan)."""
    cfg = model.config
    p = cfg.patch_size
    rope = rope_2d_angles(cfg.hidden_size // cfg.num_groups, x.shape[1] // p, x.shape[2] // p)
    c = jax.nn.silu(model.t_embedder(t)[:, None] + model.y_embedder(y)[:, None])
    s = model.s_embedder(patchify(x, p).reshape(x.shape[0], -1, p * p * cfg.in_channels))
    graphdef, state = nnx.split(model.patch_blocks)
    for i in range(k):
        s = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))(s, c, rope)
    return s


@pytest.mark.parametrize("k", [1, 3])
def test_tokens_after_a_block(k):
    model = build_model(dataclasses.replace(CFG, remat=False), rngs=nnx.Rngs(0))
    b = batch()
    t = jnp.linspace(0.1, 0.9, 4)
    v, tokens = model(b["x"], t, b["y"], tokens_after=k)
    np.testing.assert_array_equal(v, model(b["x"], t, b["y"]))  # asking for tokens changes nothing else
    np.testing.assert_allclose(tokens, tokens_by_hand(model, jnp.asarray(b["x"]), t, jnp.asarray(b["y"]), k),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tokens_after counts patch blocks 1..3, got 4"):
        model(b["x"], t, b["y"], tokens_after=4)


def test_t2i_tokens_after_are_the_image_tokens():
    cfg = T2IConfig(in_channels=3, patch_size=4, hidden_size=32, num_groups=2, patch_depth=2, pixel_depth=1,
                    pixel_hidden_size=8, txt_embed_dim=8, txt_max_length=5)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    y = jax.random.normal(jax.random.key(1), (4, 5, 8))
    v, tokens = model(batch()["x"], jnp.full((4,), 0.5), y, tokens_after=1)
    assert v.shape == (4, 16, 16, 3) and tokens.shape == (4, 16, 32)


def test_repa_step_loss_is_flow_plus_weighted_alignment():
    state = T.create_train_state(CFG, TC)
    enc = encoder()
    graphdef, enc_state = nnx.split(enc)
    step = T.make_train_step_fn(state.graphdef, TC, encoder_graphdef=graphdef)
    b = T.prepare_batch(batch())
    # the same forward by hand: the step's key, the model, the projector and repa.py's loss
    key = jax.random.split(jax.random.wrap_key_data(state.rng))[1]
    model = T.train_model(state)
    flow_loss, aux = flow.flow_matching_loss(model, b["x"], b["y"], key, p_uncond=TC.p_uncond, tokens_after=2)
    projector = nnx.merge(T.projector_graphdef(CFG.hidden_size, REPA), state.repa["params"])
    align = repa_loss(REPA, projector, aux["tokens"], enc((b["x"] + 1) / 2))
    proj_before = jax.tree.map(np.array, state.repa["params"])
    new, metrics = jax.jit(step)(state, b, enc_state)
    np.testing.assert_allclose(metrics["flow_loss"], flow_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["repa_loss"], align, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], flow_loss + 0.5 * align, rtol=1e-5)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.repa["params"], proj_before)
    assert all(m > 0 for m in jax.tree.leaves(moved))  # every projector weight got a gradient
    assert new.flat_ema.shape == state.flat_params.shape  # the EMA holds the model alone


def test_repa_gradient_norm_and_clipping_cover_the_projector():
    state = T.create_train_state(CFG, TC)
    graphdef, enc_state = nnx.split(encoder())
    b = T.prepare_batch(batch())
    clip = dataclasses.replace(TC, grad_clip=1e-9)  # clipped entries far below adam_eps
    free = dataclasses.replace(TC, grad_clip=None)  # same seed: same weights, optimiser state without clipping
    _, m_free = T.make_train_step_fn(state.graphdef, free, encoder_graphdef=graphdef)(
        T.create_train_state(CFG, free), b, enc_state)
    after, m_clip = T.make_train_step_fn(state.graphdef, clip, encoder_graphdef=graphdef)(state, b, enc_state)
    assert float(m_clip["grad_norm"]) == pytest.approx(float(m_free["grad_norm"]), rel=1e-6)
    # Adam's first update is lr * g / (|g| + eps) per weight: at most lr / 11 once clipped to 1e-9
    step = jax.tree.leaves(jax.tree.map(lambda a, c: jnp.max(jnp.abs(a - c)), after.repa["params"], state.repa["params"]))
    assert max(float(s) for s in step) < 0.5 * TC.lr


def test_repa_step_needs_the_encoder():
    state = T.create_train_state(CFG, TC)
    with pytest.raises(ValueError, match="encoder_graphdef"):
        T.make_train_step_fn(state.graphdef, TC)


@pytest.mark.slow
def test_train_with_repa_logs_parts_resumes_and_leaves_the_encoder(tmp_path):
    enc = encoder()
    before = jax.tree.map(np.array, nnx.state(enc))
    T.train(CFG, dataclasses.replace(TC, steps=2), Data(), tmp_path, encoder=enc, progress=False)
    result = T.train(CFG, TC, Data(), tmp_path, encoder=enc, progress=False)  # resumes at step 2
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert r["loss"] == pytest.approx(r["flow_loss"] + 0.5 * r["repa_loss"], rel=1e-5)
    assert result.state.repa is not None and result.summary["start_step"] == 2
    assert T.load_checkpoint(tmp_path).step == 3  # the model alone still loads (sampling, eval, export)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(enc), before)
    with pytest.raises(ValueError, match="no encoder was given"):
        T.train(CFG, dataclasses.replace(TC, steps=4), Data(), tmp_path, progress=False)


def test_repa_table_in_train_config():
    tc = T.TrainConfig(repa={"align_layer": 2, "encoder": "tiny"})
    assert tc.repa == REPAConfig(align_layer=2, encoder="tiny")
    assert T.TrainConfig.from_dict(tc.to_dict()) == tc
    with pytest.raises(ValueError, match="unknown REPA fields"):
        T.TrainConfig(repa={"layer": 2})


@pytest.mark.slow
def test_repa_on_a_device_mesh_matches_the_single_device_run(tmp_path):
    tc = dataclasses.replace(TC, steps=2)
    one = T.train(CFG, tc, Data(), tmp_path / "one", encoder=encoder(), progress=False)
    mesh = T.train(CFG, dataclasses.replace(tc, mesh="data"), Data(), tmp_path / "mesh", encoder=encoder(), progress=False)
    np.testing.assert_allclose(mesh.summary["losses"], one.summary["losses"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(mesh.state.repa["params"]), jax.tree.leaves(one.state.repa["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

"""Tests for pixeldit.flat: the flat parameter layout of the train state.

The train step keeps parameters, EMA and AdamW moments as flat vectors; these tests check the
layout itself (round trip, padding, gradient), that a flat step computes what the same
optimiser computes leaf by leaf, and that checkpoints stay per-leaf trees independent of the
padding.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pixeldit import flow
from pixeldit import training as T
from pixeldit.flat import ParamLayout
from pixeldit.model import C2IConfig

CFG = C2IConfig(
    in_channels=1, patch_size=4, hidden_size=32, num_groups=2, patch_depth=2, pixel_depth=1, pixel_hidden_size=8, num_classes=10
)
TC = T.TrainConfig(batch_size=8, steps=4, lr=1e-2, weight_decay=0.1, ema_decay=0.9, grad_clip=0.5, warmup_steps=2)


def tree():
    return {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.full((4,), -1.5), "d": jnp.ones((1, 1, 2), jnp.bfloat16)}}


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return T.prepare_batch({"x": rng.uniform(-1, 1, size=(n, 8, 8, 1)).astype(np.float32),
                            "y": rng.integers(0, 10, size=n).astype(np.int32)})


def test_layout_round_trip_and_padding():
    lay = ParamLayout.of(tree(), multiple=5)
    assert lay.shapes == ((2, 3), (4,), (1, 1, 2)) and lay.size == 12 and lay.padded_size == 15
    assert lay.offsets == (0, 6, 10, 12)
    flat = lay.flatten(tree())
    assert flat.dtype == jnp.float32 and flat.shape == (15,)
    np.testing.assert_array_equal(flat, [0, 1, 2, 3, 4, 5, -1.5, -1.5, -1.5, -1.5, 1, 1, 0, 0, 0])
    back = lay.unflatten(flat)
    assert jax.tree.structure(back) == jax.tree.structure(tree())
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree())):
        np.testing.assert_array_equal(a, np.asarray(b, np.float32))
    assert ParamLayout.of(tree()).padded_size == 12  # multiple=1: no padding
    assert lay.is_flat(flat) and not lay.is_flat(jnp.zeros(12))
    abstract = lay.abstract_tree()
    assert [a.shape for a in jax.tree.leaves(abstract)] == [(2, 3), (4,), (1, 1, 2)]
    assert hash(lay) == hash(ParamLayout.of(tree(), multiple=5)) and lay == ParamLayout.of(tree(), multiple=5)


def test_layout_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="multiple must be an int >= 1, got 0"):
        ParamLayout.of(tree(), multiple=0)
    with pytest.raises(TypeError, match=r"floating point; got \['i'\]: int32"):
        ParamLayout.of({"i": jnp.zeros(3, jnp.int32)})
    with pytest.raises(ValueError, match="no parameters"):
        ParamLayout.of({})
    lay = ParamLayout.of(tree())
    with pytest.raises(ValueError, match=r"expected a flat vector of shape \(12,\), got \(13,\)"):
        lay.unflatten(jnp.zeros(13))
    bad = tree()
    bad["a"] = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match=r"\(0, \(2, 3\), \(3, 2\)\)"):
        lay.flatten(bad)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unflatten_gradient_is_the_flattened_tree_gradient(dtype):
    lay = ParamLayout.of(tree(), multiple=4)
    w = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=jnp.float32)).reshape(a.shape), tree())

    def loss_tree(t):
        return sum(jnp.sum(jnp.sin(a.astype(jnp.float32)) * b) for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(w)))

    def loss_flat(f):
        return loss_tree(lay.unflatten(f.astype(dtype)))

    flat = lay.flatten(tree())
    g_flat = jax.grad(loss_flat)(flat)
    g_tree = jax.grad(loss_tree)(jax.tree.map(lambda a: a.astype(dtype), lay.unflatten(flat)))
    tol = 0 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(g_flat, lay.flatten(g_tree), atol=tol)
    assert np.all(np.asarray(g_flat)[lay.size:] == 0)  # padding gets no gradient
    # the backward pass is one concatenate, not a pad-and-add per leaf
    prims = {e.primitive.name for e in jax.make_jaxpr(jax.grad(loss_flat))(flat).eqns}
    assert "pad" not in prims and "add_any" not in prims


def test_flat_step_equals_the_same_optimiser_leaf_by_leaf():
    """One step of the flat train step == clip + AdamW + EMA applied per leaf (the pre-flat step)."""
    state = T.create_train_state(CFG, TC)
    b = batch()
    params0 = state.params
    rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))

    def loss_fn(params):
        model = nnx.merge(state.graphdef, params, state.model_state)
        return flow.flow_matching_loss(model, b["x"], b["y"], key, p_uncond=TC.p_uncond)[0]

    tx = T.make_optimizer(TC)

    @jax.jit
    def per_leaf_step(params0):
        loss, grads = jax.value_and_grad(loss_fn)(params0)
        updates, _ = tx.update(grads, tx.init(params0), params0)
        params1 = optax.apply_updates(params0, updates)
        ema1 = jax.tree.map(lambda e, p: TC.ema_decay * e + (1 - TC.ema_decay) * p, params0, params1)
        return loss, grads, params1, ema1

    loss, grads, params1, ema1 = per_leaf_step(params0)

    new, metrics = T.make_train_step(state.graphdef, TC)(state, b)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-5)
    assert float(metrics["grad_norm"]) > TC.grad_clip  # clipping was active
    for got, want in ((new.params, params1), (new.ema_params, ema1)):
        for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, w, rtol=0, atol=2e-7)
    assert np.array_equal(np.asarray(new.rng), np.asarray(jax.random.key_data(rng)))


def test_padding_stays_zero_and_checkpoints_do_not_depend_on_it(tmp_path):
    padded = T.create_train_state(CFG, TC, pad_multiple=7)
    lay = padded.layout
    assert lay.padded_size % 7 == 0 and lay.padded_size > lay.size  # this model does need padding
    step = T.make_train_step(padded.graphdef, TC)
    for i in range(3):
        padded, _ = step(padded, batch(seed=i))
    adam = padded.opt_state[1][0]
    for v in (padded.flat_params, padded.flat_ema, adam.mu, adam.nu):
        assert np.all(np.asarray(v)[lay.size:] == 0)

    with T.checkpoint_manager(tmp_path) as mngr:
        T.save_train_state(mngr, padded, {"model_config": CFG.to_dict(), "train_config": TC.to_dict()})
    with T.checkpoint_manager(tmp_path, read_only=True) as mngr:
        plain = T.restore_train_state(mngr, 3, T.abstract_train_state(CFG, TC))
    assert plain.layout.padded_size == lay.size  # restored without padding
    for a, b in zip(jax.tree.leaves(T.checkpoint_items(padded)), jax.tree.leaves(T.checkpoint_items(plain))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the per-leaf weights on disk are the model's own tree (what load_checkpoint reads)
    model = T.load_checkpoint(tmp_path, ema=False).model
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(padded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the restored state trains on exactly like the padded one
    again = T.make_train_step(plain.graphdef, TC)
    p2, m2 = step(padded, batch(seed=9))
    q2, n2 = again(plain, batch(seed=9))
    assert float(m2["loss"]) == float(n2["loss"])
    np.testing.assert_allclose(np.asarray(q2.flat_params), np.asarray(p2.flat_params)[: lay.size], rtol=0, atol=1e-7)


def test_train_state_fields_and_views():
    state = T.abstract_train_state(CFG, TC)
    names = [f.name for f in dataclasses.fields(state)]
    assert names[:6] == ["step", "flat_params", "flat_ema", "opt_state", "rng", "model_state"]
    assert state.flat_params.shape == (state.layout.padded_size,)
    assert [tuple(a.shape) for a in jax.tree.leaves(state.params)] == list(state.layout.shapes)

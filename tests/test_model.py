"""Whole models: golden parity through from_reference, preset sizes, init, gradients, input checks.

The configs' own checks (validation, round trips, presets by name) are in test_model_config.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import golden
from pixeldit.convert import from_reference
from pixeldit.model import (
    PixelDiT,
    PixelDiTT2I,
    PixelDiTTheta,
    build_model,
    config_from_dict,
    count_params,
    matmul_precision,
    preset,
    resolve_scan_unroll,
)
from test_model_config import TINY  # the tiny config of each model kind


def _cond(kind, b, rng):
    if kind == "c2i":
        return jnp.asarray(rng.integers(0, 5, size=b), dtype=jnp.int32)
    if kind == "t2i":
        return jnp.asarray(rng.normal(size=(b, 4, 12)), dtype=jnp.float32)
    return jnp.asarray(rng.normal(size=(b, 3)), dtype=jnp.float32)


def _inputs(kind, b=2, h=8, w=12, seed=0):
    rng = np.random.default_rng(seed)
    c = TINY[kind].in_channels
    x = jnp.asarray(rng.normal(size=(b, h, w, c)), dtype=jnp.float32)
    t = jnp.asarray(rng.uniform(size=b), dtype=jnp.float32)
    return x, t, _cond(kind, b, rng)


# --- golden parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["c2i_small.npz", "c2i_postmod_nonsquare.npz", "t2i_small.npz", "t2i_norope_1ch.npz"])
def test_golden_whole_model(name):
    cfg, d = golden.load(name)
    model = from_reference(cfg["kind"], cfg["reference_kwargs"], golden.state_dict(d))
    y = d["in/y"].astype(np.int32) if cfg["kind"] == "c2i" else d["in/y"]
    out = model(jnp.asarray(golden.nchw_to_nhwc(d["in/x"])), jnp.asarray(d["in/t"]), jnp.asarray(y))
    golden.assert_close(out, golden.nchw_to_nhwc(d["out/out"]))


# --- presets ---------------------------------------------------------------------------------------

PRESET_COUNTS = {"B/16": 184_749_155, "L/16": 569_648_963, "XL/16": 797_383_203, "T2I-1.3B": 1_302_470_787}


@pytest.mark.parametrize("name", list(PRESET_COUNTS))
def test_preset_parameter_counts(name):
    assert count_params(preset(name)) == PRESET_COUNTS[name]


# --- behaviour ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TINY))
def test_fresh_model_outputs_exact_zero(kind):
    model = build_model(TINY[kind], rngs=nnx.Rngs(0))
    out = model(*_inputs(kind))
    assert out.shape == (2, 8, 12, TINY[kind].in_channels)
    assert np.all(np.asarray(out) == 0.0)


@pytest.mark.parametrize("kind", list(TINY))
def test_any_resolution_without_rebuild(kind):
    model = build_model(TINY[kind], rngs=nnx.Rngs(0))
    _randomise(model)
    for h, w in [(8, 8), (4, 16), (12, 8)]:
        out = model(*_inputs(kind, h=h, w=w))
        assert out.shape[1:3] == (h, w) and np.all(np.isfinite(np.asarray(out)))


def _randomise(model, seed=1):
    """Give every parameter random values (zero-init layers included) so outputs depend on all weights."""
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.2 * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def _loss(model, x, t, y):
    return jnp.mean((model(x, t, y) - x) ** 2)


@pytest.mark.parametrize("kind", list(TINY))
def test_gradients_reach_every_parameter(kind):
    """Zero-initialised output/adaLN layers block gradients at step 0; after optimiser steps every subtree learns.

    The zero-init chain (final layer -> PiT adaLN -> PiT/patch adaLN -> block weights) is four links
    long for the adaLN-Zero models, so we check the gradient after four Adam steps (two suffice for
    the reference t2i model, whose adaLN layers are not zeroed).
    """
    model = build_model(TINY[kind], rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x, t, y = _inputs(kind)
    if kind == "theta":  # one null example, so the learned null token is used
        y = y.at[0].set(jnp.nan)

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(_loss)(model, x, t, y)
        opt.update(model, grads)
        return grads

    for _ in range((2 if kind == "t2i" else 4) + 1):
        grads = step(model, opt)
    flat = nnx.to_flat_state(grads)
    dead = [".".join(map(str, p)) for p, g in flat if not np.any(np.asarray(g[...]) != 0)]
    if kind == "t2i":  # y_pos_embedding rows beyond the 4 tokens used never see gradient; the table does
        dead = [k for k in dead if k != "y_pos_embedding"]
    assert not dead, f"parameters without gradient: {dead}"


def test_c2i_null_class_and_labels():
    model = build_model(TINY["c2i"], rngs=nnx.Rngs(0))
    y = jnp.asarray([0, 3])
    assert np.array_equal(model.null_condition(y), [5, 5])
    assert model.y_embedder.embedding_table.embedding.shape == (6, 32)


def test_t2i_mask_equals_truncation():
    model = build_model(TINY["t2i"], rngs=nnx.Rngs(0))
    _randomise(model)
    x, t, y = _inputs("t2i")
    mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 0, 0]])
    masked = model(x, t, y, mask=mask)
    truncated = model(x, t, y[:, :2])
    unmasked = model(x, t, y)
    np.testing.assert_allclose(masked, truncated, atol=1e-5)
    assert np.abs(np.asarray(masked) - np.asarray(unmasked)).max() > 1e-4


def test_t2i_truncates_long_text():
    model = build_model(TINY["t2i"], rngs=nnx.Rngs(0))
    _randomise(model)
    x, t, _ = _inputs("t2i")
    y = jnp.asarray(np.random.default_rng(3).normal(size=(2, 9, 12)), dtype=jnp.float32)
    np.testing.assert_allclose(model(x, t, y), model(x, t, y[:, :6]), atol=1e-6)


@pytest.mark.parametrize("token_embedding", ["learned", "sincos", "none"])
def test_theta_model_shapes_and_null(token_embedding):
    cfg = TINY["theta"].replace(token_embedding=token_embedding, theta_channels=2)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    _randomise(model)
    x, t, _ = _inputs("theta")
    theta = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 2)), dtype=jnp.float32)
    out = model(x, t, theta)
    null = model(x, t, model.null_condition(theta))
    assert np.all(np.isfinite(np.asarray(null)))
    assert np.abs(np.asarray(out) - np.asarray(null)).max() > 1e-4
    # the null token does not depend on whatever values hide behind the NaNs
    other_null = model(x, t, jnp.full_like(theta, jnp.nan))
    np.testing.assert_array_equal(null, other_null)


def test_theta_scalar_tokens_accept_2d():
    model = build_model(TINY["theta"], rngs=nnx.Rngs(0))
    _randomise(model)
    x, t, theta = _inputs("theta")
    np.testing.assert_allclose(model(x, t, theta), model(x, t, theta[..., None]), atol=1e-6)


def test_theta_config_encoding_makes_the_model_take_raw_theta():
    cfg = TINY["theta"].with_encoding([0.0, -1.0, 10.0], [2.0, 1.0, 30.0])
    assert cfg.theta_channels == 2 and cfg.theta_center == (1.0, 0.0, 20.0) and cfg.theta_scale == (1.0, 1.0, 10.0)
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # JSON lists come back as tuples
    model = build_model(cfg, rngs=nnx.Rngs(0))
    _randomise(model)
    x, t, theta = _inputs("theta")
    theta = theta.at[1].set(jnp.nan)  # a null row
    z = (theta - jnp.array([1.0, 0.0, 20.0])) / jnp.array([1.0, 1.0, 10.0])
    encoded = jnp.stack([z, jnp.where(jnp.isnan(z), jnp.nan, 1.0)], axis=-1)  # ((theta - c) / s, 1)
    np.testing.assert_array_equal(model(x, t, theta), model(x, t, encoded))


def test_theta_token_identity_matters():
    """With a learned identity embedding, permuting theta components changes the output."""
    model = build_model(TINY["theta"], rngs=nnx.Rngs(0))
    _randomise(model)
    x, t, theta = _inputs("theta")
    assert np.abs(np.asarray(model(x, t, theta)) - np.asarray(model(x, t, theta[:, ::-1]))).max() > 1e-4


def test_bfloat16_compute_runs_and_stays_close():
    cfg = TINY["c2i"]
    m32 = build_model(cfg, rngs=nnx.Rngs(0))
    _randomise(m32)
    m16 = build_model(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(m16, nnx.state(m32, nnx.Param))
    x, t, y = _inputs("c2i")
    a, b = np.asarray(m32(x, t, y)), np.asarray(m16(x, t, y))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max() + 1e-3


@pytest.mark.parametrize("mode", [True, "dots"])
def test_remat_gives_same_gradients(mode):
    cfg = TINY["c2i"]
    m1 = build_model(cfg.replace(remat=False), rngs=nnx.Rngs(0))
    _randomise(m1)
    m2 = build_model(cfg.replace(remat=mode), rngs=nnx.Rngs(0))
    nnx.update(m2, nnx.state(m1, nnx.Param))
    x, t, y = _inputs("c2i")
    grad = nnx.jit(nnx.grad(_loss))
    g1 = jax.tree.leaves(grad(m1, x, t, y))
    g2 = jax.tree.leaves(grad(m2, x, t, y))
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unroll", [True, 2])
def test_unrolled_stacks_give_same_outputs_and_gradients(unroll):
    """The block stacks as one loop (scan_unroll=1) and unrolled compute the same function."""
    cfg = TINY["c2i"].replace(scan_unroll=1)
    m1 = build_model(cfg, rngs=nnx.Rngs(0))
    _randomise(m1)
    m2 = build_model(cfg.replace(scan_unroll=unroll), rngs=nnx.Rngs(0))
    nnx.update(m2, nnx.state(m1, nnx.Param))
    x, t, y = _inputs("c2i")
    np.testing.assert_allclose(np.asarray(m1(x, t, y)), np.asarray(m2(x, t, y)), rtol=1e-5, atol=1e-6)
    grad = nnx.jit(nnx.grad(_loss))
    for a, b in zip(jax.tree.leaves(grad(m1, x, t, y)), jax.tree.leaves(grad(m2, x, t, y))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scan_unroll_auto_unrolls_on_accelerators_only(monkeypatch):
    assert TINY["c2i"].scan_unroll == "auto"  # the default
    assert resolve_scan_unroll(3) == 3 and resolve_scan_unroll(True) is True
    for backend, expected in [("cpu", 1), ("gpu", True), ("tpu", True)]:
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert resolve_scan_unroll("auto") == expected


def test_float32_models_trace_full_precision_products():
    """float32 models ask for full-precision products (a GPU's default is TF32); bf16 models and a user's own setting win."""
    x, t, y = _inputs("c2i")

    def dots(model):
        text = jax.jit(lambda x, t, y: model(x, t, y)).lower(x, t, y).as_text()
        return text.count("stablehlo.dot_general"), text.count("HIGHEST")

    m32 = build_model(TINY["c2i"], rngs=nnx.Rngs(0))
    n, highest = dots(m32)
    assert n > 0 and highest == 2 * n  # precision_config names both operands
    assert dots(build_model(TINY["c2i"].replace(dtype="bfloat16"), rngs=nnx.Rngs(0)))[1] == 0
    with jax.default_matmul_precision("tensorfloat32"):
        assert matmul_precision("float32") is None
        assert dots(m32)[1] == 0
    assert matmul_precision("float32") == "highest" and matmul_precision("bfloat16") is None


# --- input checking ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,mutate,match",
    [
        ("c2i", lambda x, t, y: (x[0], t, y), r"\(B, H, W, C\)"),
        ("c2i", lambda x, t, y: (x[..., :2], t, y), "in_channels=3"),
        ("c2i", lambda x, t, y: (x[:, :6], t, y), "multiples of patch_size=4"),
        ("c2i", lambda x, t, y: (x, t[:1], y), r"t must be .* \(2,\)"),
        ("c2i", lambda x, t, y: (x, t, y[:1]), r"labels of shape \(B,\) = \(2,\)"),
        ("c2i", lambda x, t, y: (x, t, y.astype(jnp.float32)), "integer class labels"),
        ("t2i", lambda x, t, y: (x, t, y[..., :5]), "txt_embed_dim"),
        ("t2i", lambda x, t, y: (x, t, y[:1]), r"\(2, L, 12\)"),
        ("theta", lambda x, t, y: (x, t, y[:, :2]), "theta must have shape"),
    ],
)
def test_bad_inputs_raise_clear_errors(kind, mutate, match):
    model = build_model(TINY[kind], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        model(*mutate(*_inputs(kind)))


def test_model_classes():
    assert isinstance(build_model(TINY["c2i"], rngs=nnx.Rngs(0)), PixelDiT)
    assert isinstance(build_model(TINY["t2i"], rngs=nnx.Rngs(0)), PixelDiTT2I)
    assert isinstance(build_model(TINY["theta"], rngs=nnx.Rngs(0)), PixelDiTTheta)


def test_theta_adaln_carries_theta_without_the_tokens():
    """With the token path blind to theta (zero projection), the output depends on theta only through
    the adaLN condition: constant without ``theta_adaln``, varying with it."""
    x, t, theta = _inputs("theta")
    other = theta + 0.5
    for adaln in (False, True):
        model = build_model(TINY["theta"].replace(theta_adaln=adaln), rngs=nnx.Rngs(0))
        _randomise(model)
        model.y_embedder.proj.kernel[...] = jnp.zeros_like(model.y_embedder.proj.kernel[...])
        change = np.abs(np.asarray(model(x, t, theta)) - np.asarray(model(x, t, other))).max()
        assert (change > 1e-4) if adaln else (change == 0.0), (adaln, change)


def test_theta_adaln_parameters_and_null():
    base, cfg = TINY["theta"], TINY["theta"].replace(theta_adaln=True)
    d, k = cfg.hidden_size, cfg.theta_dim
    assert count_params(cfg) - count_params(base) == (k * d + d) + (d * d + d)  # Linear(K->D), Linear(D->D)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    assert np.all(np.asarray(model(*_inputs("theta"))) == 0.0)  # still exactly zero at init
    _randomise(model)
    theta = jnp.array([[0.3, jnp.nan, -1.0]])
    np.testing.assert_array_equal(model.theta_adaln(theta[..., None]), model.theta_adaln(jnp.array([[0.3, 0.0, -1.0]])[..., None]))


@pytest.mark.parametrize("std", [0.02, 1.0])
def test_theta_token_table_init_std(std):
    cfg = TINY["theta"].replace(hidden_size=256, num_groups=4, theta_dim=8, token_init_std=std)
    table = np.asarray(build_model(cfg, rngs=nnx.Rngs(0)).y_embedder.pos_embedding[...])
    assert table.shape == (1, 8, 256)
    assert abs(table.std() / std - 1.0) < 0.1  # 2,048 draws: the sample std is within ~3% of std
    with pytest.raises(ValueError, match="token_init_std must be >= 0"):
        TINY["theta"].replace(token_init_std=-1.0)

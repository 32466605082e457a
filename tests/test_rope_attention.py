"""2D/1D RoPE tables and rotary attention against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import golden
from pixeldit.attention import ATTENTION_ENV, RotaryAttention, attend, attention_implementation, use_attention
from pixeldit.convert import load_reference_state_dict
from pixeldit.rope import apply_rope, rope_1d_angles, rope_2d_angles


@pytest.fixture(scope="module")
def gold():
    return golden.load("modules.npz")


def _as_pairs(angles):
    return np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def test_golden_rope_2d(gold):
    _, d = gold
    golden.assert_close(_as_pairs(rope_2d_angles(16, 3, 5)), d["out/rope2d_16_3x5"])
    golden.assert_close(_as_pairs(rope_2d_angles(32, 4, 4, theta=100.0, scale=8.0)), d["out/rope2d_32_4x4_scale8_theta100"])


def test_rope_2d_positions_are_fractional():
    # any grid spans [0, 16]: the last token of a 2x2 and of a 5x5 grid share their angles
    a2, a5 = rope_2d_angles(8, 2, 2), rope_2d_angles(8, 5, 5)
    np.testing.assert_allclose(a2[-1], a5[-1], rtol=1e-6)
    np.testing.assert_allclose(a2[0], 0.0)


def test_rope_1d_matches_formula():
    a = rope_1d_angles(8, 5, theta=10000.0)
    freqs = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(a, np.outer(np.arange(5), freqs), rtol=1e-6)


def test_apply_rope_preserves_pair_norms_and_is_relative():
    x = np.random.default_rng(0).normal(size=(1, 6, 2, 8)).astype(np.float32)
    ang = rope_1d_angles(8, 6)
    y = np.asarray(apply_rope(jnp.asarray(x), ang))
    np.testing.assert_allclose(np.linalg.norm(y.reshape(1, 6, 2, 4, 2), axis=-1),
                               np.linalg.norm(x.reshape(1, 6, 2, 4, 2), axis=-1), rtol=1e-5)
    # q.k after rotation depends only on the position difference
    q = np.broadcast_to(x[:, :1], x.shape)
    r = np.asarray(apply_rope(jnp.asarray(q), ang))
    dots = np.einsum("bnhd,bmhd->bhnm", r, r)[0, 0]
    np.testing.assert_allclose(dots[0, 1], dots[3, 4], rtol=1e-4)


def test_golden_rotary_attention(gold):
    cfg, d = gold
    c = cfg["rotary_attention"]
    attn = RotaryAttention(c["dim"], c["num_heads"], rngs=nnx.Rngs(0))
    load_reference_state_dict(attn, golden.state_dict(d, "sd/rotary_attention/"))
    h, w = c["grid"]
    rope = rope_2d_angles(c["dim"] // c["num_heads"], h, w)
    golden.assert_close(attn(jnp.asarray(d["in/rotary_attention"]), rope), d["out/rotary_attention"])


# -- attention implementation choice -----------------------------------------------------------


def _qkv(dtype, b=2, n=16, h=4, d=72, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (b, n, h, d), jnp.float32).astype(dtype) for k in keys]


@pytest.mark.parametrize(
    "backend, dtype, head_dim, masked, expected",
    [
        ("gpu", jnp.bfloat16, 72, False, "cudnn"),
        ("gpu", jnp.float16, 128, False, "cudnn"),
        ("gpu", jnp.float32, 72, False, "xla"),  # float32 keeps XLA's exact softmax
        ("gpu", jnp.bfloat16, 72, True, "xla"),  # masked joint attention stays on XLA
        ("gpu", jnp.bfloat16, 68, False, "xla"),  # head_dim not a multiple of 8
        ("gpu", jnp.bfloat16, 256, False, "xla"),
        ("cpu", jnp.bfloat16, 72, False, "xla"),
        ("tpu", jnp.bfloat16, 72, False, "xla"),
    ],
)
def test_attention_implementation_auto(monkeypatch, backend, dtype, head_dim, masked, expected):
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    q = jnp.zeros((1, 4, 2, head_dim), dtype)
    mask = jnp.ones((1, 4), bool) if masked else None
    assert attention_implementation(q, mask, backend=backend) == expected


def test_attention_implementation_override_and_bad_value(monkeypatch):
    q = jnp.zeros((1, 4, 2, 72), jnp.float32)
    monkeypatch.setenv(ATTENTION_ENV, "cudnn")
    assert attention_implementation(q, backend="cpu") == "cudnn"
    monkeypatch.setenv(ATTENTION_ENV, "XLA")
    assert attention_implementation(q, backend="gpu") == "xla"
    monkeypatch.setenv(ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="PIXELDIT_ATTENTION.*'flash'"):
        attention_implementation(q)
    monkeypatch.setenv(ATTENTION_ENV, "cudnn")
    with use_attention("xla"):  # the context wins over the environment, and is undone after
        assert attention_implementation(q.astype(jnp.bfloat16), backend="gpu") == "xla"
    assert attention_implementation(q, backend="cpu") == "cudnn"
    with pytest.raises(ValueError, match="'xla' or 'cudnn'.*'auto'"):
        with use_attention("auto"):
            pass


def test_attend_matches_explicit_softmax_with_mask():
    q, k, v = _qkv(jnp.float32, n=6, d=8)
    mask = jnp.array([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
    ref = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    np.testing.assert_allclose(attend(q, k, v, mask), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_xla_on_gpu(monkeypatch):
    """Forward and gradients of the cuDNN path agree with XLA's within bfloat16 rounding."""
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    q, k, v = _qkv(jnp.bfloat16, b=4, n=256, h=16, d=72, seed=1)
    assert attention_implementation(q) == "cudnn"

    def loss(impl, q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    hlo = jax.jit(lambda q, k, v: attend(q, k, v)).lower(q, k, v).compile().as_text()
    assert "cudnn" in hlo.lower(), "auto did not lower to a cuDNN fused attention call"
    ref = jax.grad(loss, argnums=(1, 2, 3))("xla", *(a.astype(jnp.float32) for a in (q, k, v)))
    for impl in ("xla", "cudnn"):
        out = attend(q, k, v) if impl == "cudnn" else jax.nn.dot_product_attention(q, k, v, implementation="xla")
        exact = jax.nn.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)), implementation="xla")
        rel = float(jnp.linalg.norm(out.astype(jnp.float32) - exact) / jnp.linalg.norm(exact))
        assert rel < 1e-2, (impl, rel)
        grads = jax.grad(loss, argnums=(1, 2, 3))(impl, q, k, v)
        for g, r in zip(grads, ref):
            rel = float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
            assert rel < 2e-2, (impl, rel)

"""Which ``jax.nn.dot_product_attention`` implementation ``pixeldit.attention`` uses, and that they agree.

The cuDNN comparison needs a GPU and is skipped elsewhere (CI has none); it ran on an H200
(docs/benchmark-log.md, entry 4).  The golden parity of attention is in ``test_rope_attention.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldit.attention import ATTENTION_ENV, attend, attention_implementation, use_attention


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
    q32, k32, v32 = (a.astype(jnp.float32) for a in (q, k, v))
    ref = jax.grad(loss, argnums=(1, 2, 3))("xla", q32, k32, v32)
    exact = jax.nn.dot_product_attention(q32, k32, v32, implementation="xla")
    for impl in ("xla", "cudnn"):
        out = attend(q, k, v) if impl == "cudnn" else jax.nn.dot_product_attention(q, k, v, implementation="xla")
        rel = float(jnp.linalg.norm(out.astype(jnp.float32) - exact) / jnp.linalg.norm(exact))
        assert rel < 1e-2, (impl, rel)
        grads = jax.grad(loss, argnums=(1, 2, 3))(impl, q, k, v)
        for g, r in zip(grads, ref):
            rel = float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
            assert rel < 2e-2, (impl, rel)

"""2D/1D RoPE tables and rotary attention against the reference."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import golden
from pixeldit.attention import RotaryAttention
from pixeldit.convert import load_reference_state_dict
from pixeldit.rope import apply_rope, rope_1d_angles, rope_2d_angles

# float32 products in full float32 on every backend (see conftest.reference_precision)
pytestmark = pytest.mark.usefixtures("reference_precision")


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

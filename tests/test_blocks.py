"""DiT, MMDiT and PiT blocks against the reference (golden blocks.npz)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import golden
from pixeldit.blocks import DiTBlock, MMDiTBlock, PiTBlock
from pixeldit.convert import load_reference_state_dict
from pixeldit.rope import rope_1d_angles, rope_2d_angles

# float32 products in full float32 on every backend (see conftest.reference_precision)
pytestmark = pytest.mark.usefixtures("reference_precision")


@pytest.fixture(scope="module")
def gold():
    return golden.load("blocks.npz")


def _load(module, d, case):
    load_reference_state_dict(module, golden.state_dict(d, f"sd/{case}/"))
    return module


@pytest.mark.parametrize("case", ["pit_pre", "pit_post"])
def test_golden_pit_block(gold, case):
    cfg, d = gold
    c = cfg[case]
    p = c["patch_size"]
    h, w = c["image"]
    b = c["batch"]
    hs, ws = h // p, w // p
    blk = PiTBlock(c["pixel_hidden_size"], c["patch_hidden_size"], p, c["attn_num_heads"], 4.0, c["attn_hidden_size"],
                   adaln_post_modulation=c["adaln_post_modulation"], rngs=nnx.Rngs(0))
    _load(blk, d, case)
    x = d[f"in/{case}/x"]  # (B*L, p*p, D_pix), the reference's layout
    s = d[f"in/{case}/s_cond"]  # (B*L, D)
    rope = rope_2d_angles(c["attn_hidden_size"] // c["attn_num_heads"], hs, ws)
    out = blk(jnp.asarray(x.reshape(b, hs * ws, p * p, -1)), jnp.asarray(s.reshape(b, hs * ws, -1)), rope)
    golden.assert_close(np.asarray(out).reshape(x.shape), d[f"out/{case}"])


def test_golden_dit_block(gold):
    cfg, d = gold
    c = cfg["dit_block"]
    blk = _load(DiTBlock(c["hidden_size"], c["num_heads"], rngs=nnx.Rngs(0)), d, "dit_block")
    rope = rope_2d_angles(c["hidden_size"] // c["num_heads"], *c["grid"])
    out = blk(jnp.asarray(d["in/dit_block/x"]), jnp.asarray(d["in/dit_block/c"]), rope)
    golden.assert_close(out, d["out/dit_block"])


@pytest.mark.parametrize("text_rope", [True, False])
def test_golden_mmdit_block(gold, text_rope):
    cfg, d = gold
    c = cfg["mmdit_block"]
    blk = _load(MMDiTBlock(c["hidden_size"], c["num_heads"], rngs=nnx.Rngs(0)), d, "mmdit_block")
    hd = c["hidden_size"] // c["num_heads"]
    rope = rope_2d_angles(hd, *c["grid"])
    rope_txt = rope_1d_angles(hd, c["text_len"], c["text_rope_theta"]) if text_rope else None
    x, y = blk(jnp.asarray(d["in/mmdit_block/x"]), jnp.asarray(d["in/mmdit_block/y"]),
               jnp.asarray(d["in/mmdit_block/c"]), rope, rope_txt)
    key = "mmdit_block" if text_rope else "mmdit_block_no_text_rope"
    golden.assert_close(x, d[f"out/{key}/x"])
    golden.assert_close(y, d[f"out/{key}/y"])

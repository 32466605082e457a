"""Pickled PyTorch checkpoints (Lightning .ckpt, t2i .pth) through the optional torch extra."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed (pip install 'pixeldit[torch]')")

from flax import nnx  # noqa: E402

from pixeldit.convert import read_checkpoint_file, to_reference_state_dict  # noqa: E402
from pixeldit.model import C2IConfig, build_model  # noqa: E402

CFG = C2IConfig(in_channels=3, num_groups=2, hidden_size=16, pixel_hidden_size=4, patch_depth=2, pixel_depth=1,
                patch_size=2, num_classes=3)


@pytest.fixture(scope="module")
def sd():
    # writable copies: torch.from_numpy warns on read-only arrays
    return {k: np.array(v) for k, v in to_reference_state_dict(build_model(CFG, rngs=nnx.Rngs(0))).items()}


def test_lightning_ckpt(tmp_path, sd):
    state = {}
    for k, v in sd.items():
        state[f"denoiser.{k}"] = torch.from_numpy(v)
        state[f"ema_denoiser._orig_mod.{k}"] = torch.from_numpy(v + 1)
    state["diffusion_trainer.proj.0.0.weight"] = torch.zeros(3)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "m.ckpt")
    ema = read_checkpoint_file(tmp_path / "m.ckpt")
    raw = read_checkpoint_file(tmp_path / "m.ckpt", ema=False)
    assert set(ema) == set(raw) == set(sd)
    np.testing.assert_array_equal(ema["final_layer.linear.bias"], sd["final_layer.linear.bias"] + 1)


def test_t2i_style_pth_with_bf16(tmp_path, sd):
    state = {f"core.{k}": torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}
    state["_repa_projector.0.weight"] = torch.zeros(2)
    torch.save({"state_dict": state}, tmp_path / "t2i.pth")
    out = read_checkpoint_file(tmp_path / "t2i.pth")
    assert set(out) == set(sd)
    assert out["s_embedder.proj.weight"].dtype == np.float32

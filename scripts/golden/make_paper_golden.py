"""Write the golden files under tests/golden/ for resampling, DINOv2, REPA and FID Inception.

Run once, in a scratch environment with the reference libraries (not a project dependency):

    python3 -m venv /tmp/golden-venv
    /tmp/golden-venv/bin/pip install torch==2.13.0 timm pytorch-fid
    /tmp/golden-venv/bin/python scripts/golden/make_paper_golden.py

References: torch's ``F.interpolate`` / ``F.adaptive_avg_pool2d``; timm's ``VisionTransformer``
with DINOv2's settings, fed the position table resized as the torch-hub DINOv2
(``interpolate_pos_encoding``) resizes it; the reference PixelDiT ``REPATrainer`` loss, restated
below line by line; pytorch-fid's ``InceptionV3`` (FID variant).  Large models get weights from
``tests/seeded.py`` (only the seed, key names and shapes are stored); the tests rebuild them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.library
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden"
sys.path.insert(0, str(ROOT / "tests"))
from seeded import seeded_array, seeded_state_dict  # noqa: E402

_register_fake = torch.library.register_fake


def _tolerant_register_fake(op, *args, **kwargs):
    # The only torchvision wheel at hand was built for CUDA: its C ops fail to load on a CPU-only
    # torch, and its import then dies registering fakes for them.  timm and pytorch-fid need only
    # torchvision's Python modules, so skip those registrations.
    if isinstance(op, str) and op.startswith("torchvision::"):
        return lambda fn: fn
    return _register_fake(op, *args, **kwargs)


torch.library.register_fake = _tolerant_register_fake
import pytorch_fid.inception as fid_inception  # noqa: E402
import timm.models.vision_transformer as timm_vit  # noqa: E402

torch.set_grad_enabled(False)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy().astype(np.float32)


def save(name: str, config: dict, **arrays) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / name, config=json.dumps(config), **arrays)
    print(f"{name}: {(OUT / name).stat().st_size / 1024:.1f} KiB")


# ----------------------------------------------------------------------------------------------
# resampling
# ----------------------------------------------------------------------------------------------


def make_resample() -> None:
    x = torch.from_numpy(seeded_array((2, 3, 13, 17), seed=1, low=-1.0, high=1.0))
    cases = {
        "bilinear_up": F.interpolate(x, size=(20, 30), mode="bilinear", align_corners=False),
        "bilinear_down": F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=False),
        "bicubic_up": F.interpolate(x, size=(20, 30), mode="bicubic", align_corners=False),
        "bicubic_down": F.interpolate(x, size=(7, 9), mode="bicubic", align_corners=False),
        # DINOv2's position-table resize: a scale factor (n + 0.1) / M, not a size
        "bicubic_scale": F.interpolate(x, scale_factor=(5.1 / 13, 6.1 / 17), mode="bicubic", align_corners=False),
        "area_down": F.adaptive_avg_pool2d(x, (5, 6)),
        "area_up": F.adaptive_avg_pool2d(x, (16, 20)),
    }
    raw = torch.from_numpy(seeded_array((2, 3, 32, 32), seed=2))
    normed = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    cases["dino_preprocess"] = F.interpolate(normed, (int(14 * 32 / 16), int(14 * 32 / 16)), mode="bicubic")
    save("resample.npz", {"scale": [5.1 / 13, 6.1 / 17]}, x=nhwc(x), raw=nhwc(raw), **{k: nhwc(v) for k, v in cases.items()})


# ----------------------------------------------------------------------------------------------
# DINOv2
# ----------------------------------------------------------------------------------------------


def hub_pos_embed(pos_embed: torch.Tensor, h0: int, w0: int, offset: float = 0.1) -> torch.Tensor:
    """torch-hub DINOv2 ``interpolate_pos_encoding`` (interpolate_offset 0.1, no antialias)."""
    n = pos_embed.shape[1] - 1
    m = int(n**0.5)
    if (h0, w0) == (m, m):
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h0 + offset) / m, (w0 + offset) / m), mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (h0, w0)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)


def dinov2_patch_tokens(model, images: torch.Tensor) -> torch.Tensor:
    """DINOv2 ``forward_features(x)["x_norm_patchtokens"]`` with timm's layers."""
    h0, w0 = images.shape[2] // 14, images.shape[3] // 14
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + hub_pos_embed(model.pos_embed, h0, w0)
    for block in model.blocks:
        x = block(x)
    return model.norm(x)[:, 1:]


def dinov2(img_size: int, dim: int, depth: int, heads: int):
    return timm_vit.VisionTransformer(
        img_size=img_size, patch_size=14, embed_dim=dim, depth=depth, num_heads=heads,
        init_values=1e-5, num_classes=0,  # timm's vit_*_patch14_dinov2 arguments
    ).eval()


def shapes_of(model) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def make_dinov2_tiny() -> None:
    model = dinov2(img_size=56, dim=32, depth=2, heads=2)
    shapes = shapes_of(model)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in seeded_state_dict(shapes, seed=3).items()})
    native = torch.from_numpy(seeded_array((2, 3, 56, 56), seed=4, low=-2, high=2))
    other = torch.from_numpy(seeded_array((2, 3, 42, 70), seed=5, low=-2, high=2))
    timm_native = model.forward_features(native)[:, 1:]
    ours_native = dinov2_patch_tokens(model, native)
    assert torch.allclose(timm_native, ours_native, atol=1e-6), "hub-style forward != timm at the native size"
    config = {
        "img_size": 56, "dim": 32, "depth": 2, "heads": 2, "seed": 3, "shapes": shapes,
        "native": {"seed": 4, "shape_nchw": [2, 3, 56, 56]}, "other": {"seed": 5, "shape_nchw": [2, 3, 42, 70]},
    }
    save(
        "dinov2_tiny.npz", config,
        native_tokens=timm_native.numpy(), other_tokens=dinov2_patch_tokens(model, other).numpy(),
    )


def make_dinov2_vitb14() -> None:
    model = dinov2(img_size=518, dim=768, depth=12, heads=12)
    shapes = shapes_of(model)
    sd = seeded_state_dict(shapes, seed=6)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    images = torch.from_numpy(seeded_array((1, 3, 224, 224), seed=7, low=-2, high=2))
    tokens = dinov2_patch_tokens(model, images)  # (1, 256, 768)
    keep = np.arange(0, 256, 17)
    save(
        "dinov2_vitb14.npz",
        {"seed": 6, "image_seed": 7, "image_shape_nchw": [1, 3, 224, 224], "shapes": shapes, "keep": keep.tolist()},
        tokens=tokens[:, keep].numpy(), tokens_abs_mean=np.float64(tokens.abs().mean()),
    )


# ----------------------------------------------------------------------------------------------
# REPA: the reference's c2i REPATrainer and t2i PixDiTTrainer alignment losses, restated
# ----------------------------------------------------------------------------------------------


def c2i_repa_loss(src_feature: torch.Tensor, dst_feature: torch.Tensor) -> torch.Tensor:
    """c2i ``REPATrainer._impl_trainstep``: ``cos_loss.mean()`` of projected block tokens vs encoder tokens."""
    if dst_feature.shape[1] != src_feature.shape[1]:
        bsz, ls, ch = src_feature.shape
        ld = dst_feature.shape[1]
        hs = int(ls**0.5)
        hd = int(ld**0.5)
        src_spatial = src_feature.view(bsz, hs, hs, ch).permute(0, 3, 1, 2)
        if ld < ls:
            resized = F.adaptive_avg_pool2d(src_spatial, (hd, hd))
        else:
            resized = F.interpolate(src_spatial, size=(hd, hd), mode="bilinear", align_corners=False)
        src_feature = resized.permute(0, 2, 3, 1).reshape(bsz, ld, ch)
    cos_sim = F.cosine_similarity(src_feature, dst_feature, dim=-1)
    return (1 - cos_sim).mean()


def t2i_repa_loss(proj_tokens: torch.Tensor, repa_tokens: torch.Tensor) -> torch.Tensor:
    """t2i ``PixDiTTrainer.forward``: negative mean cosine, the finer grid resized to the coarser."""
    proj_tokens = F.normalize(proj_tokens, dim=-1)
    b, td, c = repa_tokens.shape
    bu, tu, cu = proj_tokens.shape
    h_u, h_d = int(tu**0.5), int(td**0.5)
    if td > tu:
        dino = repa_tokens.permute(0, 2, 1).reshape(b, c, h_d, h_d)
        dino = F.interpolate(dino, size=(h_u, h_u), mode="bilinear", align_corners=False).flatten(2).permute(0, 2, 1)
        return -((proj_tokens * F.normalize(dino, dim=-1)).sum(dim=-1)).mean()
    if td < tu:
        usit = proj_tokens.permute(0, 2, 1).reshape(bu, cu, h_u, h_u)
        usit = F.interpolate(usit, size=(h_d, h_d), mode="bilinear", align_corners=False).flatten(2).permute(0, 2, 1)
        return -((F.normalize(usit, dim=-1) * F.normalize(repa_tokens, dim=-1)).sum(dim=-1)).mean()
    return -((proj_tokens * F.normalize(repa_tokens, dim=-1)).sum(dim=-1)).mean()


def make_repa() -> None:
    hidden, proj_hidden, enc_dim, batch, ls = 24, 20, 12, 2, 16
    proj = torch.nn.Sequential(
        torch.nn.Sequential(  # c2i: REPATrainer.proj, saved as diffusion_trainer.proj.0.{0,2,4}
            torch.nn.Linear(hidden, proj_hidden), torch.nn.SiLU(),
            torch.nn.Linear(proj_hidden, proj_hidden), torch.nn.SiLU(),
            torch.nn.Linear(proj_hidden, enc_dim),
        )
    )
    shapes = {k: list(v.shape) for k, v in proj.state_dict().items()}
    proj.load_state_dict({k: torch.from_numpy(v) for k, v in seeded_state_dict(shapes, seed=8).items()})
    arrays = {f"proj/{k}": v.numpy() for k, v in proj.state_dict().items()}
    src = torch.from_numpy(seeded_array((batch, ls, hidden), seed=9, low=-1, high=1))
    for ld in (4, 16, 36):  # fewer encoder tokens (pooled), as many, more (bilinear)
        dst = torch.from_numpy(seeded_array((batch, ld, enc_dim), seed=10 + ld, low=-1, high=1))
        arrays[f"dst_{ld}"] = dst.numpy()
        for style, fn in (("c2i", c2i_repa_loss), ("t2i", t2i_repa_loss)):
            with torch.enable_grad():
                proj.zero_grad()
                x = src.clone().requires_grad_(True)
                loss = fn(proj(x), dst)
                loss.backward()
            arrays[f"{style}_{ld}/loss"] = loss.detach().numpy()
            arrays[f"{style}_{ld}/grad_src"] = x.grad.numpy()
            for k, v in proj.named_parameters():
                arrays[f"{style}_{ld}/grad/{k}"] = v.grad.numpy()
    save("repa.npz", {"hidden": hidden, "proj_hidden": proj_hidden, "enc_dim": enc_dim}, src=src.numpy(), **arrays)


# ----------------------------------------------------------------------------------------------
# FID Inception-v3 (pytorch-fid)
# ----------------------------------------------------------------------------------------------


def make_inception() -> None:
    loaded = {}

    def seeded_weights(url, progress=True):  # stands in for the download of the FID weights file
        shapes = {k: list(v.shape) for k, v in loaded["net"].state_dict().items() if not k.endswith("num_batches_tracked")}
        loaded["shapes"] = shapes
        return {k: torch.from_numpy(v) for k, v in seeded_state_dict(shapes, seed=11).items()}

    original = fid_inception._inception_v3

    def capture(*args, **kwargs):
        loaded["net"] = original(*args, **kwargs)
        return loaded["net"]

    fid_inception._inception_v3, fid_inception.load_state_dict_from_url = capture, seeded_weights
    model = fid_inception.InceptionV3([3]).eval()  # pool3 features, resize to 299, [0, 1] -> [-1, 1]
    direct = fid_inception.InceptionV3([3], resize_input=False).eval()
    small = torch.from_numpy(seeded_array((2, 3, 75, 75), seed=12))  # the smallest size Inception-v3 takes
    resized = torch.from_numpy(seeded_array((2, 3, 24, 24), seed=13))  # upsampled to 299 inside
    save(
        "inception.npz",
        {"seed": 11, "shapes": loaded["shapes"], "small": {"seed": 12, "shape_nchw": [2, 3, 75, 75]},
         "resized": {"seed": 13, "shape_nchw": [2, 3, 24, 24]}},
        small_features=direct(small)[0].flatten(1).numpy(), resized_features=model(resized)[0].flatten(1).numpy(),
    )


def make_frechet() -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: PLC0415

    features = seeded_array((400, 16), seed=14, low=-1, high=1).astype(np.float64)
    features[200:] = 1.3 * features[200:] + 0.2  # two halves from different distributions
    a, b = features[:200], features[200:]
    stats = [(x.mean(axis=0), np.cov(x, rowvar=False)) for x in (a, b)]
    save("frechet.npz", {"seed": 14}, features=features, fid=np.float64(calculate_frechet_distance(*stats[0], *stats[1])))


def main() -> None:
    make_resample()
    make_dinov2_tiny()
    make_dinov2_vitb14()
    make_repa()
    make_inception()
    make_frechet()


if __name__ == "__main__":
    main()

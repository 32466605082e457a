"""Write tests/golden/resume_c2i.npz: one training step of the reference c2i REPA trainer.

The reference is the official code itself (github.com/gcy-hub/PixelDiT: ``pixdit_core.PixDiT``
and ``c2i/src/diffusion.py``'s ``REPATrainer``), run on CPU in float32, not a restatement:

    git clone https://github.com/gcy-hub/PixelDiT /tmp/PixelDiT
    python scripts/golden/make_resume_golden.py /tmp/PixelDiT

It needs torch only (the project's test extra).  ``diffusion.py`` imports torchvision, timm and,
through ``utils.py``, Lightning, for its DINOv2 wrapper and callbacks; none of those are on the
trainer's path, so small stand-ins are registered for them (``Normalize``, the ImageNet
constants, ``no_grad``).  The frozen encoder is replaced by a module returning fixed tokens,
which are stored: the DINOv2 encoder has golden files of its own.

What it records (all float32): the state dict of a Lightning checkpoint of the run
(``denoiser.*``, ``ema_denoiser.*``, ``diffusion_trainer.proj.0.*``, as ``LightningModel.state_dict``
assembles it, with every weight randomised; the EMA weights as the seed and shapes ``tests/seeded.py``
rebuilds them from, the others as arrays), the batch and every random draw of the step
(which examples drop their label, t, the noise), the encoder tokens, and the step's flow loss,
REPA loss, total loss and the global gradient norm over the denoiser and the projector (what
Lightning's ``gradient_clip_val`` clips).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden" / "resume_c2i.npz"
sys.path.insert(0, str(ROOT / "tests"))
from seeded import seeded_array, seeded_state_dict  # noqa: E402

MODEL = dict(in_channels=1, patch_size=4, hidden_size=32, num_groups=2, patch_depth=2, pixel_depth=1,
             pixel_hidden_size=8, num_classes=10)
REPA = dict(align_layer=1, proj_hidden_dim=24, proj_encoder_dim=16, feat_loss_weight=0.5)
BATCH, SIDE, ENCODER_TOKENS, GLOBAL_STEP = 4, 16, 4, 1234
EMA_SEED = 22  # the EMA weights are not stored: tests/seeded.py rebuilds them from the seed and shapes


def _stub(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def load_reference(repo: Path):
    """``(PixDiT, the c2i diffusion module)`` from a checkout of the reference repository."""
    sys.path.insert(0, str(repo))
    from pixdit_core.pixeldit_c2i import PixDiT  # noqa: PLC0415

    _stub("torchvision"), _stub("torchvision.transforms", Normalize=None)
    _stub("timm"), _stub("timm.data")
    _stub("timm.data.constants", IMAGENET_DEFAULT_MEAN=None, IMAGENET_DEFAULT_STD=None)

    def no_grad(net):  # c2i/src/utils.py no_grad, without the Lightning imports of that module
        for p in net.parameters():
            p.requires_grad = False
        return net.eval()

    package = types.ModuleType("refc2i")
    package.__path__ = [str(repo / "c2i" / "src")]
    sys.modules["refc2i"] = package
    _stub("refc2i.utils", no_grad=no_grad)
    spec = importlib.util.spec_from_file_location("refc2i.diffusion", repo / "c2i" / "src" / "diffusion.py")
    diffusion = importlib.util.module_from_spec(spec)
    sys.modules["refc2i.diffusion"] = diffusion
    spec.loader.exec_module(diffusion)
    return PixDiT, diffusion


class FixedTokens(torch.nn.Module):
    """The frozen encoder's place: returns the stored tokens whatever the images."""

    def __init__(self, tokens: torch.Tensor):
        super().__init__()
        self.tokens = tokens

    def forward(self, raw_images):
        return self.tokens


class Recorder:
    """Records what ``torch.rand`` / ``torch.randn`` / ``torch.randn_like`` return while active."""

    def __init__(self):
        self.draws: list[torch.Tensor] = []
        self.originals = {n: getattr(torch, n) for n in ("rand", "randn", "randn_like")}

    def __enter__(self):
        for name, fn in self.originals.items():
            setattr(torch, name, self._wrap(fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(torch, name, fn)

    def _wrap(self, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.draws.append(out.detach().clone())
            return out

        return wrapped


def randomised(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return {k: torch.from_numpy(v) for k, v in seeded_state_dict(shapes, seed=seed).items()}


def main(repo: Path) -> None:
    PixDiT, diffusion = load_reference(repo)
    torch.manual_seed(0)
    denoiser, ema = PixDiT(**MODEL), PixDiT(**MODEL)
    denoiser.load_state_dict(randomised(denoiser, 21))
    ema.load_state_dict(randomised(ema, EMA_SEED))  # the EMA differs from the raw weights, as in a real run
    tokens = torch.from_numpy(seeded_array((BATCH, ENCODER_TOKENS, REPA["proj_encoder_dim"]), seed=23, low=-1, high=1))
    trainer = diffusion.REPATrainer(
        scheduler=diffusion.LinearScheduler(), lognorm_t=True, timeshift=1.0, encoder=FixedTokens(tokens),
        align_layer=REPA["align_layer"], proj_denoiser_dim=MODEL["hidden_size"], proj_hidden_dim=REPA["proj_hidden_dim"],
        proj_encoder_dim=REPA["proj_encoder_dim"], feat_loss_weight=REPA["feat_loss_weight"], null_condition_p=0.1,
    )
    trainer.proj.load_state_dict(randomised(trainer.proj, 24))
    state_dict: dict[str, torch.Tensor] = {}  # LightningModel.state_dict's assembly
    denoiser.state_dict(destination=state_dict, prefix="denoiser.")
    ema.state_dict(destination=state_dict, prefix="ema_denoiser.")
    trainer.state_dict(destination=state_dict, prefix="diffusion_trainer.")

    x = torch.from_numpy(seeded_array((BATCH, MODEL["in_channels"], SIDE, SIDE), seed=25, low=-1, high=1))
    y = torch.tensor([3, 7, 0, 9])
    uncondition = torch.full((BATCH,), MODEL["num_classes"], dtype=torch.long)
    for seed in range(100):  # a seed whose label dropout keeps some labels and drops others
        torch.manual_seed(seed)
        with Recorder() as rec:
            out = trainer(denoiser, ema, None, x, y, uncondition, {"raw_image": (x + 1) / 2})
        drop = (rec.draws[0] < trainer.null_condition_p).numpy()
        if 0 < drop.sum() < BATCH:
            break
    out["loss"].backward()
    params = [p for p in (*denoiser.parameters(), *trainer.proj.parameters())]
    grad_norm = torch.sqrt(sum(torch.sum(p.grad.double() ** 2) for p in params))
    _, normal_t, noise = rec.draws  # BaseTrainer.preproprocess's dropout, then _impl_trainstep's t and noise
    t = diffusion.time_shift_fn(normal_t.sigmoid(), trainer.timeshift).to(x.dtype)  # as _impl_trainstep
    arrays = {f"sd/{k}": v.detach().numpy().astype(np.float32) for k, v in state_dict.items()
              if not k.startswith("ema_denoiser.")}
    ema_shapes = {k: list(v.shape) for k, v in ema.state_dict().items()}
    arrays.update({
        "in/x": x.numpy(), "in/y": y.numpy().astype(np.int32), "in/drop": drop,
        "in/t": t.numpy(), "in/noise": noise.numpy(), "in/encoder_tokens": tokens.numpy(),
        "out/flow_loss": out["fm_loss"].detach().numpy(), "out/repa_loss": out["cos_loss"].detach().numpy(),
        "out/loss": out["loss"].detach().numpy(), "out/grad_norm": grad_norm.numpy().astype(np.float32),
    })
    config = {"model": MODEL, "repa": REPA, "batch": BATCH, "image_size": SIDE, "global_step": GLOBAL_STEP,
              "ema": {"prefix": "ema_denoiser.", "seed": EMA_SEED, "shapes": ema_shapes}, "dropout_seed": seed,
              "reference": f"gcy-hub/PixelDiT c2i REPATrainer, float32 on CPU, torch {torch.__version__}"}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, config=json.dumps(config), **arrays)
    losses = {k: float(v.detach()) for k, v in out.items()}
    print(f"{OUT}: {OUT.stat().st_size / 1024:.1f} KiB; losses {json.dumps(losses)}, "
          f"grad norm {float(grad_norm):.6f}, dropped {drop.tolist()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_resume_golden.py /path/to/PixelDiT (a checkout of github.com/gcy-hub/PixelDiT)")
    main(Path(sys.argv[1]).resolve())

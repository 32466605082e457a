"""PixelDiT, the pixel-space diffusion transformer, in JAX / Flax NNX.

The front door for notebooks::

    from pixeldit import PixelDiTConfig, preset, build_model, TrainConfig, train, load_checkpoint, sample

Names are imported on first use, so ``import pixeldit`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "PixelDiTConfig": "pixeldit.model_config",
    "C2IConfig": "pixeldit.model_config",
    "T2IConfig": "pixeldit.model_config",
    "ThetaConfig": "pixeldit.model_config",
    "PRESETS": "pixeldit.model_config",
    "preset": "pixeldit.model_config",
    "build_model": "pixeldit.model",
    "count_params": "pixeldit.model",
    "TrainConfig": "pixeldit.training",
    "TrainResult": "pixeldit.training",
    "train": "pixeldit.training",
    "Checkpoint": "pixeldit.training",
    "load_checkpoint": "pixeldit.training",
    "sample": "pixeldit.sampling",
    "sample_batched": "pixeldit.sampling",
    "load_dataset": "pixeldit.data",
    "plot_sample_grid": "pixeldit.evaluate",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from pixeldit.data import load_dataset
    from pixeldit.evaluate import plot_sample_grid
    from pixeldit.model import build_model, count_params
    from pixeldit.model_config import PRESETS, C2IConfig, PixelDiTConfig, T2IConfig, ThetaConfig, preset
    from pixeldit.sampling import sample, sample_batched
    from pixeldit.training import Checkpoint, TrainConfig, TrainResult, load_checkpoint, train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pixeldit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

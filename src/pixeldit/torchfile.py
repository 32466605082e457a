"""Read a user-supplied PyTorch weight file into numpy arrays (``.safetensors``, ``.pth``, ``.pt``).

Used for the frozen networks the project ports (DINOv2, FID Inception): the user points at a file,
nothing is downloaded.  Pickled files need torch (``pip install 'pixeldit[torch]'``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of ``path`` as float32 / integer numpy arrays, keyed as in the file.

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper (training checkpoints) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file  # noqa: PLC0415  (optional format)

        return {k: _as_numpy(v) for k, v in load_file(str(path)).items()}
    if path.suffix not in (".pth", ".pt", ".bin", ".ckpt"):
        raise ValueError(f"weight file must be .safetensors, .pth, .pt, .bin or .ckpt, got {path.name}")
    try:
        import torch  # noqa: PLC0415  (optional dependency)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path.name} needs torch: pip install 'pixeldit[torch]'") from e
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
    return {k: _as_numpy(v) for k, v in raw.items()}


def _as_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor (bfloat16 has no numpy dtype: go through float32)
        v = v.detach().cpu()
        v = v.float() if v.is_floating_point() else v
        v = v.numpy()
    v = np.asarray(v)
    return v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v


def take(state_dict: dict[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Pop ``key`` and check its shape: converters pop every key and assert nothing is left over."""
    if key not in state_dict:
        raise KeyError(f"weight {key!r} is missing from the state dict")
    value = state_dict.pop(key)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"weight {key!r}: expected shape {tuple(shape)}, got {tuple(value.shape)}")
    return value


def assign(variable, value: np.ndarray) -> None:
    """Set an ``nnx.Variable`` to ``value`` in the variable's dtype."""
    variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))


def check_consumed(state_dict: dict[str, np.ndarray], what: str) -> None:
    """Raise when a converter left keys it does not understand (a wrong or newer file)."""
    if state_dict:
        extra = ", ".join(sorted(state_dict)[:8])
        raise ValueError(f"{what}: {len(state_dict)} unexpected weights in the file, e.g. {extra}")

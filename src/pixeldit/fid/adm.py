"""Sample batches for the ADM evaluator (openai/guided-diffusion ``evaluations/evaluator.py``).

The evaluator reads one ``.npz`` whose ``arr_0`` is ``(N, H, W, 3)`` uint8; the reference's
``SaveImagesHook`` writes exactly that (``output.npz``).  Long sampling runs write numbered batch
files instead (each written atomically, so a killed run leaves only whole batches and resumes
after the last one) and :func:`merge_batches` joins them into the evaluator's file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

BATCH_PATTERN = re.compile(r"^batch_(\d{6})\.npz$")


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """Model outputs in [-1, 1] -> uint8, as the reference rounds (``clip((x + 1) * 127.5 + 0.5)``)."""
    x = (np.asarray(samples, dtype=np.float32) + 1.0) * 127.5 + 0.5
    return np.clip(x, 0, 255).astype(np.uint8)


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"ADM batches are uint8 (N, H, W, 3), got {images.dtype} {images.shape}")


def write_batch(directory: str | os.PathLike, index: int, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write batch ``index`` (``arr_0``: images, ``arr_1``: class labels if given) atomically."""
    _check_images(images)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"batch_{index:06d}.npz"
    tmp = directory / f".batch_{index:06d}.tmp.npz"
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": np.asarray(labels, np.int64)}
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def completed_batches(directory: str | os.PathLike) -> list[int]:
    """Indices of the batch files already written (sorted): a resumed run starts after them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := BATCH_PATTERN.match(p.name)))


def merge_batches(directory: str | os.PathLike, out: str | os.PathLike, *, num: int | None = None) -> Path:
    """Join the batch files (in index order, the first ``num`` images) into one evaluator ``.npz``."""
    indices = completed_batches(directory)
    if not indices:
        raise ValueError(f"no batch_NNNNNN.npz files in {directory}")
    if indices != list(range(len(indices))):
        raise ValueError(f"{directory}: batch files are not contiguous from 0 (have {indices[:5]}...)")
    images, labels = [], []
    for i in indices:
        with np.load(Path(directory) / f"batch_{i:06d}.npz") as data:
            images.append(data["arr_0"])
            if "arr_1" in data:
                labels.append(data["arr_1"])
    if labels and len(labels) != len(indices):
        raise ValueError(f"{directory}: only {len(labels)} of {len(indices)} batch files carry labels")
    images = np.concatenate(images)[:num]
    if num is not None and len(images) < num:
        raise ValueError(f"{directory} holds {len(images)} images, fewer than the {num} asked for")
    arrays = {"arr_0": images}
    if labels:
        arrays["arr_1"] = np.concatenate(labels)[: len(images)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return out

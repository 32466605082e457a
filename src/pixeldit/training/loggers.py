"""Experiment loggers beside ``metrics.jsonl``: TensorBoard or Weights & Biases (``train.logger``).

``metrics.jsonl`` is always written (:mod:`pixeldit.training.metrics`); ``"tensorboard"`` adds an
event file under ``<workdir>/tensorboard`` (tensorboardX: no TensorFlow needed; ``pip install
'pixeldit[tensorboard]'``) and ``"wandb"`` a W&B run (``pip install 'pixeldit[wandb]'``; offline
with ``WANDB_MODE=offline``), whose id is kept in ``<workdir>/wandb_id.txt`` so that a resumed run
appends to the same W&B run.  Each logs the train step's scalars (loss and its parts, grad norm,
lr, steps/s) under ``train/`` and the preview sample grids as images.
"""

from __future__ import annotations

import importlib
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

__all__ = ["LOGGERS", "MetricsLogger", "TensorBoardLogger", "WandbLogger", "open_logger"]

LOGGERS = ("jsonl", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"
WANDB_PROJECT = "pixeldit"  # default W&B project (the WANDB_PROJECT environment variable wins)


def _optional(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"train.logger = {extra!r} needs {module}: pip install 'pixeldit[{extra}]'") from e


def _read_image(path: str | os.PathLike) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))  # (H, W, 3) uint8


class MetricsLogger:
    """The ``"jsonl"`` logger: ``metrics.jsonl`` only (the train loop writes it), so every call is a no-op."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Log the scalars of step ``step``."""

    def image(self, step: int, tag: str, path: str | os.PathLike) -> None:
        """Log the PNG at ``path`` (a sample grid) as image ``tag`` of step ``step``."""

    def close(self) -> None:
        """Flush and close."""


class TensorBoardLogger(MetricsLogger):
    """Scalars and images into a TensorBoard event file under ``<workdir>/tensorboard``."""

    def __init__(self, workdir: str | os.PathLike):
        tbx = _optional("tensorboardX", "tensorboard")
        self.logdir = Path(workdir) / TENSORBOARD_DIR
        self.writer = tbx.SummaryWriter(str(self.logdir))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", float(value), step)

    def image(self, step: int, tag: str, path: str | os.PathLike) -> None:
        self.writer.add_image(tag, _read_image(path), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbLogger(MetricsLogger):
    """A W&B run in ``<workdir>/wandb`` with the run's config; resumed runs append to it (same id)."""

    def __init__(self, workdir: str | os.PathLike, config: Mapping[str, Any] | None = None):
        self.wandb = wandb = _optional("wandb", "wandb")
        workdir = Path(workdir)
        id_file = workdir / WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B run ids: letters and digits
            workdir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=workdir.name, id=run_id,
                              resume="allow", dir=str(workdir), config=dict(config or {}))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log({f"train/{k}": float(v) for k, v in values.items()}, step=step)

    def image(self, step: int, tag: str, path: str | os.PathLike) -> None:
        self.run.log({tag: self.wandb.Image(_read_image(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_logger(kind: str, workdir: str | os.PathLike, config: Mapping[str, Any] | None = None) -> MetricsLogger:
    """The logger ``train.logger`` names (``"jsonl"``, ``"tensorboard"`` or ``"wandb"``) for ``workdir``."""
    if kind == "jsonl":
        return MetricsLogger()
    if kind == "tensorboard":
        return TensorBoardLogger(workdir)
    if kind == "wandb":
        return WandbLogger(workdir, config)
    raise ValueError(f"train.logger must be one of {', '.join(LOGGERS)}, got {kind!r}")

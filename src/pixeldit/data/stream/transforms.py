"""Per-record preprocessing for streaming: decode, ADM centre crop, flip, [-1, 1] scaling.

The transforms are picklable classes so that grain can run them in worker processes.
Encoded records are decoded to 8-bit ``uint8`` ``(H, W, C)`` images (ADM's pipeline works on
8-bit RGB; 16-bit grayscale is rounded to 8 bits) and only the batch is scaled to float32,
which keeps the worker -> trainer traffic at a quarter of float32 records.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Any

import numpy as np
from PIL import Image

from ..base import DataError
from ..files import _is_gray

ON_CORRUPT = ("stop", "skip")
_BYTES_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # Pillow names the buffer, not the file


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's ``center_crop_arr`` (guided-diffusion ``image_datasets.py``), used by the reference's data prep.

    Halve with BOX filtering while the short side is at least ``2 * image_size``, resize
    bicubically so that the short side is ``image_size``, then crop the centre square.
    Returns the ``(image_size, image_size[, C])`` array of the image's mode.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def _to_mode(img: Image.Image, channels: int, name: str) -> Image.Image:
    """Convert to 8-bit ``"L"`` (``channels=1``) or ``"RGB"`` (``channels=3``)."""
    if img.mode == "F":
        raise DataError(f"image '{name}' has floating-point mode 'F'; store such data in a .npz instead")
    if img.mode == "I" or img.mode.startswith("I;16"):
        a = np.clip(np.asarray(img, dtype=np.float64) / 257.0, 0, 255)  # 16-bit -> 8-bit
        img = Image.fromarray(np.round(a).astype(np.uint8), mode="L")
    return img.convert("L" if channels == 1 else "RGB")


def image_channels(data: bytes, name: str) -> int:
    """1 if the encoded image is grayscale (as :mod:`pixeldit.data.files` decides), else 3."""
    if isinstance(data, BaseException):
        raise DataError(f"cannot read image '{name}': {type(data).__name__}: {data}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return 1 if _is_gray(img) else 3
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        raise DataError(f"cannot read image '{name}': {type(exc).__name__}: {_BYTES_REPR.sub('its bytes', str(exc))}") from exc


class Decode:
    """Record -> ``{"x": uint8 (H, W, C) | float32, "y": ...}``, or ``None`` for a skipped record.

    Args:
        resolution: side of the ADM centre crop; ``None`` keeps the stored size, which must
            then equal ``size`` ``(H, W)``.
        channels: 1 or 3.
        on_corrupt: ``"stop"`` raises :class:`DataError` naming the record; ``"skip"`` warns
            with the name and drops the record.
        size: expected ``(H, W)`` when ``resolution`` is ``None``.
    """

    def __init__(self, *, resolution: int | None, channels: int, on_corrupt: str, size: tuple[int, int] | None = None):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.resolution = resolution
        self.channels = channels
        self.on_corrupt = on_corrupt
        self.size = size

    def decode(self, data: Any, name: str) -> np.ndarray:
        """Encoded bytes -> uint8 ``(H, W, C)``; raises :class:`DataError` naming ``name``."""
        if isinstance(data, BaseException):
            raise DataError(f"cannot read image '{name}': {type(data).__name__}: {data}")
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                img = _to_mode(img, self.channels, name)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
            reason = _BYTES_REPR.sub("its bytes", str(exc))
            raise DataError(f"cannot read image '{name}': {type(exc).__name__}: {reason}") from exc
        if self.resolution is not None:
            arr = center_crop_arr(img, self.resolution)
        else:
            arr = np.asarray(img)
            if self.size is not None and arr.shape[:2] != tuple(self.size):
                raise DataError(
                    f"image '{name}' has size {arr.shape[0]}x{arr.shape[1]} (HxW) but the dataset's images are "
                    f"{self.size[0]}x{self.size[1]}; give a resolution to centre-crop them all"
                )
        return arr.reshape(*arr.shape[:2], self.channels)

    def __call__(self, record: dict[str, Any]) -> dict[str, Any] | None:
        image = record["image"]
        if isinstance(image, np.ndarray) and image.dtype == np.float32:
            x = image  # .npz records are stored arrays: no decoding, no crop
        else:
            try:
                x = self.decode(image, record["name"])
            except DataError as exc:
                if self.on_corrupt == "stop":
                    raise
                warnings.warn(f"skipping unreadable record: {exc}", UserWarning, stacklevel=1)
                return None
        out = {"x": x}
        if "y" in record:
            out["y"] = record["y"]
        return out


def random_flip(record: dict[str, Any] | None, rng: np.random.Generator) -> dict[str, Any] | None:
    """Flip ``x`` left-right with probability 1/2 (grain seeds ``rng`` per record)."""
    if record is None:
        return None
    if rng.random() < 0.5:
        record = dict(record, x=np.ascontiguousarray(record["x"][:, ::-1]))
    return record


def to_float(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scale a uint8 batch to float32 [-1, 1] (the reference's ``(x / 255 - 0.5) / 0.5``); labels to int32."""
    x = batch["x"]
    out = {"x": x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)}
    if "y" in batch:
        y = batch["y"]
        out["y"] = y.astype(np.int32) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float32)
    return out

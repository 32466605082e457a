"""User data: image folders and ``.npz`` archives, with validation.

Image folders (:func:`load_image_folder`)
    * ``root/<class_name>/*.png|jpg|...``: one subfolder per class; class names are
      sorted and mapped to labels ``0 .. K-1`` (``condition="class"``, names kept in
      ``class_names``);
    * ``root/*.png|jpg|...``: unconditional (``condition="none"``).
    Mixing loose images and class subfolders in ``root`` is an error.  Hidden
    entries (starting with ``.``) and files with other extensions are ignored.
    Images are read with Pillow; ``channels`` is 1 or 3 (default: 1 if every
    image is grayscale, else 3; RGB is converted to luminance for 1, grayscale is
    replicated for 3; alpha is dropped).  Folder images are always scaled from
    ``[0, 255]`` (``[0, 65535]`` for 16-bit grayscale) to ``[-1, 1]``.

``.npz`` archives (:func:`load_npz`)
    * ``x``: ``(N, H, W, C)`` or ``(N, H, W)`` (-> ``C = 1``), numeric;
    * optional ``y``: integer labels ``(N,)`` >= 0 (``condition="class"``), or
      ``theta``: float parameters ``(N, K)`` or ``(N,)`` (-> ``K = 1``,
      ``condition="theta"``); not both;
    * optional ``class_names``: ``(num_classes,)`` strings.
    ``normalize`` defaults to ``"none"``: values are kept as stored (float32), so
    physical fields are not distorted.  ``"uint8"`` maps ``[0, 255] -> [-1, 1]``
    (``x / 127.5 - 1``); ``"minmax"`` maps the global min/max of ``x`` to
    ``[-1, 1]``.  With ``"none"`` and an integer ``x`` a ``UserWarning`` suggests
    ``normalize="uint8"``.

All validation failures raise :class:`~pixeldit.data.base.DataError` (a
``ValueError``) whose message names the offending file or folder.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .base import ArrayDataset, DataError, check_patch_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
NORMALIZE_MODES = ("none", "uint8", "minmax")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _open_image(path: Path):
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        raise DataError(f"cannot read image file '{path}': {type(exc).__name__}: {exc}") from exc
    return img


def _is_gray(img) -> bool:
    if img.mode in _GRAY_MODES:
        return True
    if img.mode == "P":
        rgb = np.asarray(img.convert("RGB"))
        return bool(np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2]))
    return False


def _to_array(img, path: Path) -> np.ndarray:
    """Return float32 ``(H, W, 1)`` (grayscale) or ``(H, W, 3)`` (colour) in [0, 1]."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.clip(np.asarray(img, dtype=np.float64) / 65535.0, 0.0, 1.0)[..., None]
    elif img.mode == "F":
        raise DataError(f"image file '{path}' has floating-point mode 'F'; store such data in a .npz instead")
    elif _is_gray(img):
        a = (np.asarray(img.convert("L"), dtype=np.float64) / 255.0)[..., None]
    else:
        a = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    return a.astype(np.float32)


def _set_channels(a: np.ndarray, channels: int) -> np.ndarray:
    if a.shape[-1] == channels:
        return a
    if channels == 3:
        return np.repeat(a, 3, axis=-1)
    # ITU-R 601-2 luma, as Pillow's convert("L")
    return (a @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]


def _class_files(root: Path) -> tuple[list[Path], list[int], list[str] | None]:
    """List the image files of ``root`` with their labels and class names.

    Returns ``(files, labels, class_names)``; for an unconditional folder ``labels``
    is empty and ``class_names`` is ``None``.
    """
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = _list_images(root)
    if not subdirs:
        if not loose:
            raise DataError(
                f"image folder '{root}' is empty: it contains no images (extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        return loose, [], None
    if loose:
        raise DataError(
            f"image folder '{root}' mixes class subfolders ({', '.join(d.name for d in subdirs)}) with loose "
            f"images such as '{loose[0]}'; use either one subfolder per class or images only"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, d in enumerate(subdirs):
        imgs = _list_images(d)
        if not imgs:
            raise DataError(
                f"class folder '{d}' is empty: it contains no images (extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        files.extend(imgs)
        labels.extend([label] * len(imgs))
    return files, labels, [d.name for d in subdirs]


def _read_images(files: list[Path], root: Path, patch_size: int | None) -> list[np.ndarray]:
    """Read ``files`` as ``(H, W, 1|3)`` arrays in [0, 1]; all must share the first image's size."""
    images = []
    first_size: tuple[int, int] | None = None
    for f in files:
        img = _open_image(f)
        try:
            size = (img.height, img.width)
            if first_size is None:
                first_size = size
                check_patch_size(size, patch_size, f"image folder '{root}' (first image '{files[0]}')")
            elif size != first_size:
                raise DataError(
                    f"image '{f}' has size {size[0]}x{size[1]} (HxW) but '{files[0]}' has "
                    f"{first_size[0]}x{first_size[1]}; all images must have the same size"
                )
            images.append(_to_array(img, f))
        finally:
            img.close()
    return images


def load_image_folder(
    path: str | os.PathLike,
    *,
    channels: int | None = None,
    patch_size: int | None = None,
    seed: int = 0,
) -> ArrayDataset:
    """Load an image folder into an :class:`ArrayDataset` (see module docstring for layout).

    Args:
        path: folder with class subfolders or with images directly in it.
        channels: 1 or 3; default 1 if all images are grayscale else 3.
        patch_size: if given, both image sides must be multiples of it.
        seed: base seed of the batch permutations.

    Returns:
        ArrayDataset with ``x`` float32 ``(N, H, W, channels)`` in [-1, 1]; ``name``
        is the folder's base name; ``condition`` is ``"class"`` (``y`` int32,
        ``class_names`` sorted subfolder names) or ``"none"``.

    Raises:
        DataError: missing/empty folder or class subfolder, loose images next to
            class subfolders, unreadable image, mixed image sizes, sides not
            divisible by ``patch_size``.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist or is not a directory")
    if channels is not None and int(channels) not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    files, labels, class_names = _class_files(root)
    images = _read_images(files, root, patch_size)
    all_gray = all(a.shape[-1] == 1 for a in images)
    ch = int(channels) if channels is not None else (1 if all_gray else 3)
    x = np.stack([_set_channels(a, ch) for a in images]) * 2.0 - 1.0
    if class_names is None:
        return ArrayDataset(x, None, name=root.resolve().name, condition="none", seed=seed)
    return ArrayDataset(
        x,
        np.asarray(labels, dtype=np.int32),
        name=root.resolve().name,
        condition="class",
        num_classes=len(class_names),
        class_names=class_names,
        seed=seed,
    )


def _check_finite(a: np.ndarray, what: str, path: Path) -> None:
    finite = np.isfinite(a)
    if not finite.all():
        bad = np.argwhere(~finite)
        n_nan = int(np.isnan(a).sum())
        n_inf = int(np.isinf(a).sum())
        raise DataError(
            f"'{path}': array '{what}' contains {n_nan} NaN and {n_inf} inf values "
            f"(first at index {tuple(int(i) for i in bad[0])})"
        )


def _read_npz(p: Path) -> dict[str, np.ndarray]:
    """Return every array of the ``.npz`` archive ``p`` (pickles refused)."""
    if not p.is_file():
        raise DataError(f"npz file '{p}' does not exist")
    with open(p, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # np.load would read any other file as a pickle, and blame allow_pickle
            raise DataError(f"'{p}' is not an .npz archive (a zip of arrays, as numpy.savez writes)")
    try:
        with np.load(p, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read npz file '{p}': {type(exc).__name__}: {exc}") from exc


def _npz_images(data: dict[str, np.ndarray], p: Path, patch_size: int | None) -> tuple[np.ndarray, bool]:
    """Validate ``data["x"]``; return it as float32 ``(N, H, W, C)`` and whether it was stored as integers."""
    if "x" not in data:
        raise DataError(f"'{p}' has no array 'x' (found: {sorted(data)})")
    x = data["x"]
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"'{p}': 'x' must be numeric, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"'{p}': 'x' must have shape (N, H, W, C) or (N, H, W), got {x.shape} (rank {x.ndim})")
    if x.shape[0] == 0:
        raise DataError(f"'{p}': 'x' is empty (shape {x.shape})")
    if min(x.shape[1:]) == 0:
        raise DataError(f"'{p}': 'x' has an empty image dimension, shape {x.shape}")
    is_int = bool(np.issubdtype(x.dtype, np.integer))
    x = x.astype(np.float32)
    _check_finite(x, "x", p)
    check_patch_size(x.shape[1:3], patch_size, f"'{p}'")
    return x, is_int


def _npz_labels(data: dict[str, np.ndarray], p: Path, n: int) -> tuple[np.ndarray, int, list[str] | None]:
    """Validate ``data["y"]`` (and ``class_names``); return ``(y, num_classes, class_names)``."""
    y = data["y"]
    if y.ndim != 1:
        raise DataError(f"'{p}': 'y' must be integer labels of shape (N,), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"'{p}': 'y' must have an integer dtype, got {y.dtype}")
    if len(y) != n:
        raise DataError(f"'{p}': 'x' has {n} entries but 'y' has {len(y)}")
    if (y < 0).any():
        raise DataError(f"'{p}': 'y' contains negative labels (min {int(y.min())})")
    num_classes = int(y.max()) + 1
    if "class_names" not in data:
        return y, num_classes, None
    class_names = [str(s) for s in np.asarray(data["class_names"]).reshape(-1)]
    if len(class_names) < num_classes:
        raise DataError(f"'{p}': {len(class_names)} class_names but labels go up to {num_classes - 1}")
    return y, len(class_names), class_names


def _npz_theta(data: dict[str, np.ndarray], p: Path, n: int) -> np.ndarray:
    """Validate ``data["theta"]``; return it as float32 ``(N, K)``."""
    y = data["theta"]
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(f"'{p}': 'theta' must be numeric, got dtype {y.dtype}")
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise DataError(f"'{p}': 'theta' must have shape (N, K) or (N,), got shape {y.shape}")
    if len(y) != n:
        raise DataError(f"'{p}': 'x' has {n} entries but 'theta' has {len(y)}")
    y = y.astype(np.float32)
    _check_finite(y, "theta", p)
    return y


def _normalize(x: np.ndarray, normalize: str, is_int: bool, p: Path) -> np.ndarray:
    """Apply the ``normalize`` mode to ``x`` (see :func:`load_npz`); warns on unscaled integer data."""
    if normalize == "none" and is_int:
        warnings.warn(
            f"'{p}': integer 'x' is kept unscaled (normalize='none'); pass normalize='uint8' to map [0, 255] to [-1, 1]",
            UserWarning,
            stacklevel=3,  # the caller of load_npz
        )
    elif normalize == "uint8":
        x = x / 127.5 - 1.0
    elif normalize == "minmax":
        lo, hi = float(x.min()), float(x.max())
        if hi <= lo:
            raise DataError(f"'{p}': normalize='minmax' needs non-constant 'x' (all values are {lo})")
        x = (x - lo) / (hi - lo) * 2.0 - 1.0
    return x


def load_npz(
    path: str | os.PathLike,
    *,
    normalize: str = "none",
    patch_size: int | None = None,
    seed: int = 0,
) -> ArrayDataset:
    """Load an ``.npz`` archive into an :class:`ArrayDataset` (see module docstring for keys).

    Args:
        path: the ``.npz`` file.
        normalize: ``"none"`` (default: keep values), ``"uint8"`` (``x / 127.5 - 1``)
            or ``"minmax"`` (global min/max -> [-1, 1]).
        patch_size: if given, both image sides must be multiples of it.
        seed: base seed of the batch permutations.

    Returns:
        ArrayDataset with ``x`` float32 ``(N, H, W, C)`` and ``condition`` ``"class"``
        (``y`` int32 ``(N,)``, ``num_classes = max(y) + 1`` or ``len(class_names)``),
        ``"theta"`` (``y`` float32 ``(N, K)``) or ``"none"``; ``name`` is the file stem.

    Raises:
        DataError: unreadable file, missing ``x``, wrong ranks / dtypes, empty data,
            NaN/inf, length mismatch, both ``y`` and ``theta``, negative labels,
            sides not divisible by ``patch_size``.
    """
    p = Path(path)
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    data = _read_npz(p)
    x, is_int = _npz_images(data, p, patch_size)
    if "y" in data and "theta" in data:
        raise DataError(f"'{p}' contains both 'y' (class labels) and 'theta' (parameters); keep only one")
    y, condition, num_classes, class_names = None, "none", None, None
    if "y" in data:
        y, num_classes, class_names = _npz_labels(data, p, x.shape[0])
        condition = "class"
    elif "theta" in data:
        y = _npz_theta(data, p, x.shape[0])
        condition = "theta"
    x = _normalize(x, normalize, is_int, p)
    return ArrayDataset(
        x.astype(np.float32),
        y,
        name=p.stem,
        condition=condition,
        num_classes=num_classes,
        class_names=class_names,
        seed=seed,
    )

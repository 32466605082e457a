"""Random-access record sources for streaming (grain ``RandomAccessDataSource``s).

A source holds only an index (file names, offsets, labels) in memory and reads
one record per ``source[i]``: ``{"image": bytes | np.ndarray, "y": int | np.ndarray,
"name": str}``.  ``"image"`` is encoded image bytes for the image layouts (decoded
later, in the loader's threads or worker processes) and a float32 ``(H, W, C)``
array for ``.npz`` data.  ``"y"`` is absent for unconditional data; ``"name"``
names the record in error messages.

Layouts
    * :class:`ImageFolderSource`: ``root/<class>/*.png|jpg|...`` (sorted class
      names -> labels ``0 .. K-1``) or ``root/*.png|...`` (unconditional), the
      conventions and errors of :func:`pixeldit.data.files.load_image_folder`.
    * :class:`ReferenceH5Source`: the reference's prepared ImageNet directory
      (``images.h5`` holding one PNG-bytes dataset per key and ``dataset.json``
      with ``{"labels": [[key, class], ...]}``; ``images_h5.json`` listing the
      keys), as read by the reference's ``CustomINH5Dataset`` (c2i/src/data.py).
    * :class:`ParquetSource`: ImageNet-1K parquet shards as on the Hugging Face
      hub (``image`` struct column with ``bytes``, integer ``label`` column).
    * :class:`NpzSource`: a ``.npz`` archive, loaded as
      :func:`pixeldit.data.files.load_npz` does.

File handles (HDF5, parquet) are opened lazily in the process that reads, so a
source can be pickled into grain's worker processes.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..base import DataError
from ..files import IMAGE_EXTENSIONS, load_npz

_EXTS = ", ".join(IMAGE_EXTENSIONS)


def _optional(module: str, what: str):
    """Import an optional dependency of the extra ``imagenet`` with an install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"reading {what} needs {module.split('.')[0]}: pip install 'pixeldit[imagenet]'") from exc


def _image_entries(folder: Path) -> list[str]:
    """Sorted names of the visible image files in ``folder`` (one ``scandir``, no per-file stat)."""
    with os.scandir(folder) as it:
        return sorted(
            e.name
            for e in it
            if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file()
        )


def scan_image_folder(root: Path) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    """Return ``(relative paths, int32 labels or None, class names or None)`` of an image folder.

    Raises :class:`DataError` for the layouts :func:`~pixeldit.data.files.load_image_folder`
    rejects: missing or empty folder, empty class folder, loose images next to class folders.
    """
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist or is not a directory")
    with os.scandir(root) as it:
        subdirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    loose = _image_entries(root)
    if not subdirs:
        if not loose:
            raise DataError(f"image folder '{root}' is empty: it contains no images (extensions {_EXTS})")
        return loose, None, None
    if loose:
        raise DataError(
            f"image folder '{root}' mixes class subfolders ({', '.join(subdirs)}) with loose "
            f"images such as '{root / loose[0]}'; use either one subfolder per class or images only"
        )
    files: list[str] = []
    labels: list[np.ndarray] = []
    for label, d in enumerate(subdirs):
        imgs = _image_entries(root / d)
        if not imgs:
            raise DataError(f"class folder '{root / d}' is empty: it contains no images (extensions {_EXTS})")
        files.extend(f"{d}/{f}" for f in imgs)
        labels.append(np.full(len(imgs), label, dtype=np.int32))
    return files, np.concatenate(labels), subdirs


class _Source:
    """Common metadata of the sources: ``name``, ``condition``, ``num_classes``, ``class_names``."""

    encoded = True  # records hold encoded image bytes (False: float32 arrays)
    name: str
    condition: str
    num_classes: int | None = None
    class_names: list[str] | None = None
    theta_dim: int | None = None

    def _set_labels(self, labels: np.ndarray | None, num_classes: int | None = None) -> None:
        self._labels = labels
        if labels is None:
            self.condition = "none"
            return
        self.condition = "class"
        self.num_classes = int(num_classes if num_classes is not None else int(labels.max()) + 1)

    def _record(self, index: int, image: Any, name: str) -> dict[str, Any]:
        rec = {"image": image, "name": name}
        if self._labels is not None:
            rec["y"] = self._labels[index]
        return rec


class ImageFolderSource(_Source):
    """Lazily read image folder (see the module docstring); relative paths are kept as bytes."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        files, labels, class_names = scan_image_folder(self.root)
        # fixed-width bytes: about 40 B per file instead of ~200 B for a list of str
        self._files = np.array([os.fsencode(f) for f in files])
        self.name = self.root.resolve().name
        self.class_names = class_names
        self._set_labels(labels, None if class_names is None else len(class_names))

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.root / os.fsdecode(self._files[index])
        try:
            data = path.read_bytes()
        except OSError as exc:
            data = exc  # reported by the decoder under the corrupt-record policy
        return self._record(index, data, str(path))


class ReferenceH5Source(_Source):
    """The reference's ``images.h5`` + ``images_h5.json`` layout (see the module docstring).

    Keys are the sorted image keys of ``images_h5.json`` (a JSON list, or an object whose
    keys are the names); labels come from ``dataset.json`` stored inside ``images.h5``
    (``"labels": null`` or no ``dataset.json`` -> unconditional).
    """

    def __init__(self, root: str | os.PathLike, *, num_classes: int | None = None) -> None:
        h5py = _optional("h5py", "the reference's images.h5")
        self.root = Path(root)
        self.h5_path = self.root / "images.h5"
        index_path = self.root / "images_h5.json"
        for p in (self.h5_path, index_path):
            if not p.is_file():
                raise DataError(f"reference dataset folder '{self.root}' has no '{p.name}' (expected images.h5 and images_h5.json)")
        try:
            keys = json.loads(index_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read '{index_path}': {type(exc).__name__}: {exc}") from exc
        self._keys = np.array(sorted(k.encode() for k in keys if os.path.splitext(k)[1].lower() in IMAGE_EXTENSIONS))
        if len(self._keys) == 0:
            raise DataError(f"'{index_path}' lists no image keys (extensions {_EXTS})")
        with h5py.File(self.h5_path, "r") as h5:
            labels = None
            if "dataset.json" in h5:
                labels = json.loads(np.asarray(h5["dataset.json"]).tobytes().decode("utf-8")).get("labels")
        self.name = self.root.resolve().name
        self._set_labels(self._label_array(labels), num_classes)
        self._h5 = None
        self._lock = threading.Lock()

    def _label_array(self, labels: list | None) -> np.ndarray | None:
        if labels is None:
            return None
        table = {str(k).replace("\\", "/"): v for k, v in labels}  # the reference normalises '\\' too
        keys = [k.decode() for k in self._keys]
        missing = [k for k in keys if k not in table]
        if missing:
            raise DataError(f"'{self.h5_path}': dataset.json has no label for '{missing[0]}' ({len(missing)} keys without labels)")
        out = np.array([table[k] for k in keys], dtype=np.int64)
        if out.ndim != 1 or (out < 0).any():
            raise DataError(f"'{self.h5_path}': dataset.json labels must be class indices >= 0")
        return out.astype(np.int32)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__, _h5=None)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self._keys[index].decode()
        with self._lock:  # h5py serialises access anyway; the lock guards the lazy open
            if self._h5 is None:
                self._h5 = _optional("h5py", "the reference's images.h5").File(self.h5_path, "r")
            try:
                # stored as a numpy 'S' scalar (reference) or a uint8 array: both give the raw bytes
                data = np.asarray(self._h5[key]).tobytes()
            except (KeyError, OSError) as exc:
                data = exc
        return self._record(index, data, f"{self.h5_path}:{key}")


class ParquetSource(_Source):
    """ImageNet-1K parquet shards: ``image.bytes`` (struct column) or a binary ``image`` column, ``label``.

    Random access reads the record's whole row group (kept in a small per-process cache),
    so a globally shuffled stream from parquet reads about one row group per image:
    write shards with small row groups, or use an image folder / ``images.h5``, for speed.
    """

    _CACHE = 4  # row groups kept per process

    def __init__(self, path: str | os.PathLike, *, num_classes: int | None = None) -> None:
        pq = _optional("pyarrow.parquet", "parquet shards")
        path = Path(path)
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise DataError(f"'{path}' is not a parquet file or a folder holding *.parquet shards")
        self.files = [str(f) for f in files]
        rows, labels = [], []
        for i, f in enumerate(files):
            try:
                meta = pq.ParquetFile(f)
                names = meta.schema_arrow.names
                if "image" not in names:
                    raise DataError(f"parquet shard '{f}' has no 'image' column (columns: {names})")
                if "label" in names:
                    labels.append(pq.read_table(f, columns=["label"]).column("label").to_numpy())
                sizes = [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
            except (OSError, ValueError) as exc:
                if isinstance(exc, DataError):
                    raise
                raise DataError(f"cannot read parquet shard '{f}': {type(exc).__name__}: {exc}") from exc
            for g, n in enumerate(sizes):
                rows.append(np.stack([np.full(n, i), np.full(n, g), np.arange(n)], axis=1))
        if labels and len(labels) != len(files):
            raise DataError(f"'{path}': some parquet shards have a 'label' column and some do not")
        self._rows = np.concatenate(rows).astype(np.int32)  # (N, 3): file, row group, row
        self.name = path.stem if path.is_file() else path.resolve().name
        self._set_labels(np.concatenate(labels).astype(np.int32) if labels else None, num_classes)
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__, _cache=OrderedDict())
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def _row_group(self, f: int, g: int) -> list:
        pq = _optional("pyarrow.parquet", "parquet shards")
        with self._lock:
            col = self._cache.get((f, g))
            if col is not None:
                self._cache.move_to_end((f, g))
                return col
        col = pq.ParquetFile(self.files[f]).read_row_group(g, columns=["image"]).column("image").to_pylist()
        with self._lock:
            self._cache[(f, g)] = col
            while len(self._cache) > self._CACHE:
                self._cache.popitem(last=False)
        return col

    def __getitem__(self, index: int) -> dict[str, Any]:
        f, g, r = (int(v) for v in self._rows[index])
        name = f"{self.files[f]}: row group {g}, row {r}"
        try:
            cell = self._row_group(f, g)[r]
            if isinstance(cell, dict):  # the hub layout: {"bytes": ..., "path": original file name}
                name = f"{name} ({cell.get('path')})" if cell.get("path") else name
                cell = cell["bytes"]
            data = cell
        except (OSError, ValueError, KeyError) as exc:
            data = exc
        return self._record(index, data, name)


class NpzSource(_Source):
    """A ``.npz`` archive held in memory, records are float32 ``(H, W, C)`` arrays (see ``load_npz``)."""

    encoded = False

    def __init__(self, path: str | os.PathLike, *, normalize: str = "none") -> None:
        data = load_npz(path, normalize=normalize)
        self.x, y = data.arrays()
        self.name = data.name
        self.class_names = data.class_names
        self._labels = y
        self.condition = data.condition
        self.num_classes = data.num_classes
        self.theta_dim = data.theta_dim
        self.path = str(path)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._record(index, self.x[index], f"{self.path}[{index}]")


def open_source(path: str | os.PathLike, **options) -> _Source:
    """Pick the source for ``path``: ``.npz`` file, ``.parquet`` file or folder of shards,
    reference folder (``images.h5`` + ``images_h5.json``), else an image folder."""
    p = Path(path)
    if p.suffix.lower() == ".npz":
        return NpzSource(p, **options)
    if p.suffix.lower() == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))):
        return ParquetSource(p, **options)
    if (p / "images.h5").is_file():
        return ReferenceH5Source(p, **options)
    if options:
        raise ValueError(f"image folder '{p}' takes no options, got {sorted(options)}")
    return ImageFolderSource(p)

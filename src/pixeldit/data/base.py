"""Shared dataset protocol, error type and the finite in-memory dataset.

Conventions used across :mod:`pixeldit.data`:

* Images are channel-last ``float32`` arrays of shape ``(N, H, W, C)``.  Image
  datasets (digits, image folders) are scaled to ``[-1, 1]``; Gaussian random
  fields (``grf``) and ``.npz`` data loaded with ``normalize="none"`` keep their
  physical values.
* Every dataset exposes ``name``, ``image_shape`` ``(H, W, C)``, ``condition``
  (one of ``"class"``, ``"theta"``, ``"none"``), ``num_classes`` (``int`` or
  ``None``), ``theta_dim`` (``int`` or ``None``) and a deterministic
  ``get_batch(step, batch_size) -> dict``.
* ``get_batch`` returns ``{"x": float32 (B, H, W, C)}`` plus ``"y"``: ``int32``
  ``(B,)`` class labels when ``condition == "class"`` or ``float32`` ``(B, K)``
  parameters when ``condition == "theta"``.  For ``condition == "none"`` the
  ``"y"`` key is absent.
* The batch for a given ``(seed, step, batch_size)`` is identical every time it
  is requested, so a trainer that only stores ``step`` reproduces the stream on
  resume.  Finite datasets walk through epoch-wise permutations drawn from
  ``numpy.random.default_rng(SeedSequence([seed, epoch]))``; the global sample
  positions of step ``s`` are ``s * batch_size + arange(batch_size)`` and may
  span an epoch boundary.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol, runtime_checkable

import numpy as np

CONDITIONS = ("class", "theta", "none")


class DataError(ValueError):
    """Invalid or unreadable user data.  The message names the offending file."""


@runtime_checkable
class Dataset(Protocol):
    """Structural type every dataset in :mod:`pixeldit.data` satisfies."""

    name: str
    image_shape: tuple[int, int, int]
    condition: str
    num_classes: int | None
    theta_dim: int | None

    def get_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """Return the deterministic batch number ``step`` of size ``batch_size``."""
        ...


def make_rng(*entropy: int) -> np.random.Generator:
    """Return ``numpy.random.default_rng(SeedSequence(list(entropy)))``.

    All seeds must be non-negative integers (NumPy's SeedSequence requirement).
    """
    ints = [int(e) for e in entropy]
    if any(e < 0 for e in ints):
        raise ValueError(f"seeds and steps must be non-negative integers, got {ints}")
    return np.random.default_rng(np.random.SeedSequence(ints))


def check_step_batch(step: int, batch_size: int) -> tuple[int, int]:
    """Validate and return ``(step, batch_size)`` as Python ints."""
    step, batch_size = int(step), int(batch_size)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return step, batch_size


def check_patch_size(image_shape: tuple[int, ...], patch_size: int | None, where: str) -> None:
    """Raise :class:`DataError` unless both spatial sides are multiples of ``patch_size``.

    ``where`` names the file / dataset that is reported in the message.
    """
    if patch_size is None:
        return
    p = int(patch_size)
    if p < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    h, w = int(image_shape[0]), int(image_shape[1])
    if h % p or w % p:
        raise DataError(
            f"{where}: image size {h}x{w} (HxW) is not divisible by patch_size={p}; "
            f"both sides must be multiples of {p}"
        )


def dataset_metadata(ds) -> dict[str, Any]:
    """The JSON-serialisable description every finite dataset records: name, shapes, conditioning, size, seed.

    ``ds`` needs the :class:`Dataset` attributes plus ``class_names``, ``seed`` and ``len(ds)``.
    """
    return {
        "name": ds.name,
        "image_shape": list(ds.image_shape),
        "condition": ds.condition,
        "num_classes": ds.num_classes,
        "theta_dim": ds.theta_dim,
        "class_names": ds.class_names,
        "size": len(ds),
        "seed": ds.seed,
    }


class ArrayDataset:
    """A finite dataset held in memory, batched by seeded epoch-wise permutations.

    Args:
        x: float32 images ``(N, H, W, C)``.
        y: ``int32`` labels ``(N,)`` (``condition="class"``), ``float32`` parameters
            ``(N, K)`` (``condition="theta"``) or ``None`` (``condition="none"``).
        name: dataset name (used in logs / checkpoints).
        condition: ``"class"``, ``"theta"`` or ``"none"``.
        num_classes: number of classes for ``"class"`` data.
        class_names: optional list of class names (index = label).
        seed: base seed of the permutation stream.

    ``get_batch(step, B)`` returns ``{"x": x[idx], "y": y[idx]}`` with
    ``idx = perm(seed, epoch)[pos % N]`` for the global positions
    ``pos = step * B + arange(B)`` and ``epoch = pos // N``.
    """

    _PERM_CACHE_SIZE = 4

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray | None = None,
        *,
        name: str,
        condition: str,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise DataError(f"{name}: images must have shape (N, H, W, C), got {x.shape}")
        if x.shape[0] == 0:
            raise DataError(f"{name}: dataset is empty")
        if condition == "none":
            if y is not None:
                raise ValueError("condition='none' takes no y")
        elif y is None:
            raise ValueError(f"condition={condition!r} requires y")
        elif condition == "class":
            y = np.ascontiguousarray(y, dtype=np.int32)
            if num_classes is None:
                num_classes = int(y.max()) + 1
        else:
            y = np.ascontiguousarray(y, dtype=np.float32)
            if y.ndim == 1:
                y = y[:, None]
        if y is not None and len(y) != len(x):
            raise DataError(f"{name}: {len(x)} images but {len(y)} labels")
        self.x = x
        self.y = y
        self.name = str(name)
        self.condition = condition
        self.num_classes = int(num_classes) if condition == "class" else None
        self.theta_dim = int(y.shape[1]) if condition == "theta" else None
        self.class_names = list(class_names) if class_names is not None else None
        self.image_shape = tuple(int(s) for s in x.shape[1:])
        self.seed = int(seed)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Return the full data ``(x, y)``: ``x`` float32 ``(N, H, W, C)``, ``y`` labels/theta or ``None``."""
        return self.x, self.y

    def permutation(self, epoch: int) -> np.ndarray:
        """Return the (cached) permutation of ``range(N)`` used in ``epoch``."""
        epoch = int(epoch)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = make_rng(self.seed, epoch).permutation(len(self))
            self._perms[epoch] = perm
            while len(self._perms) > self._PERM_CACHE_SIZE:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(epoch)
        return perm

    def batch_indices(self, step: int, batch_size: int) -> np.ndarray:
        """Return the dataset indices ``(batch_size,)`` of batch ``step``."""
        step, batch_size = check_step_batch(step, batch_size)
        n = len(self)
        pos = step * batch_size + np.arange(batch_size, dtype=np.int64)
        epochs = pos // n
        out = np.empty(batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[pos[sel] % n]
        return out

    def get_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """Return ``{"x": float32 (B,H,W,C)[, "y": int32 (B,) | float32 (B,K)]}`` for ``step``."""
        idx = self.batch_indices(step, batch_size)
        batch = {"x": self.x[idx]}
        if self.y is not None:
            batch["y"] = self.y[idx]
        return batch

    def metadata(self) -> dict[str, Any]:
        """Return a JSON-serialisable description (name, shapes, conditioning)."""
        return dataset_metadata(self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
            f"condition={self.condition!r}, num_classes={self.num_classes}, theta_dim={self.theta_dim})"
        )

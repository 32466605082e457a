"""Datasets for pixeldit (numpy only; no JAX import).

Every dataset has ``name``, ``image_shape`` ``(H, W, C)``, ``condition``
(``"class"`` / ``"theta"`` / ``"none"``), ``num_classes``, ``theta_dim``,
``metadata()`` and a deterministic ``get_batch(step, batch_size) -> dict`` with
``"x"`` float32 ``(B, H, W, C)`` and ``"y"`` (int32 ``(B,)`` labels or float32
``(B, K)`` theta; absent for ``"none"``).  See :mod:`pixeldit.data.base` for the
seeding convention.

Use :func:`load_dataset` to build one from a name or a path.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import ArrayDataset, DataError, Dataset, make_rng
from .digits import DigitsDataset, load_digits_arrays
from .files import load_image_folder, load_npz
from .grf import (
    PRIOR_HIGH,
    PRIOR_LOW,
    THETA_NAMES,
    GRFDataset,
    expected_power_spectrum,
    grf_log_likelihood,
    power_spectrum,
    radial_power_spectrum,
    sample_prior,
    simulate,
    whitened_chi2,
)

__all__ = [
    "ArrayDataset",
    "DataError",
    "Dataset",
    "DigitsDataset",
    "GRFDataset",
    "PRIOR_HIGH",
    "PRIOR_LOW",
    "THETA_NAMES",
    "expected_power_spectrum",
    "grf_log_likelihood",
    "load_dataset",
    "load_digits_arrays",
    "load_image_folder",
    "load_npz",
    "make_rng",
    "power_spectrum",
    "radial_power_spectrum",
    "sample_prior",
    "simulate",
    "whitened_chi2",
]


def _alias(options: dict, alias: str, canonical: str, name: str) -> None:
    if alias in options:
        if canonical in options and options[canonical] != options[alias]:
            raise ValueError(f"{name}: give either {canonical} or {alias}, not both")
        options[canonical] = options.pop(alias)


def load_dataset(name_or_path: str | os.PathLike, **options) -> Dataset:
    """Build a dataset from a built-in name or a path.

    * ``"digits"`` -> :class:`DigitsDataset` (options ``resolution=16`` (alias ``size``), ``upsample``, ``seed``, ``patch_size``);
    * ``"grf"`` -> :class:`GRFDataset` (options ``size=32`` (alias ``resolution``), ``seed``,
      ``prior_low``, ``prior_high``, ``patch_size``);
    * a path ending in ``.npz`` -> :func:`load_npz` (options ``normalize="none"``, ``patch_size``, ``seed``);
    * a directory -> :func:`load_image_folder` (options ``channels``, ``patch_size``, ``seed``).

    Options set to ``None`` are dropped (so CLI defaults can be passed through).
    Raises :class:`DataError` for an unknown name or a path that does not exist.
    """
    options = {k: v for k, v in options.items() if v is not None}
    key = str(name_or_path)
    if key == "digits":
        _alias(options, "size", "resolution", key)
        return DigitsDataset(**options)
    if key == "grf":
        _alias(options, "resolution", "size", key)
        return GRFDataset(**options)
    path = Path(name_or_path)
    if path.suffix.lower() == ".npz":
        return load_npz(path, **options)
    if path.is_dir():
        return load_image_folder(path, **options)
    raise DataError(
        f"unknown dataset '{key}': expected 'digits', 'grf', a .npz file or an image folder "
        f"(path exists: {path.exists()})"
    )

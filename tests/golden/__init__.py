"""The reference's golden outputs kept beside this module (see README.md here); fails loudly if a file is absent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parent
MAX_ABS = 1e-4  # parity tolerance: max abs error ...
MAX_REL_L2 = 1e-5  # ... and relative L2 error


def load(name: str):
    """``(config, npz)`` of a golden file; raises (never skips) when the folder or file is missing."""
    path = GOLDEN_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"golden reference data {path} is missing: expected the .npz files committed in tests/golden/"
        )
    data = np.load(path)
    return json.loads(str(data["config"])), data


def state_dict(data, prefix: str = "sd/") -> dict[str, np.ndarray]:
    return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}


def nchw_to_nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def assert_close(actual, expected, *, max_abs=MAX_ABS, max_rel_l2=MAX_REL_L2):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != reference {expected.shape}"
    err = np.abs(actual - expected).max()
    rel = np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)
    assert err <= max_abs and rel <= max_rel_l2, f"max abs err {err:.3e} (<= {max_abs}), rel L2 {rel:.3e} (<= {max_rel_l2})"

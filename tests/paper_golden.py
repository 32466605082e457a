"""Golden files of ``tests/golden/`` (written by ``scripts/golden/make_paper_golden.py``); missing ones fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def load(name: str) -> tuple[dict, np.lib.npyio.NpzFile]:
    """``(config, arrays)`` of a golden file; raises (never skips) when it is missing."""
    path = GOLDEN_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"golden file {path} is missing: run scripts/golden/make_paper_golden.py")
    data = np.load(path)
    return json.loads(str(data["config"])), data

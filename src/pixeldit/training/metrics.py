"""The metrics file of a run: ``workdir/metrics.jsonl``, one JSON object per logged step."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

__all__ = ["METRICS_FILE", "append_metrics", "atomic_write_text", "move_metrics_aside", "read_metrics",
           "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Metrics history of a run: the records of ``workdir/metrics.jsonl`` in order."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # torn last line of a killed run
                    continue
    return out


def append_metrics(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record to ``workdir/metrics.jsonl``."""
    with open(Path(workdir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(dict(record)) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a torn file)."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def truncate_metrics(workdir: str | os.PathLike, step: int) -> None:
    """Drop metric records after ``step`` (steps trained but never checkpointed)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return
    records = read_metrics(workdir)
    kept = [r for r in records if int(r.get("step", 0)) <= step]
    if len(kept) != len(records) or path.read_text().count("\n") != len(records):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def move_metrics_aside(workdir: str | os.PathLike) -> Path | None:
    """A fresh start in a workdir without checkpoints: keep an old ``metrics.jsonl`` (of a run
    stopped before its first checkpoint) as ``metrics-<date>-<time>.jsonl``; returns its new path."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return None
    dest = path.with_name(f"metrics-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    n = 1
    while dest.exists():
        dest, n = path.with_name(f"metrics-{time.strftime('%Y%m%d-%H%M%S')}-{n}.jsonl"), n + 1
    os.replace(path, dest)
    return dest

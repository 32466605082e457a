"""One training process per run directory: the workdir lock.

``train`` holds an exclusive lock on ``workdir/train.lock`` (``filelock``: an OS file lock, which
the kernel releases when the holder dies, so the lock of a killed run is taken over by the next
one without any clean-up).  ``workdir/train.lock.owner`` records the holder's PID and host so
that a refused run can name them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

import filelock

__all__ = ["LOCK_FILE", "WorkdirLockedError", "workdir_lock"]

LOCK_FILE = "train.lock"
OWNER_FILE = "train.lock.owner"
_HELD: dict[str, int] = {}  # workdirs whose lock this process holds -> nesting depth


class WorkdirLockedError(RuntimeError):
    """Another process is training in this workdir."""


def _holder(workdir: Path) -> str:
    try:
        owner = json.loads((workdir / OWNER_FILE).read_text())
        return f"PID {owner['pid']} on host {owner['host']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not recorded its PID yet"


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Hold the training lock of ``workdir`` (created if missing) for the ``with`` block.

    Raises :class:`WorkdirLockedError`, naming the holder's PID and host, when another process
    holds it.  Nested use in one process is allowed (``pixeldit.runs.train_run`` holds it around
    :func:`pixeldit.training.train`, which takes it too).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    key = str(workdir.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock = filelock.FileLock(workdir / LOCK_FILE, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise WorkdirLockedError(
            f"workdir '{workdir}' is in use by another training run ({_holder(workdir)}); "
            "wait for it to finish or stop it, or use another --workdir"
        ) from None
    owner = workdir / OWNER_FILE
    try:
        owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        _HELD[key] = 1
        yield
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()

"""Reading the newest checkpoint that can be read: a damaged one is reported in one line and skipped.

A checkpoint can be damaged after it was committed (a full disk while copying a run, a file
truncated or zeroed by a crashed file system).  Orbax then raises from deep inside tensorstore
with a message of many lines; :func:`newest_readable` turns that into one warning line naming the
step and the cause, and tries the next older step.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["DAMAGED_SUBDIR", "move_aside", "newest_readable"]

DAMAGED_SUBDIR = "damaged_checkpoints"  # where train moves unreadable checkpoints (kept for inspection)

log = logging.getLogger(__name__)


def _cause(e: BaseException) -> str:
    """One line for an exception raised while reading a checkpoint.

    Orbax wraps tensorstore's error, whose message runs from the outer driver ("Error opening
    "cast" driver: ...") down to the failing file and check at its end: the innermost exception's
    first line is taken, without the spec tensorstore appends, shortened from the front.
    """
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = re.split(r"\s*\[(?:source locations|tensorstore_spec)", lines[0] if lines else "")[0]
    text = text if len(text) <= 240 else "..." + text[-240:]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _OrphanedReads(logging.Filter):
    """Drops asyncio's "exception was never retrieved" records (installed once a read failed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in str(record.msg)


def _orphaned_unraisable(hook):
    def unraisable(info):
        if "orbax" not in repr(getattr(info, "object", "")) and "Event loop is closed" not in str(info.exc_value):
            hook(info)
    unraisable.wrapped = True
    return unraisable


@contextlib.contextmanager
def _swallow_leftovers():
    """When a restore fails, orbax leaves the reads of the other arrays pending: when they are
    collected, Python prints "Exception ignored in <coroutine>" tracebacks, asyncio logs "exception
    was never retrieved" and tensorstore's callbacks print "Event loop is closed".  After a failure
    (only then) those reports are muted for the rest of the process, and the leftovers collected
    now; :func:`newest_intact` reports the failure in one line."""
    try:
        yield
    except Exception:
        aio = logging.getLogger("asyncio")
        if not any(isinstance(f, _OrphanedReads) for f in aio.filters):
            aio.addFilter(_OrphanedReads())
        if not getattr(sys.unraisablehook, "wrapped", False):
            sys.unraisablehook = _orphaned_unraisable(sys.unraisablehook)
        hook, sys.excepthook = sys.excepthook, (lambda *a: None)  # tensorstore's callback threads
        try:
            time.sleep(0.2)  # the reads still in flight fail in tensorstore's threads meanwhile
            gc.collect()
        finally:
            sys.excepthook = hook
        raise


def newest_readable(directory: Path, steps: Iterable[int], read: Callable[[int], Any], step: int | None = None, *,
                    then: str = "using an older one", passthrough: tuple[type[BaseException], ...] = (),
                    warn: bool = True) -> tuple[int, Any]:
    """``(step, read(step))`` for the newest checkpoint that ``read`` can read.

    With an explicit ``step`` only that one is read (and its error raised).  Otherwise each step
    is tried from the newest down; one that fails is reported in one warning line naming the step
    and the cause (followed by ``then``; at debug level unless ``warn``), and the next older one is tried.  ``FileNotFoundError`` when there is none, or
    a ``ValueError`` naming every step's cause when none can be read.
    """
    steps = sorted(steps, reverse=True)
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; available: {sorted(steps)}")
        try:
            return step, read(step)
        except Exception as e:  # noqa: BLE001 - an explicit step that cannot be read: one line, not orbax's traceback
            raise ValueError(f"checkpoint {directory / str(step)} cannot be read ({_cause(e)})") from e
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {directory}")
    causes = []
    for s in steps:
        try:
            with _swallow_leftovers():
                return s, read(s)
        except passthrough:  # e.g. readable, but not this run's: not a damaged checkpoint
            raise
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for a damaged file
            causes.append(f"step {s}: {_cause(e)}")
            (log.warning if warn else log.debug)("checkpoint at step %d is unreadable (%s); %s", s, _cause(e), then)
    raise ValueError(f"no readable checkpoint in {directory}: " + "; ".join(causes))


def move_aside(directory: str | os.PathLike, step: int) -> Path:
    """Move checkpoint ``step`` out of the checkpoint ``directory`` into ``damaged_checkpoints/`` beside
    it (so that a resumed run can write that step again); returns the new path."""
    src = Path(directory) / str(step)
    dest_dir = Path(directory).parent / DAMAGED_SUBDIR
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / str(step)
    n = 1
    while dest.exists():
        dest, n = dest_dir / f"{step}-{n}", n + 1
    os.replace(src, dest)
    return dest

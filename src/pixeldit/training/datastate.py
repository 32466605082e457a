"""The data stream's position in checkpoints, for datasets that can only continue.

In-memory datasets are deterministic in ``(seed, step)``: the step is their position.  A
streaming dataset (:class:`pixeldit.data.stream.StreamBatches`) has ``get_state()`` /
``set_state()`` instead; its state is stored in the checkpoint's ``meta`` as
``"data_state"``, a list with one entry per process (every host reads its own shard, so every
host has its own position), and handed back on resume.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

DATA_STATE_KEY = "data_state"


def stream_of(dataset: Any) -> Any | None:
    """The object with ``get_state`` / ``set_state`` behind ``dataset`` (wrappers keep it as ``.dataset``), or None."""
    while dataset is not None:
        if callable(getattr(dataset, "get_state", None)) and callable(getattr(dataset, "set_state", None)):
            return dataset
        dataset = getattr(dataset, "dataset", None)
    return None


def _allgather_json(value: Any) -> list[Any]:
    """``value`` of every process, in process order (JSON through a padded uint8 all-gather)."""
    data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    if jax.process_count() == 1:
        return [value]
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(row[:n].tobytes()) for row, n in zip(rows, sizes)]


def with_data_state(meta: Mapping[str, Any], dataset: Any) -> dict[str, Any]:
    """``meta`` plus every process's stream position (unchanged for datasets without one).

    A collective on multi-host runs: every process must call it at the same step.
    """
    stream = stream_of(dataset)
    if stream is None:
        return dict(meta)
    return dict(meta, **{DATA_STATE_KEY: _allgather_json(stream.get_state())})


def restore_data_state(dataset: Any, saved_meta: Mapping[str, Any], step: int) -> None:
    """Put a streaming ``dataset`` at the position stored with checkpoint ``step``."""
    stream = stream_of(dataset)
    if stream is None:
        return
    states = saved_meta.get(DATA_STATE_KEY)
    if not states:
        raise ValueError(
            f"checkpoint at step {step} has no data-stream position ('{DATA_STATE_KEY}'), so a streaming run cannot "
            "resume from it with the same batches; resume it with the dataset it was trained on"
        )
    if len(states) != jax.process_count():
        raise ValueError(f"checkpoint at step {step} holds the stream positions of {len(states)} processes, "
                         f"this run has {jax.process_count()}")
    stream.set_state(states[jax.process_index()])

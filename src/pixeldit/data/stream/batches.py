"""A streaming dataset presented to the trainer: ``get_batch(step, batch_size)`` in step order.

The trainer asks for batch ``s`` at step ``s``.  In-memory datasets compute any batch from
``(seed, step)``; a stream can only continue, so :class:`StreamBatches` serves the steps in
order and carries its position in ``get_state()``, which the trainer stores with each
checkpoint and hands back to ``set_state()`` on resume.  On ``shard = (index, count)`` hosts
``get_batch(step, B)`` returns this host's ``B // count`` rows (a process-local batch).
"""

from __future__ import annotations

from typing import Any

from .pipeline import StreamingDataset

STATE_VERSION = 1


class StreamBatches:
    """Step-ordered batches of a :class:`StreamingDataset` with a checkpointable position.

    Args:
        stream: the dataset.
        shard: ``(index, count)`` of this host (:func:`~.pipeline.host_shard` on multi-host runs).
        workers, threads, prefetch: loader options (:meth:`StreamingDataset.pipeline`).
    """

    def __init__(
        self, stream: StreamingDataset, *, shard: tuple[int, int] = (0, 1), workers: int = 0, threads: int = 4, prefetch: int = 64
    ) -> None:
        self.stream = stream
        self.shard = (int(shard[0]), int(shard[1]))
        self.options = {"workers": int(workers), "threads": int(threads), "prefetch": int(prefetch)}
        for attr in ("name", "image_shape", "condition", "num_classes", "theta_dim", "class_names"):
            setattr(self, attr, getattr(stream, attr))
        self._it = None
        self._batch_size: int | None = None
        self._next_step = 0
        self._pending_state: dict | None = None

    def _open(self, batch_size: int) -> None:
        count = self.shard[1]
        if batch_size % count:
            raise ValueError(f"batch size {batch_size} does not split over {count} hosts")
        self._it = self.stream.iterator(batch_size // count, shard=self.shard, **self.options)
        self._batch_size = batch_size
        if self._pending_state is not None:
            self._it.set_state(self._pending_state)
            self._pending_state = None

    @property
    def process_local(self) -> bool:
        """True when this host serves only its own rows of each batch (several hosts)."""
        return self.shard[1] > 1

    def get_batch(self, step: int, batch_size: int) -> dict[str, Any]:
        """This host's rows of batch ``step``; steps must come in order from the stream's position."""
        step, batch_size = int(step), int(batch_size)
        if step != self._next_step:
            raise ValueError(
                f"streaming data is read in order: the stream is at step {self._next_step} but step {step} was "
                f"asked for; resume from a checkpoint that stored the stream's state (set_state)"
            )
        if self._batch_size is not None and batch_size != self._batch_size:
            raise ValueError(f"batch size changed from {self._batch_size} to {batch_size} within one stream")
        if self._it is None:
            self._open(batch_size)
        batch = next(self._it)
        self._next_step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next step and grain's iterator state."""
        iterator = self._it.get_state() if self._it is not None else self._pending_state
        return {
            "version": STATE_VERSION,
            "step": self._next_step,
            "batch_size": self._batch_size,
            "seed": self.stream.seed,
            "shard": list(self.shard),
            "iterator": iterator,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`get_state` taken by a stream over the same data, seed and shard."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, mine in (("seed", self.stream.seed), ("shard", list(self.shard))):
            if state[key] != mine:
                raise ValueError(f"stream state was saved with {key}={state[key]} but this stream has {key}={mine}")
        self.close()
        self._next_step = int(state["step"])
        self._pending_state = state["iterator"]
        self._batch_size = state["batch_size"]

    def close(self) -> None:
        """Stop the loader's threads and worker processes."""
        if self._it is not None:
            self._it.close()
        self._it = None

    def metadata(self) -> dict[str, Any]:
        return self.stream.metadata()

    def __len__(self) -> int:
        return len(self.stream)

"""The streaming dataset: a record source behind a grain pipeline with a checkpointable iterator.

Pipeline (grain's ``MapDataset`` / ``IterDataset``), per host::

    source[shard_index::shard_count]      # every host reads only its own records
      .seed(seed).shuffle().repeat(epochs) # global shuffle, a new order every epoch
      .map(Decode)                         # decode, ADM crop; corrupt -> stop or skip
      .random_map(random_flip)             # optional, seeded per record
      .to_iter_dataset(threads, prefetch)
      .mp_prefetch(workers)                # optional decoding processes
      .filter(record is not None)          # skipped records are dropped after the workers
      .batch(B, drop_remainder=True)       # in the trainer's process: same batches for any worker count
      .map(to_float)                       # uint8 -> float32 [-1, 1]

The order depends only on ``(seed, shard, batch_size)``.  ``iterator.get_state()`` is a small
JSON-serialisable dict; ``set_state`` on a fresh iterator of the same pipeline resumes exactly.
"""

from __future__ import annotations

import os
from typing import Any

import grain
from absl import flags

from ..base import DataError, check_patch_size, dataset_metadata
from .sources import open_source
from .transforms import ON_CORRUPT, Decode, image_channels, random_flip, to_float

_PROBE = 16  # records tried to find the image shape when on_corrupt="skip"


def _is_record(record: dict | None) -> bool:
    return record is not None


def host_shard() -> tuple[int, int]:
    """``(jax.process_index(), jax.process_count())``: this host's shard of the records."""
    opts = grain.sharding.ShardByJaxProcess()
    return int(opts.shard_index), int(opts.shard_count)


class StreamingDataset:
    """Images read lazily from a record source (see :mod:`pixeldit.data.stream.sources`).

    Args:
        source: a record source (``len`` and ``source[i]``).
        resolution: ADM centre-crop side; ``None`` keeps the stored size (then every
            image must have the size of the first).
        channels: 1 or 3; default from the first image (1 if grayscale, else 3).
        flip: random horizontal flip (the reference's c2i recipe does not flip).
        seed: seed of the shuffle and the flips, in ``[0, 2**32)``.
        on_corrupt: ``"stop"`` (raise :class:`DataError` naming the file) or ``"skip"``
            (warn with the file name and continue).
        patch_size: if given, both image sides must be multiples of it.

    Attributes ``name``, ``image_shape``, ``condition``, ``num_classes``, ``theta_dim``,
    ``class_names`` follow :mod:`pixeldit.data.base`.
    """

    def __init__(
        self,
        source: Any,
        *,
        resolution: int | None = None,
        channels: int | None = None,
        flip: bool = False,
        seed: int = 0,
        on_corrupt: str = "stop",
        patch_size: int | None = None,
    ) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        if channels is not None and int(channels) not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if resolution is not None and int(resolution) < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if not 0 <= int(seed) < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if len(source) == 0:
            raise DataError(f"dataset '{source.name}' is empty")
        self.source = source
        self.resolution = None if resolution is None else int(resolution)
        self.flip = bool(flip)
        self.seed = int(seed)
        self.on_corrupt = on_corrupt
        for attr in ("name", "condition", "num_classes", "theta_dim", "class_names"):
            setattr(self, attr, getattr(source, attr))
        self.image_shape = self._probe(channels)
        check_patch_size(self.image_shape, patch_size, f"dataset '{self.name}'")
        self.decode = Decode(
            resolution=self.resolution, channels=self.image_shape[2], on_corrupt=on_corrupt, size=self.image_shape[:2]
        )

    def _probe(self, channels: int | None) -> tuple[int, int, int]:
        """Shape ``(H, W, C)`` of the output, from the first readable record."""
        for i in range(min(len(self.source), _PROBE if self.on_corrupt == "skip" else 1)):
            rec = self.source[i]
            image = rec["image"]
            if not self.source.encoded:
                if self.resolution is not None or channels is not None:
                    raise ValueError(f"'{self.name}' holds stored arrays: resolution and channels apply to images only")
                return tuple(int(s) for s in image.shape)
            try:
                ch = int(channels) if channels is not None else image_channels(image, rec["name"])
                x = Decode(resolution=self.resolution, channels=ch, on_corrupt="stop").decode(image, rec["name"])
            except DataError:
                if self.on_corrupt == "stop":
                    raise
                continue
            return tuple(int(s) for s in x.shape)
        raise DataError(f"dataset '{self.name}': none of the first {_PROBE} records could be read")

    def __len__(self) -> int:
        return len(self.source)

    def records(self, *, shard: tuple[int, int] = (0, 1), num_epochs: int | None = None) -> grain.MapDataset:
        """Decoded (and flipped) records of ``shard = (index, count)``, shuffled per epoch; ``None`` = skipped."""
        index, count = (int(s) for s in shard)
        if not 0 <= index < count:
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
        if count > len(self.source):
            raise ValueError(f"{count} shards but dataset '{self.name}' has only {len(self.source)} records")
        ds = grain.MapDataset.source(self.source)[index::count]
        ds = ds.seed(self.seed).shuffle().repeat(num_epochs).map(self.decode)
        if self.flip:
            ds = ds.random_map(random_flip)
        return ds

    def pipeline(
        self,
        batch_size: int,
        *,
        shard: tuple[int, int] = (0, 1),
        num_epochs: int | None = None,
        workers: int = 0,
        threads: int = 4,
        prefetch: int = 64,
    ) -> grain.IterDataset:
        """The batched stream ``{"x": float32 (B, H, W, C)[, "y"]}`` of this host's shard.

        Args:
            batch_size: per-host batch size; incomplete last batches are dropped.
            shard: ``(index, count)``; use :func:`host_shard` on multi-host runs.
            num_epochs: ``None`` repeats forever.
            workers: decoding processes (0: decode in this process's threads).
            threads: decoding threads per process.
            prefetch: records read ahead per process.
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(workers) < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        ds = self.records(shard=shard, num_epochs=num_epochs)
        # skipped records stay as None until after the workers, so that the kept records and
        # their order (hence the batches) do not depend on the number of workers
        read = grain.ReadOptions(num_threads=int(threads), prefetch_buffer_size=int(prefetch))
        it = ds.to_iter_dataset(read, allow_nones=True)
        if workers:
            # grain 0.2.18 reads an absl flag at mp_prefetch and fails in programs that never
            # parse absl flags (google/grain#1355); the flags keep their defaults.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(workers)))
        return it.filter(_is_record).batch(int(batch_size), drop_remainder=True).map(to_float)

    def iterator(self, batch_size: int, **options) -> grain.DatasetIterator:
        """``iter(self.pipeline(batch_size, **options))``: batches, with ``get_state`` / ``set_state``."""
        return iter(self.pipeline(batch_size, **options))

    def metadata(self) -> dict[str, Any]:
        """A JSON-serialisable description (name, shapes, conditioning, stream options)."""
        return {
            **dataset_metadata(self),
            "streaming": {"resolution": self.resolution, "flip": self.flip, "on_corrupt": self.on_corrupt},
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
            f"condition={self.condition!r}, num_classes={self.num_classes})"
        )


def open_stream(
    path: str | os.PathLike,
    *,
    resolution: int | None = None,
    channels: int | None = None,
    flip: bool = False,
    seed: int = 0,
    on_corrupt: str = "stop",
    patch_size: int | None = None,
    **source_options,
) -> StreamingDataset:
    """A :class:`StreamingDataset` over ``path`` (source chosen by :func:`~.sources.open_source`).

    ``source_options`` go to the source (``num_classes`` for the reference and parquet
    layouts, ``normalize`` for ``.npz``).
    """
    source = open_source(path, **{k: v for k, v in source_options.items() if v is not None})
    return StreamingDataset(
        source,
        resolution=resolution,
        channels=channels,
        flip=flip,
        seed=seed,
        on_corrupt=on_corrupt,
        patch_size=patch_size,
    )


__all__ = ["StreamingDataset", "host_shard", "open_stream"]

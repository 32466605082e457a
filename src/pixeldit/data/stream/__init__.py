"""Streaming image data with grain: lazy sources, ADM preprocessing, a resumable iterator.

``open_stream(path, resolution=..., seed=...)`` reads an image folder, the reference's
``images.h5`` layout, ImageNet parquet shards or a ``.npz``; ``.iterator(batch_size)``
yields ``{"x": float32 (B, H, W, C) in [-1, 1][, "y"]}`` batches and its
``get_state()`` / ``set_state()`` resume the stream exactly.  See
:mod:`~pixeldit.data.stream.pipeline` for the pipeline and
:mod:`~pixeldit.data.stream.sources` for the layouts.  :class:`StreamBatches` serves the
stream to the trainer (``get_batch(step, batch_size)`` in step order, position in
``get_state()``).
"""

from .batches import StreamBatches
from .pipeline import StreamingDataset, host_shard, open_stream
from .sources import ImageFolderSource, NpzSource, ParquetSource, ReferenceH5Source, open_source, scan_image_folder
from .transforms import ON_CORRUPT, Decode, center_crop_arr

__all__ = [
    "ON_CORRUPT",
    "Decode",
    "ImageFolderSource",
    "NpzSource",
    "ParquetSource",
    "ReferenceH5Source",
    "StreamBatches",
    "StreamingDataset",
    "center_crop_arr",
    "host_shard",
    "open_source",
    "open_stream",
    "scan_image_folder",
]

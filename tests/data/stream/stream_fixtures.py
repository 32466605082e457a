"""Tiny datasets that the streaming tests write themselves (PNG folders, images.h5, parquet)."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def flat_image(i: int, size: int = 8, channels: int = 3) -> np.ndarray:
    """Image ``i``: every pixel ``10 * i + 5``, so a decoded pixel names the image."""
    shape = (size, size, channels) if channels == 3 else (size, size)
    return np.full(shape, 10 * i + 5, np.uint8)


def image_ids(x: np.ndarray) -> list[int]:
    """Invert :func:`flat_image` on a float batch in [-1, 1] ``(B, H, W, C)``."""
    v = np.round((x[:, 0, 0, 0] + 1.0) * 127.5).astype(int)
    return ((v - 5) // 10).tolist()


def class_folder(root, n_per_class=(3, 3), size=8):
    """``root/c<k>/<i>.png`` with images numbered 0.. in class order; returns the labels."""
    labels, i = [], 0
    for k, n in enumerate(n_per_class):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            Image.fromarray(flat_image(i, size)).save(root / f"c{k}" / f"img{i:03d}.png")
            labels.append(k)
            i += 1
    return labels


def reference_h5(root, n=5, size=8):
    """The reference's layout: PNG bytes per key and dataset.json inside images.h5, keys in images_h5.json."""
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    keys = [f"{i // 3:05d}/img{i:08d}.png" for i in range(n)]
    labels = [[k, (7 * i) % 4] for i, k in enumerate(keys)]
    with h5py.File(root / "images.h5", "w") as h5:
        for i, k in enumerate(keys):
            # as the reference's zip_to_hdf5 stores them: a numpy bytes scalar
            h5.create_dataset(k, data=np.array(png_bytes(flat_image(i, size)), dtype="S"))
        h5.create_dataset("dataset.json", data=np.array(json.dumps({"labels": labels}).encode(), dtype="S"))
    # a zip name list: directories and dataset.json appear in it too
    (root / "images_h5.json").write_text(json.dumps(["00000/", "00001/", *keys, "dataset.json"]))
    return [lab for _, lab in labels]


def parquet_shards(root, sizes=(4, 3), row_group=3, size=8):
    """HF imagenet-1k style shards: ``image`` {bytes, path}, ``label``; several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    labels, i = [], 0
    for s, n in enumerate(sizes):
        rows = [{"bytes": png_bytes(flat_image(i + j, size)), "path": f"n0{i + j}.JPEG"} for j in range(n)]
        lab = [(i + j) % 3 for j in range(n)]
        table = pa.table({"image": rows, "label": pa.array(lab, pa.int64())})
        pq.write_table(table, root / f"train-{s:05d}-of-{len(sizes):05d}.parquet", row_group_size=row_group)
        labels += lab
        i += n
    return labels

"""FID of a run's samples and ADM-evaluator exports: the parts of ``pixeldit eval --inception`` and
``pixeldit sample --adm-out`` above :mod:`pixeldit.fid`.

Images enter the FID Inception as the ADM evaluator sees them: model outputs in [-1, 1] rounded
to uint8 (:func:`pixeldit.fid.to_uint8`), then scaled to [0, 1]; grayscale is repeated to RGB.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from pixeldit.fid import (
    cached_statistics,
    completed_batches,
    extract_features,
    feature_statistics,
    frechet_distance,
    merge_batches,
    to_uint8,
    write_batch,
)

__all__ = ["adm_export", "as_uint8_rgb", "batch_seed", "fid_against_data"]


def as_uint8_rgb(x: np.ndarray) -> np.ndarray:
    """Samples ``(N, H, W, C)`` in [-1, 1] (C = 1 or 3) -> uint8 ``(N, H, W, 3)``."""
    x = to_uint8(x)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _batches01(images: np.ndarray, batch_size: int):
    for i in range(0, len(images), batch_size):
        yield as_uint8_rgb(images[i:i + batch_size]).astype(np.float32) / 255.0


def fid_against_data(samples: np.ndarray, real: np.ndarray, inception: Callable, *,
                     stats_cache: str | os.PathLike | None, fingerprint: Mapping[str, Any],
                     batch_size: int = 50) -> dict[str, Any]:
    """FID of ``samples`` against ``real`` (both ``(N, H, W, C)`` in [-1, 1]) with the FID Inception
    (:func:`pixeldit.fid.load_fid_inception`); the real statistics are cached in ``stats_cache``
    under ``fingerprint`` (name the data and the weights file in it)."""
    fingerprint = dict(fingerprint, num_real=len(real))

    def real_features():
        return extract_features(inception, _batches01(real, batch_size), batch_size=batch_size)

    if stats_cache is None:
        mu_r, sigma_r = feature_statistics(real_features())
    else:
        mu_r, sigma_r = cached_statistics(stats_cache, fingerprint, real_features)
    mu_s, sigma_s = feature_statistics(extract_features(inception, _batches01(samples, batch_size), batch_size=batch_size))
    return {"fid": frechet_distance(mu_s, sigma_s, mu_r, sigma_r), "fid_num_samples": len(samples),
            "fid_num_real": len(real), "fid_stats": None if stats_cache is None else str(stats_cache)}


def batch_seed(seed: int, index: int) -> int:
    """The noise seed of ADM batch ``index``: fixed by ``(seed, index)``, so a resumed export draws the same images."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] % 2**31)


def _sync_processes() -> None:
    """Wait until every JAX process has reached this point (all batch files written)."""
    from jax.experimental import multihost_utils  # noqa: PLC0415 (multi-host runs only)

    multihost_utils.sync_global_devices("pixeldit_adm_export")


def adm_export(draw: Callable[[np.ndarray, np.ndarray, int], np.ndarray], y: np.ndarray, y_null: np.ndarray,
               out_dir: str | os.PathLike, *, batch_size: int, seed: int, labels: bool,
               process_index: int | None = None, process_count: int | None = None,
               barrier: Callable[[], None] | None = None) -> dict[str, Any]:
    """Draw ``len(y)`` samples in batches of ``batch_size`` into ADM-evaluator files under ``out_dir``.

    ``draw(y_batch, y_null_batch, seed) -> (b, H, W, C)`` in [-1, 1].  Batch ``i`` is
    ``batch_{i:06d}.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` the class labels when ``labels``), written
    atomically; batches already on disk are skipped, so a stopped export resumes where it stopped.
    When all are there they are joined into ``samples_<N>.npz``, the evaluator's input.

    Several processes (``process_count``, default :func:`jax.process_count`) share the work: process
    ``p`` draws the batches ``i`` with ``i % process_count == p``, so file names never collide and
    a resumed export gives every process the same batches again; after ``barrier`` (default: a JAX
    barrier over all processes) process 0 alone joins the files, so ``out_dir`` must be on a
    filesystem all hosts share.  ``draw`` is this process's own (e.g. data parallel over its local
    devices); a batch's images depend only on ``(seed, i)``, not on which process drew it.
    """
    pid = jax.process_index() if process_index is None else int(process_index)
    nproc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pid < nproc:
        raise ValueError(f"process_index must be in [0, {nproc}), got {pid}")
    out_dir = Path(out_dir)
    n = len(y)
    count = -(-n // batch_size)
    done = set(completed_batches(out_dir))
    if done - set(range(count)):
        raise ValueError(f"{out_dir} holds batches beyond the {count} of this export "
                         f"({n} samples in batches of {batch_size}); use a new folder")
    mine = list(range(pid, count, nproc))
    drawn = 0
    for i in mine:
        if i in done:
            continue
        sl = slice(i * batch_size, min(n, (i + 1) * batch_size))
        x = draw(y[sl], y_null[sl], batch_seed(seed, i))
        write_batch(out_dir, i, as_uint8_rgb(x), np.asarray(y[sl]) if labels else None)
        drawn += 1
    if nproc > 1:
        (barrier or _sync_processes)()
    merged = out_dir / f"samples_{n}.npz"
    if pid == 0:
        merge_batches(out_dir, merged, num=n)
    return {"adm_npz": str(merged), "batches": count, "batches_drawn": drawn, "batches_skipped": len(mine) - drawn,
            "process_index": pid, "process_count": nproc}

"""Many samples in fixed-size chunks, with per-sample noise keys, optionally data parallel
over a device mesh (:func:`sample_batched` and its device helpers).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pixeldit.parallel import batch_axes, batch_sharding, replicated
from pixeldit.sampling.api import sample
from pixeldit.sampling.validation import _as_tree, _validate


def sample_batched(model, key, shape, y, y_null=None, *, batch_size: int = 64, method: str = "heun",
                   num_steps: int = 32, progress: bool = True, mesh: Mesh | None = None, **kwargs) -> np.ndarray:
    """Draw ``shape[0]`` samples in chunks of ``batch_size``; returns a numpy array ``shape``.

    Sample ``i`` uses the noise ``normal(split(key, N)[i], shape[1:])``, so the result does not
    depend on ``batch_size``.  A short last chunk is padded to ``batch_size`` (and the padding
    dropped) so a single compiled function serves every chunk.  ``y`` / ``y_null`` hold one
    entry per sample (leading dimension ``N``); ``kwargs`` go to :func:`sample`.  Progress is
    reported with tqdm, one update per chunk.

    With a ``mesh`` (of this process's devices, e.g. :func:`pixeldit.parallel.local_data_mesh`)
    each chunk is data parallel: the model's parameters are replicated on the mesh once, the
    chunk's noise and conditions are split along the batch over the mesh's batch axes (the
    chunk is padded up to a multiple of their size).  The noise is the same as without a mesh.
    """
    from tqdm.auto import tqdm

    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"shape must be 4-D (N, H, W, C), got {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = shape[0]
    # Validate everything (with the full batch) before any compilation.
    _validate(model, jax.ShapeDtypeStruct(shape, jnp.float32), y, y_null, method, num_steps,
              kwargs.get("guidance", 1.0), kwargs.get("timeshift", 1.0),
              kwargs.get("guidance_interval", (0.0, 1.0)), kwargs.get("t_start", 0.0),
              {k: v for k, v in kwargs.items()
               if k not in ("guidance", "timeshift", "guidance_interval", "t_start")})
    y = jax.tree.map(np.asarray, _as_tree(y))
    y_null = None if y_null is None else jax.tree.map(np.asarray, _as_tree(y_null))
    keys = jax.random.split(key, n)
    bs = min(int(batch_size), n)
    place = lambda a: a
    if mesh is not None:
        model, place = _replicate_model(model, mesh), _batch_placer(mesh)
        bs = -(-bs // _batch_devices(mesh)) * _batch_devices(mesh)
    draw = _noise_fn(shape[1:])
    out = np.empty(shape, np.float32)
    with tqdm(total=n, disable=not progress, desc=f"sampling ({method})", unit="img") as bar:
        for start in range(0, n, bs):
            stop = min(start + bs, n)
            idx = np.minimum(np.arange(start, start + bs), n - 1)
            take = lambda a: place(a[idx])
            noise = place(draw(keys[idx]))
            xb = sample(model, noise, jax.tree.map(take, y),
                        None if y_null is None else jax.tree.map(take, y_null),
                        method=method, num_steps=num_steps, **kwargs)
            out[start:stop] = np.asarray(xb)[: stop - start]
            bar.update(stop - start)
    return out


def _batch_devices(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def _batch_placer(mesh: Mesh) -> Callable:
    """``a -> a`` on ``mesh``, split along its leading axis (:func:`pixeldit.parallel.batch_sharding`)."""
    sharding = batch_sharding(mesh)
    return lambda a: jax.device_put(a, sharding)


def _replicate_model(model, mesh: Mesh):
    """An NNX ``model`` with its arrays replicated on ``mesh`` (other callables as they are)."""
    if not isinstance(model, nnx.Module):
        return model
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, replicated(mesh)))


@functools.lru_cache(maxsize=None)
def _noise_fn(sample_shape):
    return jax.jit(jax.vmap(lambda k: jax.random.normal(k, sample_shape, jnp.float32)))

"""Flat parameter storage for training: one float32 vector per per-parameter quantity.

The train state keeps the master weights, their EMA and the AdamW moments each as one 1-D
vector instead of a tree of per-layer arrays.  Why: gradient clipping, AdamW and the EMA touch
every parameter leaf; applied leaf by leaf they become ~5 XLA kernels per leaf (226 of the
``s8-64`` train step's 619 fused kernels, 41 leaves), and on CPU compile time follows the number
of kernels, not their sizes.  On one vector they are a handful of kernels whatever the model.
Measured on ``s8-64`` (2-core CPU): the train step's first call fell from ~10 s to ~6 s at the
same step time (``docs/benchmark-log.md``).

The model still sees its ordinary per-leaf ``nnx.State``: :meth:`ParamLayout.unflatten` slices
the vector (static slices, which XLA fuses into their consumers), and its custom VJP returns the
per-leaf gradients to vector form with a single concatenate (the default transpose of 41 slices
would be 41 padded adds).

Checkpoints do not change: they store the per-leaf trees, so a checkpoint does not depend on
this layout, on the padding or on the mesh it came from.

The vector is zero-padded to a multiple of ``multiple`` elements (the FSDP group size, so it
splits evenly over the devices).  Padding entries stay exactly zero through training: their
gradient is zero, so are their moments, update, weight decay and EMA.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ParamLayout", "gather"]


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """Where each parameter leaf lives in the flat vector (static, hashable).

    Attributes:
      treedef: tree structure of the per-leaf parameters (an ``nnx.State``).
      shapes: shape of each leaf, in ``jax.tree.leaves`` order.
      size: number of parameters (sum of the leaves' sizes).
      padded_size: length of the flat vectors, ``size`` rounded up to a multiple of ``multiple``.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    size: int
    padded_size: int

    @classmethod
    def of(cls, params: Any, multiple: int = 1) -> "ParamLayout":
        """Layout of the per-leaf ``params`` (arrays or ``ShapeDtypeStruct``s, floating point)."""
        if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
            raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
        leaves, treedef = jax.tree.flatten(params)
        if not leaves:
            raise ValueError("the model has no parameters to train")
        bad = [f"{jax.tree_util.keystr(p)}: {a.dtype}" for p, a in jax.tree_util.tree_leaves_with_path(params)
               if not jnp.issubdtype(a.dtype, jnp.floating)]
        if bad:
            raise TypeError(f"trainable parameters must be floating point; got {', '.join(bad[:5])}")
        shapes = tuple(tuple(int(d) for d in a.shape) for a in leaves)
        size = sum(math.prod(s) for s in shapes)
        return cls(treedef, shapes, size, -(-size // multiple) * multiple)

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each leaf in the vector, then ``size``."""
        return tuple(int(o) for o in np.cumsum([0] + [math.prod(s) for s in self.shapes]))

    def is_flat(self, a: Any) -> bool:
        """Whether ``a`` (array or ``ShapeDtypeStruct``) has the flat vectors' shape."""
        return tuple(getattr(a, "shape", ())) == (self.padded_size,)

    def flatten(self, tree: Any, dtype=jnp.float32) -> jax.Array:
        """Per-leaf tree -> zero-padded vector of ``padded_size`` elements (``dtype``)."""
        leaves = self.treedef.flatten_up_to(tree)
        got = tuple(tuple(a.shape) for a in leaves)
        if got != self.shapes:
            wrong = [(i, s, g) for i, (s, g) in enumerate(zip(self.shapes, got)) if s != g][:3]
            raise ValueError(f"parameter shapes do not match the layout: (leaf, expected, got) {wrong}")
        return _join(self, leaves, dtype)

    def unflatten(self, flat: jax.Array) -> Any:
        """Vector -> per-leaf tree (slices, in ``flat``'s dtype); differentiable, see module doc.

        A ``jax.ShapeDtypeStruct`` gives the abstract tree (:meth:`abstract_tree`).
        """
        if tuple(flat.shape) != (self.padded_size,):
            raise ValueError(f"expected a flat vector of shape ({self.padded_size},), got {tuple(flat.shape)}")
        if isinstance(flat, jax.ShapeDtypeStruct):
            return self.abstract_tree(flat.dtype)
        return jax.tree.unflatten(self.treedef, _unflatten(self, flat))

    def abstract_tree(self, dtype=jnp.float32, sharding=None) -> Any:
        """Per-leaf tree of ``jax.ShapeDtypeStruct`` (each with ``sharding`` if given: a leaf -> sharding function)."""
        return jax.tree.unflatten(
            self.treedef,
            [jax.ShapeDtypeStruct(s, dtype, sharding=None if sharding is None else sharding(s)) for s in self.shapes],
        )


def _join(layout: ParamLayout, leaves: list, dtype) -> jax.Array:
    """The leaves raveled, cast to ``dtype``, concatenated and zero-padded to ``padded_size``."""
    parts = [jnp.ravel(a).astype(dtype) for a in leaves]
    if layout.padded_size > layout.size:
        parts.append(jnp.zeros((layout.padded_size - layout.size,), dtype))
    return jnp.concatenate(parts)


def _slices(layout: ParamLayout, flat: jax.Array) -> list[jax.Array]:
    o = layout.offsets
    return [jax.lax.slice(flat, (o[i],), (o[i + 1],)).reshape(s) for i, s in enumerate(layout.shapes)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _unflatten(layout: ParamLayout, flat: jax.Array) -> list[jax.Array]:
    return _slices(layout, flat)


def _unflatten_fwd(layout, flat):
    return _slices(layout, flat), None


def _unflatten_bwd(layout, _, cotangents):
    return (_join(layout, cotangents, cotangents[0].dtype),)


_unflatten.defvjp(_unflatten_fwd, _unflatten_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def gather(flat: jax.Array, full: Any, shards: Any) -> jax.Array:
    """``flat`` laid out as ``full`` (e.g. replicated); its gradient is laid out as ``shards``.

    The FSDP step reads its split parameter vector through this: the forward
    pass all-gathers the vector once and slices it locally; the backward pass
    sums the per-device gradients in the ``full`` layout (one all-reduce per
    group of leaves, on CPU) and each device keeps its part.  Without it, XLA's
    partitioner re-splits every slice of a vector cut at shard boundaries: on
    4 CPU devices, 136 all-gathers and 120 collective-permutes per step
    instead of one all-gather and 3 all-reduces.
    """
    return jax.lax.with_sharding_constraint(flat, full)


def _gather_fwd(flat, full, shards):
    return jax.lax.with_sharding_constraint(flat, full), None


def _gather_bwd(full, shards, _, cotangent):
    # Summed in the gathered layout first: constrained straight to ``shards``, the partitioner
    # splits the weight-gradient GEMMs and gathers their activations instead.
    cotangent = jax.lax.with_sharding_constraint(cotangent, full)
    return (jax.lax.with_sharding_constraint(cotangent, shards),)


gather.defvjp(_gather_fwd, _gather_bwd)

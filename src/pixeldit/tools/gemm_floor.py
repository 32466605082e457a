"""The GEMM floor of a program: its matrix products, each timed alone, summed.

:func:`dot_calls` lists every matrix product of the traced forward and train step (a scan's body
counted once per iteration), :func:`gemm_floor` times each distinct product alone (best of 10
calls) and sums over the executions: a lower bound on the program's time as long as each product
runs no faster inside it than alone.  :func:`measure` is the ``program_hook`` of
:func:`pixeldit.bench.run_benchmark` behind ``pixeldit bench --gemm-floor``;
:func:`add_bound_fractions` then gives the fraction of the matmul ceiling the program would reach
if everything but its products took no time.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
from jax import lax
from jax.extend import core as jcore

from pixeldit.attention import use_attention
from pixeldit.bench import call_times

__all__ = ["DotCall", "add_bound_fractions", "dot_calls", "format_lines", "gemm_floor", "measure"]


@dataclass(frozen=True)
class DotCall:
    """One matrix product of a traced program and how often one run executes it."""

    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    lhs_dtype: str
    rhs_dtype: str
    dtype: str  # the result's
    lhs_contracting: tuple[int, ...]
    rhs_contracting: tuple[int, ...]
    lhs_batch: tuple[int, ...]
    rhs_batch: tuple[int, ...]
    count: int

    @property
    def flops(self) -> int:
        """FLOPs of one execution: 2 x (batch x free x contracted) sizes."""
        contracted = int(np.prod([self.lhs_shape[d] for d in self.lhs_contracting]))
        lhs_rest = int(np.prod(self.lhs_shape)) // contracted
        rhs_free = int(np.prod(self.rhs_shape)) // contracted // int(np.prod([self.rhs_shape[d] for d in self.rhs_batch]))
        return 2 * lhs_rest * contracted * rhs_free


def _count_dots(jaxpr: jcore.Jaxpr, times: int, found: collections.Counter) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
            key = (tuple(lhs.shape), tuple(rhs.shape), str(lhs.dtype), str(rhs.dtype),
                   str(eqn.outvars[0].aval.dtype), tuple(lc), tuple(rc), tuple(lb), tuple(rb))
            found[key] += times
            continue
        subs = [sub for value in eqn.params.values()
                for sub in (value if isinstance(value, (tuple, list)) else (value,))
                if isinstance(sub, (jcore.Jaxpr, jcore.ClosedJaxpr))]
        inner: collections.Counter = collections.Counter()
        for sub in subs:
            _count_dots(sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub, 1, inner)
        if inner and name in ("while", "cond"):
            raise ValueError(f"matrix products inside a {name!r} cannot be counted (unknown trip count or branch); "
                             "use lax.scan, whose length is known")
        repeat = eqn.params["length"] if name == "scan" else 1
        for key, n in inner.items():
            found[key] += times * repeat * n


def dot_calls(fn: Callable, *args) -> list[DotCall]:
    """Every matrix product (``dot_general``) that one call of ``fn(*args)`` executes, with counts.

    Read from the traced program (``jax.make_jaxpr``), so the list is the same on every backend
    and keeps the model's dtypes; attention is traced as XLA's (two batched products), as in
    :func:`count_flops`.  A ``lax.scan`` body counts ``length`` times; products inside a
    ``while`` loop or a ``cond`` raise ``ValueError``.  ``args`` may be arrays or
    ``jax.ShapeDtypeStruct``.  The jaxpr is not pruned: a product whose result is never used
    is listed although XLA would drop it.  For the train steps here the list matches the
    optimised CPU program's ``dot`` instructions (same total FLOPs for ``s8-64`` with every
    ``remat`` mode).  Identical products are merged, most FLOPs first.
    """
    with use_attention("xla"):
        jaxpr = jax.make_jaxpr(fn)(*args)
    found: collections.Counter = collections.Counter()
    _count_dots(jaxpr.jaxpr, 1, found)
    calls = [DotCall(*key, count=n) for key, n in found.items()]
    return sorted(calls, key=lambda c: -c.flops * c.count)


def gemm_floor(calls: list[DotCall], repeats: int = 10) -> dict[str, float]:
    """Time each product of ``calls`` alone (best of ``repeats``); sum over its executions.

    Each product is jitted by itself with the same shapes, dimension numbers and result type,
    default layouts, on the default backend.  The best call is used, as for the matmul ceiling
    (:func:`matmul_rate`), so the two are peak against peak and the resulting bound is an
    optimistic one.  Each call includes its dispatch (microseconds), which overstates the
    smallest products a little.  Returns ``floor_ms`` (the sum), ``gemm_gflops`` (their FLOPs)
    and ``num_products`` (distinct products timed).
    """
    floor = 0.0
    flops = 0
    for i, c in enumerate(calls):
        k1, k2 = jax.random.split(jax.random.key(i))
        a = jax.random.normal(k1, c.lhs_shape, c.lhs_dtype)
        b = jax.random.normal(k2, c.rhs_shape, c.rhs_dtype)
        dims = ((c.lhs_contracting, c.rhs_contracting), (c.lhs_batch, c.rhs_batch))
        f = jax.jit(lambda a, b, dims=dims, out=c.dtype: lax.dot_general(a, b, dims, preferred_element_type=out))
        floor += c.count * min(call_times(lambda: f(a, b).block_until_ready(), repeats))
        flops += c.count * c.flops
    return {"floor_ms": floor * 1e3, "gemm_gflops": flops / 1e9, "num_products": len(calls)}


def measure(programs: dict[str, tuple]) -> dict[str, float]:
    """``<name>_gemm_floor_ms`` and ``<name>_gemm_gflops`` of each ``name: (fn, *args)`` program."""
    out = {}
    for key, (fn, *args) in programs.items():
        floor = gemm_floor(dot_calls(fn, *args))
        out[f"{key}_gemm_floor_ms"] = floor["floor_ms"]
        out[f"{key}_gemm_gflops"] = floor["gemm_gflops"]
    return out


def add_bound_fractions(result: dict[str, Any]) -> dict[str, Any]:
    """Add ``<name>_gemm_bound_fraction``: the program's FLOPs over its products' summed time, as a
    fraction of the benchmark's matmul ceiling."""
    for key in ("forward", "train_step"):
        if f"{key}_gemm_floor_ms" in result:
            rate = result[f"gflops_{key}"] / (result[f"{key}_gemm_floor_ms"] / 1e3)
            result[f"{key}_gemm_bound_fraction"] = rate / result["matmul_gflops_per_s"]
    return result


def format_lines(r: dict[str, Any]) -> list[str]:
    """The summary line of :func:`measure`'s numbers (empty without them)."""
    if "forward_gemm_floor_ms" not in r:
        return []
    return ["matrix products timed alone: forward {:.1f} ms ({:.1f} GFLOP; bound {:.0f}% of matmul), "
            "train step {:.1f} ms ({:.1f} GFLOP; bound {:.0f}% of matmul)".format(
                r["forward_gemm_floor_ms"], r["forward_gemm_gflops"], 100 * r["forward_gemm_bound_fraction"],
                r["train_step_gemm_floor_ms"], r["train_step_gemm_gflops"], 100 * r["train_step_gemm_bound_fraction"])]

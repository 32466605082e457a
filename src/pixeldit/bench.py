"""Benchmarks: forward pass, full train step, one sampler step, compile time, FLOP rate.

Every timing is the median over ``repeats`` runs after warm-up, with ``block_until_ready``.
FLOPs come from XLA's cost analysis of the lowered program; the achieved rate is compared
with the plain matrix-multiply rate of the same backend measured in the same run (float32 on
CPU, bfloat16 on GPU/TPU; the best of 20 calls, measured before and after the model timings),
so each number is also a fraction of that ceiling.

Named presets (``BENCH_PRESETS``):

* ``s8-64``: class-conditional, 64x64 RGB, batch 16, patch 8, hidden 384, 6 heads, 12 patch
  blocks, 2 pixel blocks, pixel width 16, 10 classes, float32: the reference constructor
  ``PixDiT(in_channels=3, patch_size=8, num_groups=6, hidden_size=384, patch_depth=12,
  pixel_depth=2, num_classes=10, pixel_hidden_size=16)``.
* ``xl16-256``: the paper's class-to-image XL/16 at 256x256 (797M parameters), bfloat16 compute,
  batch 64 (one device's share of a large-batch run; 52 GiB peak on an H200 with the stacks
  unrolled, as ``scan_unroll="auto"`` does on GPU).
* ``tiny``: a seconds-long smoke configuration.

``with_gemm_floor=True`` (``pixeldit bench --gemm-floor``) also lists every matrix product of
the traced forward and train step (:func:`dot_calls`, a scan's body counted once per iteration),
times each distinct product alone (:func:`gemm_floor`, best of 10 calls) and reports the sum: a
lower bound on the program's time as long as each product runs no faster inside it than alone,
and the fraction of the matmul ceiling the program would reach if everything but its products
took no time.
"""

from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.extend import core as jcore

from pixeldit.attention import use_attention
from pixeldit.model import C2IConfig, abstract_model, build_model, preset, resolve_scan_unroll
from pixeldit.runtime import settings as runtime_settings
from pixeldit.training import TrainConfig, create_train_state, make_train_step, make_train_step_fn, prepare_batch


@dataclass(frozen=True)
class BenchPreset:
    model: C2IConfig
    image_size: tuple[int, int]
    batch_size: int
    description: str


BENCH_PRESETS: dict[str, Callable[[], BenchPreset]] = {
    "s8-64": lambda: BenchPreset(
        C2IConfig(in_channels=3, patch_size=8, num_groups=6, hidden_size=384, patch_depth=12, pixel_depth=2,
                  num_classes=10, pixel_hidden_size=16),
        (64, 64), 16, "c2i 64x64 RGB, patch 8, hidden 384, 12+2 blocks, float32",
    ),
    "xl16-256": lambda: BenchPreset(
        preset("XL/16", dtype="bfloat16"), (256, 256), 64, "c2i XL/16 at 256x256, bfloat16 compute",
    ),
    "tiny": lambda: BenchPreset(
        C2IConfig(in_channels=3, patch_size=4, num_groups=2, hidden_size=32, patch_depth=2, pixel_depth=1,
                  num_classes=10, pixel_hidden_size=8),
        (16, 16), 4, "smoke test",
    ),
}


def _times(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` in seconds, after ``warmup`` untimed calls.

    ``fn`` must block until its result is ready.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after warm-up."""
    return statistics.median(_times(fn, repeats, warmup))


def count_flops(fn: Callable, *args) -> float:
    """FLOPs of ``fn(*args)`` from XLA's cost analysis of the lowered (uncompiled) HLO.

    XLA counts a ``while`` loop body once, so callers pass a model whose block stacks are
    fully unrolled (``scan_unroll=True``) to count every block.  The program is lowered for
    the CPU whatever the default backend (accelerator plugins report no cost analysis before
    compiling), with XLA's attention, whose two matrix products are counted exactly; so every
    backend divides its time by the same FLOP count.  Only shapes are used: ``args`` may be
    arrays or ``jax.ShapeDtypeStruct``.
    """
    try:
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS excludes it): lower for the default one
        cpu = None

    def on_cpu(a):
        if cpu is not None and hasattr(a, "shape") and hasattr(a, "dtype"):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu)
        return a

    with use_attention("xla"):
        cost = jax.jit(fn).lower(*jax.tree.map(on_cpu, args)).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def matmul_rate(dtype=None, n: int | None = None, repeats: int = 20) -> dict[str, float]:
    """Plain ``n x n @ n x n`` matmul rate of the default backend, GFLOP/s (float32 on CPU, bf16 elsewhere).

    The ceiling is the *best* of ``repeats`` timed calls (a peak rate; on a shared machine the
    median of a few calls can land far below it, which would flatter every fraction computed
    from it); the median is reported alongside.
    """
    backend = jax.default_backend()
    dtype = dtype or (jnp.float32 if backend == "cpu" else jnp.bfloat16)
    n = n or (2048 if backend == "cpu" else 8192)
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    times = _times(lambda: f(a, b).block_until_ready(), repeats)
    flops = 2 * n**3
    return {"matmul_n": n, "matmul_dtype": jnp.dtype(dtype).name, "matmul_gflops_per_s": flops / min(times) / 1e9,
            "matmul_median_gflops_per_s": flops / statistics.median(times) / 1e9}


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
        floor += c.count * min(_times(lambda: f(a, b).block_until_ready(), repeats))
        flops += c.count * c.flops
    return {"floor_ms": floor * 1e3, "gemm_gflops": flops / 1e9, "num_products": len(calls)}


def _peak_memory() -> float | None:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**30


def run_benchmark(name: str = "s8-64", *, batch_size: int | None = None, repeats: int = 5,
                  remat: bool | str | None = None, scan_unroll: int | bool | str | None = None,
                  profile_dir: str | None = None, with_gemm_floor: bool = False) -> dict[str, Any]:
    """Time forward, train step and one CFG Euler sampler step of a preset; returns a JSON-ready dict.

    ``remat`` and ``scan_unroll`` override the preset's model settings.  ``profile_dir``: after
    the timings, three more train steps run under ``jax.profiler.trace`` into that folder
    (TensorBoard/XProf profile plus a Perfetto ``perfetto_trace.json.gz``) and the optimised HLO
    of the train step into ``train_step.hlo.txt`` (``scripts/trace_summary.py`` reads both).
    ``with_gemm_floor``: also time the forward's and the train step's matrix products alone
    (:func:`gemm_floor`) and report ``*_gemm_floor_ms``, ``*_gemm_gflops`` and
    ``*_gemm_bound_fraction`` (the program's FLOPs over its products' summed time, as a fraction
    of the ceiling: what it would reach if everything but the products took no time).
    """
    if name not in BENCH_PRESETS:
        raise ValueError(f"unknown benchmark preset {name!r}; known: {sorted(BENCH_PRESETS)}")
    bp = BENCH_PRESETS[name]()
    cfg = bp.model if remat is None else bp.model.replace(remat=remat)
    cfg = cfg if scan_unroll is None else cfg.replace(scan_unroll=scan_unroll)
    b = batch_size or bp.batch_size
    h, w = bp.image_size
    result: dict[str, Any] = {
        "preset": name, "description": bp.description, "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
        "batch_size": b, "image_size": [h, w], "dtype": cfg.dtype, "remat": cfg.remat,
        "scan_unroll": resolve_scan_unroll(cfg.scan_unroll),
        "jax_version": jax.__version__, **runtime_settings(),
    }
    early = matmul_rate()

    tc = TrainConfig(batch_size=b, steps=10, warmup_steps=1, compute_dtype=cfg.dtype)
    state = create_train_state(cfg, tc)
    params = state.params  # per-leaf view of the flat master weights
    result["num_params"] = state.layout.size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, h, w, cfg.in_channels)), jnp.float32)
    y = jnp.asarray(rng.integers(0, cfg.num_classes, size=b), jnp.int32)
    t = jnp.asarray(rng.uniform(size=b), jnp.float32)

    # -- forward ---------------------------------------------------------------------------
    graphdef = state.graphdef
    unrolled_graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg.replace(scan_unroll=True), rngs=nnx.Rngs(0))))

    def forward(params, model_state, x, t, y, graphdef=graphdef):
        model = nnx.merge(graphdef, params, model_state)
        return model(x, t, y)

    fwd = jax.jit(forward).lower(params, state.model_state, x, t, y).compile()
    # cuDNN fused-attention custom calls in the compiled forward (a scanned stack's body counts once)
    result["cudnn_attention_calls"] = fwd.as_text().count("__cudnn$fmha")
    result["gflops_forward"] = count_flops(
        lambda *a: forward(*a, graphdef=unrolled_graphdef), params, state.model_state, x, t, y) / 1e9
    sec = _time(lambda: fwd(params, state.model_state, x, t, y).block_until_ready(), repeats)
    result["forward_ms"] = sec * 1e3
    result["forward_gflops_per_s"] = result["gflops_forward"] / sec

    # -- one CFG Euler step (2B forward + update), as inside the samplers -------------------------
    def sample_step(params, model_state, x, t, y):
        model = nnx.merge(graphdef, params, model_state)
        v = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([jnp.full_like(y, cfg.num_classes), y]))
        u, c = jnp.split(v, 2)
        return x + 0.05 * (u + 4.0 * (c - u))

    smp = jax.jit(sample_step).lower(params, state.model_state, x, t, y).compile()
    result["sample_step_ms"] = _time(lambda: smp(params, state.model_state, x, t, y).block_until_ready(), repeats) * 1e3

    # -- train step (AdamW, loss, EMA), state donated ----------------------------------------------
    step_fn = make_train_step(graphdef, tc)
    batch = prepare_batch({"x": np.asarray(x), "y": np.asarray(y)})
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    result["compile_s"] = time.perf_counter() - t0
    unrolled_step = make_train_step_fn(unrolled_graphdef, tc)
    result["gflops_train_step"] = count_flops(unrolled_step, state.replace(graphdef=unrolled_graphdef), batch) / 1e9
    holder = [state]

    def one_step():
        holder[0], metrics = compiled(holder[0], batch)
        jax.block_until_ready(metrics["loss"])

    sec = _time(one_step, repeats)
    result["train_step_ms"] = sec * 1e3
    result["train_step_gflops_per_s"] = result["gflops_train_step"] / sec
    result["peak_memory_gib"] = _peak_memory()
    if profile_dir is not None:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(3):
                one_step()
        # the optimised program, to read the profile's fusion names against
        (Path(profile_dir) / "train_step.hlo.txt").write_text(compiled.as_text())
        result["profile_dir"] = str(profile_dir)
    if with_gemm_floor:
        shapes = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)  # noqa: E731
        programs = {
            "forward": (forward, *shapes((params, state.model_state, x, t, y))),
            "train_step": (make_train_step_fn(graphdef, tc), shapes(holder[0]), shapes(batch)),
        }
        for key, (fn, *args) in programs.items():
            floor = gemm_floor(dot_calls(fn, *args))
            result[f"{key}_gemm_floor_ms"] = floor["floor_ms"]
            result[f"{key}_gemm_gflops"] = floor["gemm_gflops"]

    # The ceiling is measured before and after the model timings; the higher one is kept, so a
    # slow moment of a shared machine cannot make the model look closer to the ceiling.
    late = matmul_rate()
    result.update(max(early, late, key=lambda m: m["matmul_gflops_per_s"]))
    ceiling = result["matmul_gflops_per_s"]
    result["forward_fraction_of_matmul"] = result["forward_gflops_per_s"] / ceiling
    result["train_step_fraction_of_matmul"] = result["train_step_gflops_per_s"] / ceiling
    if with_gemm_floor:
        for key in ("forward", "train_step"):
            result[f"{key}_gemm_bound_fraction"] = (
                result[f"gflops_{key}"] / (result[f"{key}_gemm_floor_ms"] / 1e3) / ceiling)
    return result


def format_result(r: dict[str, Any]) -> str:
    """Human-readable summary lines of :func:`run_benchmark` output."""
    lines = [
        f"preset {r['preset']} ({r['description']}); backend {r['backend']} [{r['device']}] x{r['num_devices']}; "
        f"batch {r['batch_size']}; params {r['num_params']:,}",
        f"matmul ({r['matmul_dtype']}, n={r['matmul_n']}): {r['matmul_gflops_per_s']:.1f} GFLOP/s best "
        f"(median {r['matmul_median_gflops_per_s']:.1f})",
        f"forward: {r['forward_ms']:.1f} ms, {r['gflops_forward']:.1f} GFLOP, {r['forward_gflops_per_s']:.1f} GFLOP/s "
        f"({100 * r['forward_fraction_of_matmul']:.0f}% of matmul)",
        f"train step: {r['train_step_ms']:.1f} ms, {r['gflops_train_step']:.1f} GFLOP, "
        f"{r['train_step_gflops_per_s']:.1f} GFLOP/s ({100 * r['train_step_fraction_of_matmul']:.0f}% of matmul); "
        f"compile {r['compile_s']:.1f} s",
        f"sampler step (CFG, 2B forward): {r['sample_step_ms']:.1f} ms",
    ]
    if "forward_gemm_floor_ms" in r:
        lines.append(
            "matrix products timed alone: forward {:.1f} ms ({:.1f} GFLOP; bound {:.0f}% of matmul), "
            "train step {:.1f} ms ({:.1f} GFLOP; bound {:.0f}% of matmul)".format(
                r["forward_gemm_floor_ms"], r["forward_gemm_gflops"], 100 * r["forward_gemm_bound_fraction"],
                r["train_step_gemm_floor_ms"], r["train_step_gemm_gflops"],
                100 * r["train_step_gemm_bound_fraction"]))
    if r.get("peak_memory_gib") is not None:
        lines.append(f"peak memory: {r['peak_memory_gib']:.2f} GiB")
    return "\n".join(lines)


def forward_flops(model_config, image_size: tuple[int, int], batch: int = 1) -> float:
    """FLOPs of one forward pass at ``image_size`` and ``batch`` (no weights allocated).

    Counted by :func:`count_flops` (XLA's cost analysis of the lowered program)
    with the block stacks fully unrolled (``scan_unroll=True``): XLA counts a while loop's body
    once whatever its trip count.
    """
    graphdef, state = nnx.split(abstract_model(model_config.replace(scan_unroll=True)))
    h, w = image_size
    x = jax.ShapeDtypeStruct((batch, h, w, model_config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    if model_config.kind == "c2i":
        y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    elif model_config.kind == "theta":
        y = jax.ShapeDtypeStruct((batch, model_config.theta_dim, model_config.theta_channels), jnp.float32)
    else:
        y = jax.ShapeDtypeStruct((batch, model_config.txt_max_length, model_config.txt_embed_dim), jnp.float32)

    def forward(state, x, t, y):
        return nnx.merge(graphdef, state)(x, t, y)

    return count_flops(forward, state, x, t, y)

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

``program_hook`` receives the traced forward and train step (``pixeldit bench --gemm-floor``
passes :func:`pixeldit.tools.gemm_floor.measure`, research tooling that this module does not
import).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit.attention import use_attention
from pixeldit.model import abstract_model, build_model, resolve_scan_unroll
from pixeldit.model_config import C2IConfig, preset
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


def call_times(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
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
    return statistics.median(call_times(fn, repeats, warmup))


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
    times = call_times(lambda: f(a, b).block_until_ready(), repeats)
    flops = 2 * n**3
    return {"matmul_n": n, "matmul_dtype": jnp.dtype(dtype).name, "matmul_gflops_per_s": flops / min(times) / 1e9,
            "matmul_median_gflops_per_s": flops / statistics.median(times) / 1e9}


def _peak_memory() -> float | None:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**30


def _forward_program(graphdef) -> Callable:
    """The un-jitted forward ``(params, model_state, x, t, y) -> v`` of the model ``graphdef`` describes."""
    def forward(params, model_state, x, t, y):
        model = nnx.merge(graphdef, params, model_state)
        return model(x, t, y)

    return forward


def _bench_forward(graphdef, unrolled_graphdef, args: tuple, repeats: int) -> dict[str, Any]:
    """Compile and time the forward pass on ``args = (params, model_state, x, t, y)``; count its FLOPs unrolled."""
    fwd = jax.jit(_forward_program(graphdef)).lower(*args).compile()
    out: dict[str, Any] = {
        # cuDNN fused-attention custom calls in the compiled forward (a scanned stack's body counts once)
        "cudnn_attention_calls": fwd.as_text().count("__cudnn$fmha"),
        "gflops_forward": count_flops(_forward_program(unrolled_graphdef), *args) / 1e9,
    }
    sec = _time(lambda: fwd(*args).block_until_ready(), repeats)
    out["forward_ms"] = sec * 1e3
    out["forward_gflops_per_s"] = out["gflops_forward"] / sec
    return out


def _bench_sample_step(graphdef, num_classes: int, args: tuple, repeats: int) -> dict[str, Any]:
    """Time one CFG Euler step (2B forward + update), as inside the samplers, on ``args`` as for the forward."""
    def sample_step(params, model_state, x, t, y):
        model = nnx.merge(graphdef, params, model_state)
        v = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([jnp.full_like(y, num_classes), y]))
        u, c = jnp.split(v, 2)
        return x + 0.05 * (u + 4.0 * (c - u))

    smp = jax.jit(sample_step).lower(*args).compile()
    return {"sample_step_ms": _time(lambda: smp(*args).block_until_ready(), repeats) * 1e3}


def _bench_train_step(state, unrolled_graphdef, tc: TrainConfig, batch, repeats: int,
                      profile_dir: str | None) -> tuple[dict[str, Any], Any]:
    """Compile and time the train step (AdamW, loss, EMA; state donated), optionally profiling three more.

    Returns the result entries and the train state after the timed steps (``state`` itself is donated).
    """
    step_fn = make_train_step(state.graphdef, tc)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    out: dict[str, Any] = {"compile_s": time.perf_counter() - t0}
    unrolled_step = make_train_step_fn(unrolled_graphdef, tc)
    out["gflops_train_step"] = count_flops(unrolled_step, state.replace(graphdef=unrolled_graphdef), batch) / 1e9
    holder = [state]

    def one_step():
        holder[0], metrics = compiled(holder[0], batch)
        jax.block_until_ready(metrics["loss"])

    sec = _time(one_step, repeats)
    out["train_step_ms"] = sec * 1e3
    out["train_step_gflops_per_s"] = out["gflops_train_step"] / sec
    out["peak_memory_gib"] = _peak_memory()
    if profile_dir is not None:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(3):
                one_step()
        # the optimised program, to read the profile's fusion names against
        (Path(profile_dir) / "train_step.hlo.txt").write_text(compiled.as_text())
        out["profile_dir"] = str(profile_dir)
    return out, holder[0]


def run_benchmark(name: str = "s8-64", *, batch_size: int | None = None, repeats: int = 5,
                  remat: bool | str | None = None, scan_unroll: int | bool | str | None = None,
                  profile_dir: str | None = None,
                  program_hook: Callable[[dict[str, tuple]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Time forward, train step and one CFG Euler sampler step of a preset; returns a JSON-ready dict.

    ``remat`` and ``scan_unroll`` override the preset's model settings.  ``profile_dir``: after
    the timings, three more train steps run under ``jax.profiler.trace`` into that folder
    (TensorBoard/XProf profile plus a Perfetto ``perfetto_trace.json.gz``) and the optimised HLO
    of the train step into ``train_step.hlo.txt`` (``scripts/trace_summary.py`` reads both).
    ``program_hook``: called with ``{"forward": (fn, *args), "train_step": (fn, *args)}`` (the
    un-jitted programs and their abstract arguments); the dict it returns is merged into the result.
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
    result["num_params"] = state.layout.size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, h, w, cfg.in_channels)), jnp.float32)
    y = jnp.asarray(rng.integers(0, cfg.num_classes, size=b), jnp.int32)
    t = jnp.asarray(rng.uniform(size=b), jnp.float32)
    unrolled_graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg.replace(scan_unroll=True), rngs=nnx.Rngs(0))))
    # state.params is a per-leaf copy of the flat master weights: taken once, shared by the programs
    forward_args = (state.params, state.model_state, x, t, y)

    result.update(_bench_forward(state.graphdef, unrolled_graphdef, forward_args, repeats))
    result.update(_bench_sample_step(state.graphdef, cfg.num_classes, forward_args, repeats))
    batch = prepare_batch({"x": np.asarray(x), "y": np.asarray(y)})
    train, final_state = _bench_train_step(state, unrolled_graphdef, tc, batch, repeats, profile_dir)
    result.update(train)
    if program_hook is not None:
        shapes = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)  # noqa: E731
        result.update(program_hook({
            "forward": (_forward_program(state.graphdef), *shapes(forward_args)),
            "train_step": (make_train_step_fn(state.graphdef, tc), shapes(final_state), shapes(batch)),
        }))

    # The ceiling is measured before and after the model timings; the higher one is kept, so a
    # slow moment of a shared machine cannot make the model look closer to the ceiling.
    late = matmul_rate()
    result.update(max(early, late, key=lambda m: m["matmul_gflops_per_s"]))
    ceiling = result["matmul_gflops_per_s"]
    result["forward_fraction_of_matmul"] = result["forward_gflops_per_s"] / ceiling
    result["train_step_fraction_of_matmul"] = result["train_step_gflops_per_s"] / ceiling
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

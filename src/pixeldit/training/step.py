"""The train step: flow-matching loss, gradient, AdamW update and EMA, jitted once per structure.

:func:`make_train_step_fn` builds the pure step ``(state, batch) -> (state, metrics)``;
:func:`make_train_step` compiles it with the state donated, :func:`make_sharded_train_step` with
the layouts of a device mesh (:mod:`pixeldit.parallel`).  :func:`shared_train_step` and
:func:`shared_sharded_train_step` hand out one compiled step per structure for the whole process
(the one cache: ``functools.lru_cache`` keyed on the step's numerics), so a run and its
resumption do not recompile.  With a bfloat16 compute dtype the float32 parameters are cast to
bfloat16 inside the loss (gradients therefore arrive in float32).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from pixeldit import flow
from pixeldit.flat import gather
from pixeldit.parallel import (
    DEFAULT_MIN_SHARD_SIZE,
    batch_arrays,
    batch_sharding,
    replicated,
    resolve_fsdp,
    state_shardings,
)
from pixeldit.training.config import COMPUTE_DTYPES, TrainConfig, numerics_key
from pixeldit.training.optim import lr_schedule, make_optimizer
from pixeldit.training.state import TrainState

__all__ = [
    "make_sharded_train_step",
    "make_train_step",
    "make_train_step_fn",
    "prepare_batch",
    "shared_sharded_train_step",
    "shared_train_step",
]


def prepare_batch(batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """A dataset batch as device arrays with stable dtypes (:func:`pixeldit.parallel.batch_arrays`).

    ``x`` -> float32; integer ``y`` -> int32, floating ``y`` -> float32; ``y``
    absent or None -> no ``"y"`` key (unconditional); ``mask`` kept if present.
    """
    return batch_arrays(batch, jnp)


def make_train_step_fn(
    graphdef: Any,
    train_config: TrainConfig,
    *,
    tx: optax.GradientTransformation | None = None,
    compute_dtype: str | None = None,
    on_trace: Callable[[], None] | None = None,
    gather_params: tuple[Any, Any] | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Pure (un-jitted) train step ``(state, batch) -> (new_state, metrics)``.

    ``batch`` is ``{"x": (B,H,W,C) float32, "y": condition (optional), "mask":
    (optional)}``.  ``metrics`` holds float32 scalars ``loss``, ``grad_norm``
    (before clipping) and ``lr`` (used for this update).  ``compute_dtype``
    defaults to ``train_config.compute_dtype`` or float32; with bfloat16 the
    float32 master parameters are cast to bfloat16 inside the loss.
    ``on_trace`` is called each time the function is traced (retrace checks).
    ``gather_params=(full, shards)`` (FSDP, see :func:`pixeldit.flat.gather`):
    the parameter vector is gathered to sharding ``full`` before the forward
    pass and its gradient comes back in sharding ``shards``.
    """
    tx = tx if tx is not None else make_optimizer(train_config)
    schedule = lr_schedule(train_config)
    compute_dtype = compute_dtype or train_config.compute_dtype or "float32"
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r} "
            "(float16 training would need loss scaling; use bfloat16)"
        )
    cast_dtype = jnp.bfloat16 if compute_dtype == "bfloat16" else None
    decay = float(train_config.ema_decay)
    tc = train_config

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if on_trace is not None:
            on_trace()
        rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))

        def loss_fn(flat_params):
            if gather_params is not None:
                flat_params = gather(flat_params, *gather_params)
            if cast_dtype is not None:
                flat_params = flat_params.astype(cast_dtype)
            model = nnx.merge(graphdef, state.layout.unflatten(flat_params), state.model_state)
            return flow.flow_matching_loss(
                model,
                batch["x"],
                batch.get("y"),
                key,
                p_uncond=tc.p_uncond,
                time_distribution=tc.time_distribution,
                time_mean=tc.time_mean,
                time_std=tc.time_std,
                time_shift=tc.time_shift,
                mask=batch.get("mask"),
            )

        # one vector each for the parameters, gradients, moments and EMA (pixeldit.flat)
        (loss, _aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.flat_params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.flat_params)
        params = optax.apply_updates(state.flat_params, updates)
        ema = decay * state.flat_ema + (1.0 - decay) * params
        new_state = state.replace(
            step=state.step + 1,
            flat_params=params,
            flat_ema=ema,
            opt_state=opt_state,
            rng=jax.random.key_data(rng),
        )
        metrics = {
            "loss": loss.astype(jnp.float32),
            "grad_norm": grad_norm.astype(jnp.float32),
            "lr": jnp.asarray(schedule(state.step), jnp.float32),
        }
        return new_state, metrics

    return train_step


def make_train_step(
    graphdef: Any,
    train_config: TrainConfig,
    *,
    tx: optax.GradientTransformation | None = None,
    compute_dtype: str | None = None,
    on_trace: Callable[[], None] | None = None,
):
    """``jax.jit`` of :func:`make_train_step_fn` with the state donated (argnum 0).

    Compiled once per batch shape/dtype structure; the caller must not reuse
    the ``state`` passed in after the call.
    """
    fn = make_train_step_fn(graphdef, train_config, tx=tx, compute_dtype=compute_dtype, on_trace=on_trace)
    return jax.jit(fn, donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _cached_train_step(graphdef: Any, train_key: TrainConfig, compute_dtype: str):
    counter = [0]

    def on_trace():
        counter[0] += 1

    return make_train_step(graphdef, train_key, compute_dtype=compute_dtype, on_trace=on_trace), counter


def shared_train_step(graphdef: Any, train_config: TrainConfig, compute_dtype: str | None = None):
    """The process-wide jitted train step used by :func:`train`, and its trace counter.

    Returns ``(step_fn, trace_counter)``; ``trace_counter[0]`` counts how often
    ``step_fn`` was traced.  Calls whose configs differ only in fields that do
    not change the computation (``steps``, checkpoint/log/sample intervals,
    ``seed``; see :data:`~pixeldit.training.config.RESUME_FREE_TRAIN_FIELDS`) share one compiled step, so
    a run and its resumption in the same process do not recompile and stay
    bit-identical.  ``step_fn`` donates its state argument.
    """
    compute_dtype = compute_dtype or train_config.compute_dtype or "float32"
    return _cached_train_step(graphdef, numerics_key(train_config, seed=0), compute_dtype)


def make_sharded_train_step(
    graphdef: Any,
    train_config: TrainConfig,
    shardings: TrainState,
    mesh: Mesh,
    *,
    tx: optax.GradientTransformation | None = None,
    compute_dtype: str | None = None,
    on_trace: Callable[[], None] | None = None,
):
    """``jax.jit`` of the pure train step with explicit layouts and the state donated.

    ``in_shardings=(shardings, batch_sharding(mesh))``, ``out_shardings=
    (shardings, replicated)`` (metrics are replicated scalars, readable on
    every host).  ``shardings`` comes from :func:`state_shardings`.  When the
    parameter vector is split (FSDP), the step gathers it once and
    all-reduces its gradient (:func:`pixeldit.flat.gather`).
    """
    split = shardings.flat_params.spec != P()
    fn = make_train_step_fn(
        graphdef, train_config, tx=tx, compute_dtype=compute_dtype, on_trace=on_trace,
        gather_params=(replicated(mesh), shardings.flat_params) if split else None,
    )
    return jax.jit(
        fn,
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )


def shared_sharded_train_step(
    state: TrainState,
    train_config: TrainConfig,
    mesh: Mesh,
    fsdp: bool = False,
    compute_dtype: str | None = None,
    *,
    min_shard_size: int = DEFAULT_MIN_SHARD_SIZE,
):
    """Process-wide sharded train step for ``state``'s structure on ``mesh``, and its trace counter.

    The sharded analogue of :func:`shared_train_step`: calls with configs that differ only in
    resume-free fields (including ``mesh`` and ``fsdp`` themselves: the layout comes from the
    arguments) share one compiled step.  Returns ``(step_fn, trace_counter)``; ``step_fn``
    donates its state argument.
    """
    compute_dtype = compute_dtype or train_config.compute_dtype or "float32"
    leaves, treedef = jax.tree.flatten(state)
    shapes = tuple((tuple(a.shape), str(a.dtype)) for a in leaves)
    train_key = numerics_key(train_config, seed=0)
    return _cached_sharded_step(treedef, shapes, train_key, compute_dtype, mesh, resolve_fsdp(mesh, fsdp), min_shard_size)


@functools.lru_cache(maxsize=8)
def _cached_sharded_step(treedef, shapes, train_key: TrainConfig, compute_dtype: str, mesh: Mesh, fsdp: bool,
                         min_shard_size: int):
    abstract = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    counter = [0]

    def on_trace():
        counter[0] += 1

    shardings = state_shardings(abstract, mesh, fsdp, min_shard_size=min_shard_size)
    step = make_sharded_train_step(abstract.graphdef, train_key, shardings, mesh, compute_dtype=compute_dtype, on_trace=on_trace)
    return step, counter

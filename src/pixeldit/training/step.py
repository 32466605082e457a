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
from pixeldit.repa import repa_loss
from pixeldit.training.config import COMPUTE_DTYPES, TrainConfig, numerics_key
from pixeldit.training.optim import clip_by_global_norm, lr_schedule, make_optimizer
from pixeldit.training.state import TrainState, projector_graphdef

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
    encoder_graphdef: Any = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """Pure (un-jitted) train step ``(state, batch[, encoder_state]) -> (new_state, metrics)``.

    ``batch`` is ``{"x": (B,H,W,C) float32, "y": condition (optional), "mask":
    (optional)}``; it may also carry ``"draws"`` (``t`` / ``noise`` / ``drop``, see
    :func:`pixeldit.flow.flow_matching_loss`) to replay a step whose random draws are known, e.g.
    a reference implementation's (the RNG still advances).  ``metrics`` holds float32 scalars ``loss``, ``grad_norm``
    (before clipping) and ``lr`` (used for this update).  ``compute_dtype``
    defaults to ``train_config.compute_dtype`` or float32; with bfloat16 the
    float32 master parameters are cast to bfloat16 inside the loss.
    ``on_trace`` is called each time the function is traced (retrace checks).
    ``gather_params=(full, shards)`` (FSDP, see :func:`pixeldit.flat.gather`):
    the parameter vector is gathered to sharding ``full`` before the forward
    pass and its gradient comes back in sharding ``shards``.

    REPA (``train_config.repa``): the frozen encoder is ``nnx.merge(encoder_graphdef,
    encoder_state)``, its weights an argument of the step (outside the optimiser and the EMA).
    It sees the raw image ``(x + 1) / 2`` in [0, 1] (the reference's ``raw_image``); the loss is
    ``flow + loss_weight * repa`` at the same t, the metrics add ``flow_loss`` and ``repa_loss``,
    and ``grad_norm`` / clipping cover the model and the projector together, as Lightning's
    ``gradient_clip_val`` clips all of a module's parameters.
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
    tc, repa = train_config, train_config.repa
    if repa is not None and encoder_graphdef is None:
        raise ValueError("a REPA train step needs the frozen encoder's graphdef (encoder_graphdef)")

    def train_step(state: TrainState, batch: dict, encoder_state: Any = None) -> tuple[TrainState, dict]:
        if on_trace is not None:
            on_trace()
        rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
        target = None if repa is None else _encoder_tokens(encoder_graphdef, encoder_state, batch["x"])
        loss_fn = _loss_fn(graphdef, tc, state, batch, key, target, cast_dtype, gather_params)
        # one vector each for the parameters, gradients, moments and EMA (pixeldit.flat)
        proj = None if repa is None else state.repa["params"]
        (loss, parts), (grads, proj_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            state.flat_params, proj
        )
        grad_norm = optax.tree.norm((grads, proj_grads))
        if repa is not None and tc.grad_clip is not None:
            # clip model and projector jointly; tx's own clipping then sees norms <= grad_clip (a no-op)
            grads, proj_grads = clip_by_global_norm(tc.grad_clip).update((grads, proj_grads), None)[0]
        updates, opt_state = tx.update(grads, state.opt_state, state.flat_params)
        params = optax.apply_updates(state.flat_params, updates)
        new_repa = None if repa is None else _projector_update(tx, state.repa, proj_grads)
        new_state = state.replace(
            step=state.step + 1,
            flat_params=params,
            flat_ema=decay * state.flat_ema + (1.0 - decay) * params,
            opt_state=opt_state,
            rng=jax.random.key_data(rng),
            repa=new_repa,
        )
        metrics = {
            "loss": loss.astype(jnp.float32),
            "grad_norm": grad_norm.astype(jnp.float32),
            "lr": jnp.asarray(schedule(state.step), jnp.float32),
            **{k: v.astype(jnp.float32) for k, v in parts.items()},
        }
        return new_state, metrics

    return train_step


def _projector_update(tx: optax.GradientTransformation, repa_state: dict, grads: Any) -> dict:
    """The REPA projector's step: the model's AdamW settings, no EMA."""
    updates, opt_state = tx.update(grads, repa_state["opt_state"], repa_state["params"])
    return {"params": optax.apply_updates(repa_state["params"], updates), "opt_state": opt_state}


def _encoder_tokens(encoder_graphdef: Any, encoder_state: Any, x: jax.Array) -> jax.Array:
    """The frozen REPA encoder's tokens of the raw images ``(x + 1) / 2`` in [0, 1]."""
    raw = (x + 1.0) / 2.0
    if raw.shape[-1] == 1:  # a grayscale image, shown to the RGB encoder as grey RGB
        raw = jnp.repeat(raw, 3, axis=-1)
    return nnx.merge(encoder_graphdef, encoder_state)(raw)


def _loss_fn(graphdef, tc: TrainConfig, state: TrainState, batch: dict, key, target, cast_dtype, gather_params):
    """``(flat_params, projector_params) -> (loss, loss parts)``: the flow loss, plus REPA's at the same t."""
    repa = tc.repa

    def cast(tree):
        return tree if cast_dtype is None else jax.tree.map(lambda a: a.astype(cast_dtype), tree)

    def loss_fn(flat_params, proj_params):
        if gather_params is not None:
            flat_params = gather(flat_params, *gather_params)
        model = nnx.merge(graphdef, state.layout.unflatten(cast(flat_params)), state.model_state)
        loss, aux = flow.flow_matching_loss(
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
            tokens_after=None if repa is None else repa.align_layer,
            draws=batch.get("draws"),
        )
        if repa is None:
            return loss, {}
        projector = nnx.merge(projector_graphdef(model.config.hidden_size, repa), cast(proj_params))
        align = repa_loss(repa, projector, aux["tokens"], target)
        return loss + repa.loss_weight * align, {"flow_loss": loss, "repa_loss": align}

    return loss_fn


def make_train_step(
    graphdef: Any,
    train_config: TrainConfig,
    *,
    tx: optax.GradientTransformation | None = None,
    compute_dtype: str | None = None,
    on_trace: Callable[[], None] | None = None,
    encoder_graphdef: Any = None,
):
    """``jax.jit`` of :func:`make_train_step_fn` with the state donated (argnum 0).

    Compiled once per batch shape/dtype structure; the caller must not reuse
    the ``state`` passed in after the call.
    """
    fn = make_train_step_fn(graphdef, train_config, tx=tx, compute_dtype=compute_dtype, on_trace=on_trace,
                            encoder_graphdef=encoder_graphdef)
    return jax.jit(fn, donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _cached_train_step(graphdef: Any, train_key: TrainConfig, compute_dtype: str, encoder_graphdef: Any = None):
    counter = [0]

    def on_trace():
        counter[0] += 1

    step = make_train_step(graphdef, train_key, compute_dtype=compute_dtype, on_trace=on_trace,
                           encoder_graphdef=encoder_graphdef)
    return step, counter


def shared_train_step(graphdef: Any, train_config: TrainConfig, compute_dtype: str | None = None,
                      encoder_graphdef: Any = None):
    """The process-wide jitted train step used by :func:`train`, and its trace counter.

    Returns ``(step_fn, trace_counter)``; ``trace_counter[0]`` counts how often
    ``step_fn`` was traced.  Calls whose configs differ only in fields that do
    not change the computation (``steps``, checkpoint/log/sample intervals,
    ``seed``; see :data:`~pixeldit.training.config.RESUME_FREE_TRAIN_FIELDS`) share one compiled step, so
    a run and its resumption in the same process do not recompile and stay
    bit-identical.  ``step_fn`` donates its state argument; with REPA it takes the encoder's
    weights as a third argument (``encoder_graphdef`` is the encoder's static part).
    """
    compute_dtype = compute_dtype or train_config.compute_dtype or "float32"
    return _cached_train_step(graphdef, numerics_key(train_config, seed=0), compute_dtype, encoder_graphdef)


def make_sharded_train_step(
    graphdef: Any,
    train_config: TrainConfig,
    shardings: TrainState,
    mesh: Mesh,
    *,
    tx: optax.GradientTransformation | None = None,
    compute_dtype: str | None = None,
    on_trace: Callable[[], None] | None = None,
    encoder_graphdef: Any = None,
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
        gather_params=(replicated(mesh), shardings.flat_params) if split else None, encoder_graphdef=encoder_graphdef,
    )
    encoder = (replicated(mesh),) if encoder_graphdef is not None else ()  # REPA: the frozen encoder, replicated
    return jax.jit(
        fn,
        in_shardings=(shardings, batch_sharding(mesh), *encoder),
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
    encoder_graphdef: Any = None,
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
    return _cached_sharded_step(treedef, shapes, train_key, compute_dtype, mesh, resolve_fsdp(mesh, fsdp), min_shard_size,
                                encoder_graphdef)


@functools.lru_cache(maxsize=8)
def _cached_sharded_step(treedef, shapes, train_key: TrainConfig, compute_dtype: str, mesh: Mesh, fsdp: bool,
                         min_shard_size: int, encoder_graphdef: Any = None):
    abstract = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    counter = [0]

    def on_trace():
        counter[0] += 1

    shardings = state_shardings(abstract, mesh, fsdp, min_shard_size=min_shard_size)
    step = make_sharded_train_step(abstract.graphdef, train_key, shardings, mesh, compute_dtype=compute_dtype,
                                   on_trace=on_trace, encoder_graphdef=encoder_graphdef)
    return step, counter

"""Training: train state, jitted train step, checkpointing and the training loop.

Design
------
* The model is split once with ``nnx.split(model, nnx.Param, ...)`` into a
  static ``graphdef``, the trainable parameters and the remaining (non-trainable)
  variables.  :class:`TrainState` is a pytree of arrays only (the graphdef is a
  static field), so it can be passed through ``jax.jit`` with
  ``in_shardings``/``out_shardings`` for data-parallel / FSDP training later.
* :func:`make_train_step_fn` builds the pure step ``(state, batch) -> (state,
  metrics)``; :func:`make_train_step` compiles it once with ``jax.jit`` and
  ``donate_argnums=0`` (the old state's buffers are reused).
* Sharded training (``TrainConfig.mesh``/``fsdp``: data parallel, FSDP,
  multi-host) jits the same pure step with ``in_shardings``/``out_shardings``
  on a device mesh; see :mod:`pixeldit.parallel`.  Checkpoints do not depend
  on the mesh they were written from.
* Master weights, the EMA and the AdamW moments are float32 and stored flat,
  one vector each (:mod:`pixeldit.flat`: the optimiser and EMA then compile to
  a handful of kernels); ``state.params`` / ``state.ema_params`` are the
  per-leaf ``nnx.State`` views, and checkpoints hold per-leaf trees.
* With a bfloat16 compute dtype the float32 parameters are cast to bfloat16 inside the loss
  (gradients therefore arrive in float32); activations follow the model
  config's ``dtype``.
* Checkpoints are written with orbax ``CheckpointManager`` (synchronously).  On
  a local filesystem orbax writes every step into
  ``<step>.orbax-checkpoint-tmp-<timestamp>/`` and only renames it to
  ``<step>/`` after every item (and ``commit_success.txt``) has been written, so
  a crash mid-save leaves at most a temporary directory, which is ignored when
  looking for the latest step and deleted when the manager is next opened
  (``cleanup_tmp_directories=True``).  Old steps beyond ``keep_checkpoints``
  are deleted only after a newer step has been committed.

Checkpoint layout (``workdir`` given to :func:`train`)::

    workdir/
      config.json          # model config + train config + dataset description
      metrics.jsonl        # one JSON object per logged step
      checkpoints/
        <step>/            # e.g. 1000/; committed atomically by rename
          params/          # float32 master weights, per-leaf nnx.State tree (orbax PyTree, OCDBT)
          ema_params/      # float32 EMA weights, same tree
          opt_state/       # optax state of chain(clip_by_global_norm, adamw), moments as same tree
          extra/           # {"step", "rng" (raw uint32 key data), "model_state"}
          meta/            # JSON: model_config, train_config, dataset, step
          _CHECKPOINT_METADATA, commit_success.txt

The data stream is not stored: datasets are deterministic in ``(seed, step)``
and the step in ``extra`` is the position.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct

from pixeldit import flow
from pixeldit.flat import ParamLayout, gather

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_SUBDIR",
    "IncompatibleCheckpointError",
    "NonFiniteLossError",
    "RESUME_FREE_MODEL_FIELDS",
    "RESUME_FREE_TRAIN_FIELDS",
    "TrainConfig",
    "TrainState",
    "abstract_train_state",
    "check_compatible",
    "checkpoint_items",
    "checkpoint_manager",
    "create_train_state",
    "describe_dataset",
    "ema_model",
    "effective_model_config",
    "latest_checkpoint_step",
    "load_checkpoint",
    "lr_schedule",
    "make_optimizer",
    "make_train_step",
    "make_train_step_fn",
    "prepare_batch",
    "read_checkpoint_meta",
    "read_metrics",
    "restore_train_state",
    "save_train_state",
    "shared_train_step",
    "train",
    "train_model",
]

CHECKPOINT_SUBDIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
COMPUTE_DTYPES = ("float32", "bfloat16")

#: TrainConfig fields that may change between a checkpoint and a resumed run
#: (they do not affect the optimisation trajectory or the state's structure).
RESUME_FREE_TRAIN_FIELDS = frozenset(
    {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "remat", "mesh", "fsdp"}
)
#: Model config fields that may change on resume (memory/compute trade-offs only).
RESUME_FREE_MODEL_FIELDS = frozenset({"remat", "scan_unroll"})


# --------------------------------------------------------------------------- #
# Config
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (frozen, validated, JSON round-trippable).

    Attributes:
      batch_size: global batch size.
      steps: total number of optimiser steps to reach (a resumed run continues
        until ``steps``).
      lr: peak AdamW learning rate (constant after warm-up).
      weight_decay: AdamW decoupled weight decay (applied to all parameters).
      betas: AdamW (beta1, beta2).
      adam_eps: AdamW epsilon.
      warmup_steps: linear warm-up length; lr at update ``i`` (0-based) is
        ``lr * min(1, (i + 1) / warmup_steps)``.
      grad_clip: global-norm gradient clipping threshold; ``None`` disables.
      ema_decay: EMA decay, ``ema <- decay * ema + (1 - decay) * params`` after
        every step.
      p_uncond: probability of dropping the condition (classifier-free guidance).
      time_distribution, time_mean, time_std, time_shift: training-time
        distribution, see :func:`pixeldit.flow.sample_time`.
      seed: seed for parameter initialisation and the training RNG stream.
      checkpoint_every: save a checkpoint every this many steps.
      keep_checkpoints: number of most recent checkpoints kept on disk.
      log_every: append a metrics line every this many steps.
      sample_every: call the sample callbacks every this many steps (0: never).
      compute_dtype: overrides the model config's ``dtype`` ("float32" or
        "bfloat16"); ``None`` keeps the model config's.
      remat: overrides the model config's ``remat``; ``None`` keeps it.
      mesh: device mesh spec for sharded training, e.g. ``"data"`` (data
        parallel on every device), ``"data:4"``, ``"fsdp:8"``,
        ``"data:2,fsdp:2"`` (see :mod:`pixeldit.parallel`); an int ``n`` means
        ``"data:n"``.  ``None`` (default): the unsharded single-device step.
      fsdp: shard parameters, EMA and optimiser moments over the mesh (FSDP)
        instead of replicating them; implied by a mesh with an ``fsdp`` axis.
        ``mesh`` and ``fsdp`` may change when resuming.
    """

    batch_size: int = 32
    steps: int = 10_000
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.9999
    p_uncond: float = 0.1
    time_distribution: str = "logit_normal"
    time_mean: float = 0.0
    time_std: float = 1.0
    time_shift: float = 1.0
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    sample_every: int = 0
    compute_dtype: str | None = None
    remat: bool | None = None
    mesh: str | None = None
    fsdp: bool = False

    def __post_init__(self):
        betas = tuple(float(b) for b in self.betas)
        object.__setattr__(self, "betas", betas)
        if isinstance(self.mesh, int) and not isinstance(self.mesh, bool):
            object.__setattr__(self, "mesh", f"data:{self.mesh}")
        errors = []

        def need(cond, msg):
            if not cond:
                errors.append(msg)

        for name in ("batch_size", "steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
        for name in ("warmup_steps", "sample_every", "seed"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name} must be an int >= 0, got {v!r}")
        need(not isinstance(self.seed, int) or self.seed < 2**31, f"seed must be < 2**31, got {self.seed!r}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), f"betas must be two floats in [0, 1), got {self.betas!r}")
        need(self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps!r}")
        need(self.grad_clip is None or (math.isfinite(self.grad_clip) and self.grad_clip > 0),
             f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        need(0.0 <= self.ema_decay <= 1.0, f"ema_decay must be in [0, 1], got {self.ema_decay!r}")
        need(0.0 <= self.p_uncond <= 1.0, f"p_uncond must be in [0, 1], got {self.p_uncond!r}")
        need(self.time_distribution in flow.TIME_DISTRIBUTIONS,
             f"time_distribution must be one of {flow.TIME_DISTRIBUTIONS}, got {self.time_distribution!r}")
        need(math.isfinite(self.time_mean), f"time_mean must be finite, got {self.time_mean!r}")
        need(self.time_std > 0, f"time_std must be > 0, got {self.time_std!r}")
        need(self.time_shift > 0, f"time_shift must be > 0, got {self.time_shift!r}")
        need(self.compute_dtype is None or self.compute_dtype in COMPUTE_DTYPES,
             f"compute_dtype must be one of {COMPUTE_DTYPES} or None, got {self.compute_dtype!r}")
        need(self.remat is None or isinstance(self.remat, bool) or self.remat == "dots",
             f"remat must be None, true, false or \"dots\", got {self.remat!r}")
        need(isinstance(self.fsdp, bool), f"fsdp must be a bool, got {self.fsdp!r}")
        if self.mesh is not None:
            from pixeldit.parallel import validate_mesh_spec

            try:
                need(isinstance(self.mesh, str), f"mesh must be a string like 'data:4' or None, got {self.mesh!r}")
                if isinstance(self.mesh, str):
                    validate_mesh_spec(self.mesh)
            except ValueError as e:
                errors.append(f"mesh: {e}")
        if errors:
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of all fields."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Rebuild from :meth:`to_dict` output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**dict(d))


def effective_model_config(model_config: Any, train_config: TrainConfig) -> Any:
    """Model config with the train config's ``compute_dtype``/``remat`` overrides applied."""
    changes = {}
    if train_config.compute_dtype is not None:
        changes["dtype"] = train_config.compute_dtype
    if train_config.remat is not None:
        changes["remat"] = train_config.remat
    return dataclasses.replace(model_config, **changes) if changes else model_config


# --------------------------------------------------------------------------- #
# Optimiser and state
# --------------------------------------------------------------------------- #


def lr_schedule(train_config: TrainConfig) -> optax.Schedule:
    """Linear warm-up to ``lr`` then constant: ``lr * min(1, (count + 1) / warmup)``."""
    lr, warmup = float(train_config.lr), int(train_config.warmup_steps)
    if warmup <= 0:
        return optax.constant_schedule(lr)

    def schedule(count):
        return lr * jnp.minimum(1.0, (jnp.asarray(count, jnp.float32) + 1.0) / warmup)

    return schedule


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` written as one scalar factor, ``g * min(1, max_norm / |g|)``.

    Same result (up to rounding) and the same (empty) state as optax's, whose
    ``select(|g| < max_norm, g, g / |g| * max_norm)`` makes XLA write the clipped gradient out
    as one more vector that both moment updates then read beside the unclipped one; a scalar
    factor fuses into them.  On the 2-core CPU with the 39.7M ``s8-64`` vectors, AdamW + clipping
    + EMA took 126 ms instead of 159-162 ms (docs/PERF_NOTES.md, session 5).
    """

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train_config: TrainConfig) -> optax.GradientTransformation:
    """``optax.chain(clip_by_global_norm(grad_clip), adamw(warm-up schedule, ...))``."""
    parts = []
    if train_config.grad_clip is not None:
        parts.append(clip_by_global_norm(train_config.grad_clip))
    b1, b2 = train_config.betas
    parts.append(
        optax.adamw(
            lr_schedule(train_config),
            b1=b1,
            b2=b2,
            eps=train_config.adam_eps,
            weight_decay=train_config.weight_decay,
        )
    )
    return optax.chain(*parts)


@struct.dataclass
class TrainState:
    """Everything that evolves during training, as a pytree of arrays.

    The master weights, their EMA and the AdamW moments are stored flat: one
    float32 vector each, laid out by the static ``layout``
    (:class:`pixeldit.flat.ParamLayout`; this keeps the optimiser to a handful of
    XLA kernels, see :mod:`pixeldit.flat`).  :attr:`params` and
    :attr:`ema_params` give the per-leaf ``nnx.State`` views the model uses.
    ``graphdef`` and ``layout`` are static (part of the tree structure, not
    leaves).  ``rng`` is raw ``uint32`` key data (``jax.random.key_data``) so it
    can be checkpointed.
    """

    step: jax.Array
    flat_params: jax.Array
    flat_ema: jax.Array
    opt_state: Any
    rng: jax.Array
    model_state: nnx.State
    graphdef: Any = struct.field(pytree_node=False)
    layout: ParamLayout = struct.field(pytree_node=False)

    @property
    def params(self) -> nnx.State:
        """Per-leaf float32 master weights (slices of ``flat_params``: a copy outside ``jit``)."""
        return self.layout.unflatten(self.flat_params)

    @property
    def ema_params(self) -> nnx.State:
        """Per-leaf float32 EMA weights (slices of ``flat_ema``)."""
        return self.layout.unflatten(self.flat_ema)


def _build_model(model_config: Any, seed: int):
    from pixeldit.model import build_model

    return build_model(model_config, rngs=nnx.Rngs(seed))


def _state_from_model(
    model: nnx.Module, train_config: TrainConfig, tx: optax.GradientTransformation, seed, pad_multiple: int = 1
) -> TrainState:
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    layout = ParamLayout.of(params, pad_multiple)
    flat = layout.flatten(params)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        flat_params=flat,
        flat_ema=jnp.copy(flat),
        opt_state=tx.init(flat),
        rng=rng,
        model_state=model_state,
        graphdef=graphdef,
        layout=layout,
    )


def _numerics_key(train_config: TrainConfig, **extra_free) -> TrainConfig:
    """``train_config`` with the fields that do not affect the compiled step reset to defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    free = {name: defaults[name] for name in RESUME_FREE_TRAIN_FIELDS}
    free.update(extra_free)
    return dataclasses.replace(train_config, **free)


@functools.lru_cache(maxsize=8)
def _jitted_init(model_config: Any, train_key: TrainConfig, pad_multiple: int):
    from pixeldit.model import build_model

    tx = make_optimizer(train_key)

    def init(seed):
        model = build_model(model_config, rngs=nnx.Rngs(jax.random.key(seed)))
        return _state_from_model(model, train_key, tx, seed, pad_multiple)

    return jax.jit(init)


def _init_fn(model_config: Any, train_config: TrainConfig, pad_multiple: int = 1):
    """The cached jitted initialiser ``seed -> TrainState`` for ``train_config``.

    The optimiser state's structure only depends on whether clipping is on, so every other
    train-config field shares one compiled initialiser.
    """
    key = TrainConfig(grad_clip=None) if train_config.grad_clip is None else TrainConfig()
    return _jitted_init(model_config, key, pad_multiple)


def create_train_state(
    model_config: Any,
    train_config: TrainConfig,
    *,
    model: nnx.Module | None = None,
    tx: optax.GradientTransformation | None = None,
    pad_multiple: int = 1,
) -> TrainState:
    """Initialise a :class:`TrainState`.

    Without ``model``, the model is ``build_model(model_config,
    rngs=nnx.Rngs(train_config.seed))`` built inside one (cached) ``jax.jit``
    together with the optimiser state (equal to an eager build up to float
    rounding of the initialisers).  ``model`` may be given to use an
    already-built module (e.g. a custom one); it is split, not copied.
    Parameters are promoted to float32 master weights, stored flat and padded
    to a multiple of ``pad_multiple`` elements (see :mod:`pixeldit.flat`); the
    EMA starts as a copy of the parameters; the training RNG is
    ``fold_in(key(seed), 1)``.
    """
    if model is None and tx is None:
        return _init_fn(model_config, train_config, pad_multiple)(jnp.asarray(train_config.seed, jnp.int32))
    tx = tx if tx is not None else make_optimizer(train_config)
    if model is None:
        model = _build_model(model_config, train_config.seed)
    return _state_from_model(model, train_config, tx, train_config.seed, pad_multiple)


def abstract_train_state(model_config: Any, train_config: TrainConfig, *, model_fn=None, pad_multiple: int = 1) -> TrainState:
    """Shape/dtype skeleton of :func:`create_train_state` (no allocation).

    Leaves are ``jax.ShapeDtypeStruct`` with a single-device sharding; replace
    the shardings to restore a checkpoint directly into a sharded layout.
    """
    def make():
        model = model_fn() if model_fn is not None else None
        return create_train_state(model_config, train_config, model=model, pad_multiple=pad_multiple)

    abstract = jax.eval_shape(make)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)


def train_model(state: TrainState) -> nnx.Module:
    """Model with the current (non-EMA) parameters of ``state``.

    Its parameters are copies (cut from the flat vector), but its
    non-trainable variables share ``state.model_state``'s buffers: do not use
    it after ``state`` has been donated to the next train step.
    """
    return nnx.merge(state.graphdef, state.params, state.model_state)


def ema_model(state: TrainState) -> nnx.Module:
    """Model with the EMA parameters of ``state`` (for sampling/eval).

    Its parameters are copies (cut from the flat vector), but its
    non-trainable variables share ``state.model_state``'s buffers: do not use
    it after ``state`` has been donated to the next train step (copy it with
    ``nnx.clone`` if needed).
    """
    return nnx.merge(state.graphdef, state.ema_params, state.model_state)


# --------------------------------------------------------------------------- #
# Train step
# --------------------------------------------------------------------------- #


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
    ``seed``; see :data:`RESUME_FREE_TRAIN_FIELDS`) share one compiled step, so
    a run and its resumption in the same process do not recompile and stay
    bit-identical.  ``step_fn`` donates its state argument.
    """
    compute_dtype = compute_dtype or train_config.compute_dtype or "float32"
    return _cached_train_step(graphdef, _numerics_key(train_config, seed=0), compute_dtype)


def prepare_batch(batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Convert a dataset batch to device arrays with stable dtypes.

    ``x`` -> float32; integer ``y`` -> int32, floating ``y`` -> float32; ``y``
    absent or None -> no ``"y"`` key (unconditional); ``mask`` kept if present.
    """
    out = {"x": jnp.asarray(batch["x"], jnp.float32)}
    y = batch.get("y")
    if y is not None:
        y = np.asarray(y)
        if np.issubdtype(y.dtype, np.integer):
            out["y"] = jnp.asarray(y, jnp.int32)
        elif np.issubdtype(y.dtype, np.bool_):
            out["y"] = jnp.asarray(y)
        else:
            out["y"] = jnp.asarray(y, jnp.float32)
    if batch.get("mask") is not None:
        out["mask"] = jnp.asarray(batch["mask"])
    return out


# --------------------------------------------------------------------------- #
# Checkpointing
# --------------------------------------------------------------------------- #


class IncompatibleCheckpointError(ValueError):
    """A checkpoint was written with settings that conflict with the requested run."""

    def __init__(self, message: str, differences: Sequence[str]):
        super().__init__(message)
        self.differences = list(differences)


class NonFiniteLossError(FloatingPointError):
    """Loss or gradient norm became NaN/inf; ``step`` is the failing step number."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _json_roundtrip(d: Any) -> Any:
    return json.loads(json.dumps(d, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def describe_dataset(dataset: Any) -> dict[str, Any]:
    """JSON description of a dataset: ``metadata()``/``describe()``/``to_dict()``, else its class (and custom repr)."""
    for name in ("metadata", "describe", "to_dict"):
        fn = getattr(dataset, name, None)
        if callable(fn):
            return _json_roundtrip(dict(fn()))
    desc = {"class": f"{type(dataset).__module__}.{type(dataset).__qualname__}"}
    if type(dataset).__repr__ is not object.__repr__:  # a custom repr; the default one holds an address
        desc["repr"] = repr(dataset)
    return desc


def checkpoint_manager(workdir: str | os.PathLike, *, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """Open the orbax ``CheckpointManager`` of ``workdir/checkpoints``.

    Synchronous saves, ``max_to_keep=keep``; leftover temporary directories of
    interrupted saves are deleted on open (unless ``read_only``).
    """
    directory = Path(workdir).absolute() / CHECKPOINT_SUBDIR
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(
        directory,
        item_names=("params", "ema_params", "opt_state", "extra", "meta"),
        options=options,
    )


def _extra(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "rng": state.rng, "model_state": state.model_state}


def _leaf_sharding(flat_sharding: Any):
    """Sharding of each per-leaf array cut from a flat vector laid out with ``flat_sharding``.

    A vector split over mesh axes gives leaves split over the same axes as FSDP
    would (:func:`pixeldit.parallel.param_spec`), so converting between the two
    forms never gathers a whole quantity on one device; otherwise the leaves
    keep the vector's (replicated or single-device) sharding.
    """
    spec = getattr(flat_sharding, "spec", None)
    if not spec or spec[0] is None:
        return lambda shape: flat_sharding
    from pixeldit.parallel import param_spec

    mesh, axes = flat_sharding.mesh, spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    n = math.prod(mesh.shape[a] for a in axes)
    return lambda shape: jax.sharding.NamedSharding(mesh, param_spec(shape, n, axes, min_size=0))


@functools.lru_cache(maxsize=32)
def _converter(layout: ParamLayout, flat_sharding: Any, to_tree: bool):
    leaf = _leaf_sharding(flat_sharding)
    if to_tree:
        return jax.jit(layout.unflatten, out_shardings=jax.tree.unflatten(layout.treedef, [leaf(s) for s in layout.shapes]))
    return jax.jit(layout.flatten, out_shardings=flat_sharding)


def _map_flat(layout: ParamLayout, fn, tree, *rest):
    """``tree`` with each flat vector ``a`` (see :meth:`ParamLayout.is_flat`) replaced by ``fn(a, *rest_at_a)``."""
    return jax.tree.map(lambda a, *r: fn(a, *r) if layout.is_flat(a) else (r[0] if r else a), tree, *rest)


def checkpoint_items(state: TrainState) -> dict[str, Any]:
    """The per-leaf trees a checkpoint stores: ``params``, ``ema_params``, ``opt_state``, ``extra``.

    Each flat vector (parameters, EMA, AdamW moments) is cut back into the
    model's ``nnx.State`` tree, so checkpoints do not depend on the flat layout,
    its padding or the mesh.
    """
    def tree(flat):
        return _converter(state.layout, flat.sharding, True)(flat)

    return {
        "params": tree(state.flat_params),
        "ema_params": tree(state.flat_ema),
        "opt_state": _map_flat(state.layout, tree, state.opt_state),
        "extra": _extra(state),
    }


def save_train_state(mngr: ocp.CheckpointManager, state: TrainState, meta: Mapping[str, Any]) -> int:
    """Save ``state`` (+ JSON ``meta``) at ``int(state.step)``; blocks until committed.

    Returns the step.  A step that already exists is left untouched.  The
    parameters, EMA and optimiser moments are written as per-leaf trees
    (:func:`checkpoint_items`); converting them briefly holds a second copy of
    each.
    """
    step = int(jax.device_get(state.step))
    if step in mngr.all_steps():
        return step
    meta = _json_roundtrip(dict(meta, step=step))
    items = checkpoint_items(state)
    mngr.save(
        step,
        args=ocp.args.Composite(
            **{k: ocp.args.StandardSave(v) for k, v in items.items()},
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )
    mngr.wait_until_finished()
    return step


def restore_train_state(mngr: ocp.CheckpointManager, step: int, abstract_state: TrainState) -> TrainState:
    """Restore a full :class:`TrainState` at ``step`` into ``abstract_state``'s layout.

    Each per-leaf tree is read in the layout its flat vector will have (split
    over the same mesh axes) and then flattened on the devices.
    """
    layout = abstract_state.layout

    def target(a):  # per-leaf restore target of the flat vector ``a``
        return layout.abstract_tree(a.dtype, _leaf_sharding(a.sharding))

    r = mngr.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target(abstract_state.flat_params)),
            ema_params=ocp.args.StandardRestore(target(abstract_state.flat_ema)),
            opt_state=ocp.args.StandardRestore(_map_flat(layout, target, abstract_state.opt_state)),
            extra=ocp.args.StandardRestore(_extra(abstract_state)),
        ),
    )

    def flat(a, tree):
        return _converter(layout, a.sharding, False)(tree)

    return abstract_state.replace(
        step=r.extra["step"],
        flat_params=flat(abstract_state.flat_params, r.params),
        flat_ema=flat(abstract_state.flat_ema, r.ema_params),
        opt_state=_map_flat(layout, flat, abstract_state.opt_state, r.opt_state),
        rng=r.extra["rng"],
        model_state=r.extra["model_state"],
    )


def _read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def latest_checkpoint_step(workdir: str | os.PathLike) -> int | None:
    """Latest committed checkpoint step in ``workdir`` (None if there is none)."""
    if not (Path(workdir) / CHECKPOINT_SUBDIR).exists():
        return None
    with checkpoint_manager(workdir, read_only=True) as mngr:
        return mngr.latest_step()


def read_checkpoint_meta(workdir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """JSON metadata (model_config, train_config, dataset, step) of a checkpoint."""
    if not (Path(workdir) / CHECKPOINT_SUBDIR).exists():
        raise FileNotFoundError(f"no checkpoints in {workdir}")
    with checkpoint_manager(workdir, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoints in {workdir}")
        return _read_meta(mngr, step)


def _diff_dicts(prefix: str, old: Mapping, new: Mapping, ignore: Iterable[str] = ()) -> list[str]:
    ignore = set(ignore)
    missing = "<missing>"
    out = []
    for k in sorted(set(old) | set(new), key=str):
        if k in ignore:
            continue
        o, n = old.get(k, missing), new.get(k, missing)
        if o != n:
            out.append(f"{prefix}.{k}: checkpoint={o!r} requested={n!r}")
    return out


def check_compatible(saved_meta: Mapping[str, Any], new_meta: Mapping[str, Any], *, check_dataset: bool = True) -> None:
    """Raise :class:`IncompatibleCheckpointError` listing every differing field.

    Compares the model configs (except :data:`RESUME_FREE_MODEL_FIELDS`), the
    train configs (except :data:`RESUME_FREE_TRAIN_FIELDS`) and, if
    ``check_dataset``, the dataset descriptions.
    """
    saved, new = _json_roundtrip(dict(saved_meta)), _json_roundtrip(dict(new_meta))
    diffs = _diff_dicts("model", saved.get("model_config", {}), new.get("model_config", {}), RESUME_FREE_MODEL_FIELDS)
    diffs += _diff_dicts("train", saved.get("train_config", {}), new.get("train_config", {}), RESUME_FREE_TRAIN_FIELDS)
    if check_dataset:
        so, no = saved.get("dataset"), new.get("dataset")
        if isinstance(so, dict) and isinstance(no, dict):
            diffs += _diff_dicts("dataset", so, no)
        elif so != no:
            diffs.append(f"dataset: checkpoint={so!r} requested={no!r}")
    if diffs:
        msg = (
            f"checkpoint (step {saved.get('step')}) was written with an incompatible configuration; "
            "differing fields:\n  " + "\n  ".join(diffs)
            + "\nUse a fresh workdir or the checkpoint's settings."
        )
        raise IncompatibleCheckpointError(msg, diffs)


def load_checkpoint(
    workdir: str | os.PathLike, step: int | None = None, ema: bool = True
) -> tuple[nnx.Module, Any, dict[str, Any]]:
    """Load a model from a training checkpoint for sampling/eval.

    Args:
      workdir: the directory given to :func:`train`.
      step: checkpoint step (default: latest).
      ema: load the EMA weights (default) or the raw training weights.

    Returns:
      ``(model, model_config, train_config_dict)``; the model config is the
      effective one used in training (compute dtype/remat overrides applied).
      Only the requested weights are read (not the optimiser state).
    """
    from pixeldit.model import build_model, config_from_dict

    if not (Path(workdir) / CHECKPOINT_SUBDIR).exists():
        raise FileNotFoundError(f"no checkpoints in {workdir}")
    with checkpoint_manager(workdir, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoints in {workdir}")
        if step not in mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {workdir}; available: {list(mngr.all_steps())}")
        meta = _read_meta(mngr, step)
        model_config = config_from_dict(meta["model_config"])
        abstract_model = nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0)))
        graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def sds(a, dtype=None):
            return jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=sharding)

        abs_params = jax.tree.map(lambda a: sds(a, jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else sds(a), abs_params)
        abs_extra = {
            "step": sds(jax.ShapeDtypeStruct((), jnp.int32)),
            "rng": sds(jax.ShapeDtypeStruct((2,), jnp.uint32)),
            "model_state": jax.tree.map(sds, abs_rest),
        }
        item = "ema_params" if ema else "params"
        r = mngr.restore(
            step,
            args=ocp.args.Composite(
                **{item: ocp.args.StandardRestore(abs_params)},
                extra=ocp.args.StandardRestore(abs_extra),
            ),
        )
    model = nnx.merge(graphdef, r[item], r.extra["model_state"])
    return model, model_config, meta["train_config"]


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Metrics history of a run: the records of ``workdir/metrics.jsonl`` in order."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # torn last line of a killed run
                    continue
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _truncate_metrics(workdir: Path, step: int) -> None:
    """Drop metric records after ``step`` (steps trained but never checkpointed)."""
    path = workdir / METRICS_FILE
    if not path.exists():
        return
    records = read_metrics(workdir)
    kept = [r for r in records if int(r.get("step", 0)) <= step]
    if len(kept) != len(records) or path.read_text().count("\n") != len(records):
        _atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


# --------------------------------------------------------------------------- #
# Training loop
# --------------------------------------------------------------------------- #


def _model_config_dict(cfg: Any) -> dict[str, Any]:
    return _json_roundtrip(cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg))


def _as_callbacks(callbacks) -> list[Callable]:
    if callbacks is None:
        return []
    if callable(callbacks):
        return [callbacks]
    return list(callbacks)


def train(
    model_config: Any,
    train_config: TrainConfig,
    dataset: Any,
    workdir: str | os.PathLike,
    *,
    callbacks: Callable[[int, nnx.Module], Any] | Sequence[Callable[[int, nnx.Module], Any]] | None = None,
    progress: bool = True,
    check_dataset: bool = True,
    model_fn: Callable[[], nnx.Module] | None = None,
) -> dict[str, Any]:
    """Train (or resume training) until ``train_config.steps``.

    If ``workdir/checkpoints`` holds a checkpoint, training resumes from the
    latest one after checking that its model config, train settings and
    dataset description match (:func:`check_compatible`; raises
    :class:`IncompatibleCheckpointError` listing each differing field).  Batch
    ``s`` (0-based) is ``dataset.get_batch(s, batch_size)`` and produces state
    step ``s + 1``, so resumed runs see the same data stream.

    Checkpoints are saved every ``checkpoint_every`` steps and at the end.  A
    non-finite loss or gradient norm raises :class:`NonFiniteLossError` naming
    the step, without saving (the last good checkpoint stays the latest).
    ``KeyboardInterrupt`` saves a checkpoint at the current step, then re-raises.

    Args:
      model_config: model config (``pixeldit.model`` config dataclass).
      train_config: :class:`TrainConfig`.
      dataset: object with ``get_batch(step, batch_size) -> {"x", "y"}``
        (deterministic in step) and ideally ``metadata()``.
      workdir: run directory (created if missing).
      callbacks: callable(s) ``cb(step, ema_model)`` invoked every
        ``sample_every`` steps.  The EMA model shares the training state's
        buffers and must not be kept after the callback returns.
      progress: show a tqdm progress bar (loss, steps/s, ETA).
      check_dataset: include the dataset description in the resume check.
      model_fn: optional zero-argument builder used instead of
        ``pixeldit.model.build_model(model_config, rngs=nnx.Rngs(seed))``.

    Sharding: with ``train_config.mesh`` set, the state is created (or
    restored, from a checkpoint of any layout) directly on that device mesh,
    data parallel or FSDP (``train_config.fsdp``), and every step runs the
    sharded, donated step of :func:`pixeldit.parallel.shared_sharded_train_step`
    on batches split by :func:`pixeldit.parallel.shard_batch`.  Multi-host
    runs are started by :func:`pixeldit.parallel.initialize_distributed`
    (environment variables); only process 0 writes ``config.json``, metrics
    and the progress bar.  Without a mesh the single-device path is unchanged.

    Returns:
      Summary dict: ``final_loss`` (loss of the last step run, None if no
      step ran), ``step`` (final step), ``start_step``, ``steps_run``,
      ``wall_time`` (s), ``steps_per_sec``, ``checkpoint_path`` (latest
      checkpoint directory), ``workdir``, ``losses`` (per-step losses of
      this call) and ``traces`` (times the train step was traced in this
      call: 1 on a cold start, 0 when an earlier call compiled it).
    """
    from tqdm.auto import tqdm

    tc = train_config
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = effective_model_config(model_config, tc)
    compute_dtype = getattr(cfg, "dtype", None) or "float32"
    meta = {
        "model_config": _model_config_dict(cfg),
        "train_config": tc.to_dict(),
        "dataset": describe_dataset(dataset),
    }
    cbs = _as_callbacks(callbacks)
    t_start = time.perf_counter()

    # Sharded training (pixeldit.parallel): a no-op unless the environment asks for multi-host.
    from pixeldit import parallel

    parallel.initialize_distributed()
    mesh_spec = tc.mesh
    if mesh_spec is None and jax.process_count() > 1:
        log.warning("multi-process run without train.mesh: using data parallelism over all %d devices", jax.device_count())
        mesh_spec = "data"
    mesh = parallel.make_mesh(mesh_spec) if mesh_spec is not None else None
    fsdp = parallel.resolve_fsdp(mesh, tc.fsdp) if mesh is not None else False
    if mesh is not None:
        parallel.check_batch_size(tc.batch_size, mesh)
        log.info("mesh %s, %s", dict(mesh.shape), "FSDP" if fsdp else "data parallel")
    is_main = jax.process_index() == 0  # writes config.json / metrics.jsonl / progress

    mngr = checkpoint_manager(workdir, keep=tc.keep_checkpoints)
    try:
        latest = mngr.latest_step()
        shardings = None
        if latest is not None:
            check_compatible(_read_meta(mngr, latest), meta, check_dataset=check_dataset)
            pad = parallel.fsdp_size(mesh, fsdp) if mesh is not None else 1
            abstract = abstract_train_state(cfg, tc, model_fn=model_fn, pad_multiple=pad)
            if mesh is not None:  # read each device's slice straight into the target layout
                shardings = parallel.state_shardings(abstract, mesh, fsdp)
                abstract = parallel.with_shardings(abstract, shardings)
            state = restore_train_state(mngr, latest, abstract)
            if is_main:
                _truncate_metrics(workdir, latest)
            log.info("resumed from %s at step %d", workdir / CHECKPOINT_SUBDIR / str(latest), latest)
        elif mesh is not None:
            state = parallel.create_sharded_train_state(cfg, tc, mesh, fsdp, model_fn=model_fn)
        elif model_fn is not None:
            state = create_train_state(cfg, tc, model=model_fn())
        else:
            state = create_train_state(cfg, tc)
        if is_main:
            _atomic_write_text(workdir / CONFIG_FILE, json.dumps(_json_roundtrip(meta), indent=2) + "\n")

        if mesh is None:
            # Commit every leaf to one explicit sharding so that fresh and restored states hit
            # the same compiled executable (uncommitted vs committed inputs compile separately).
            state = jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
            train_step, traces = shared_train_step(state.graphdef, tc, compute_dtype)
            put_batch = prepare_batch
        else:
            if shardings is None:
                shardings = parallel.state_shardings(state, mesh, fsdp)
            state = jax.device_put(state, shardings)  # no-op: already laid out
            train_step, traces = parallel.shared_sharded_train_step(state, tc, mesh, fsdp, compute_dtype)
            put_batch = functools.partial(parallel.shard_batch, mesh=mesh)
        start = int(jax.device_get(state.step))
        traces_before = traces[0]

        losses: list[float] = []
        last = {"loss": None}
        metrics_path = workdir / METRICS_FILE
        log_t, log_step = time.perf_counter(), start
        pbar = tqdm(
            total=tc.steps, initial=start, unit="step", disable=not (progress and is_main), dynamic_ncols=True, desc="train"
        )

        def last_good() -> str:
            s = mngr.latest_step()
            return f"latest checkpoint: step {s} ({mngr.directory / str(s)})" if s is not None else "no checkpoint saved"

        def finish(n: int, metrics) -> dict[str, float]:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])):
                raise NonFiniteLossError(
                    f"non-finite loss={host['loss']} / grad_norm={host['grad_norm']} at step {n} "
                    f"(data batch {n - 1}); stopped without saving; {last_good()}",
                    n,
                )
            losses.append(host["loss"])
            last["loss"] = host["loss"]
            pbar.update(1)
            return host

        def save() -> int:
            return save_train_state(mngr, state, meta)

        pending = None  # (step, device metrics) not yet checked: overlaps host work with the device
        try:
            for s in range(start, tc.steps):
                batch = put_batch(dataset.get_batch(s, tc.batch_size))
                state, metrics = train_step(state, batch)
                n = s + 1
                if pending is not None:
                    finish(*pending)
                pending = (n, metrics)
                do_log = n % tc.log_every == 0
                do_ckpt = n % tc.checkpoint_every == 0 or n == tc.steps
                do_sample = bool(cbs) and tc.sample_every > 0 and n % tc.sample_every == 0
                if not (do_log or do_ckpt or do_sample):
                    continue
                host = finish(*pending)
                pending = None
                if do_log and is_main:
                    now = time.perf_counter()
                    rec = {
                        "step": n,
                        "loss": host["loss"],
                        "grad_norm": host["grad_norm"],
                        "lr": host["lr"],
                        "steps_per_sec": (n - log_step) / max(now - log_t, 1e-9),
                        "time": now - t_start,
                        "timestamp": time.time(),
                    }
                    log_t, log_step = now, n
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    pbar.set_postfix(loss=f"{host['loss']:.4g}", refresh=False)
                if do_ckpt:
                    save()
                if do_sample:
                    em = ema_model(state)
                    for cb in cbs:
                        cb(n, em)
                    del em
            if pending is not None:
                finish(*pending)
                pending = None
            if traces[0] - traces_before > 1:
                warnings.warn(
                    f"the train step was traced {traces[0] - traces_before} times; check batch shapes/dtypes",
                    stacklevel=2,
                )
        except KeyboardInterrupt:
            try:
                if pending is not None:
                    finish(*pending)
                    pending = None
                step = save()
                log.warning("interrupted: saved checkpoint at step %d", step)
            except NonFiniteLossError as e:
                log.error("interrupted after a non-finite step; not saving: %s", e)
            except Exception as e:  # e.g. state buffers already donated
                log.error("interrupted: could not save a checkpoint: %s", e)
            raise
        finally:
            pbar.close()

        final_step = int(jax.device_get(state.step))
        if final_step > start:
            save()
        wall = time.perf_counter() - t_start
        latest = mngr.latest_step()
        return {
            "final_loss": last["loss"],
            "step": final_step,
            "start_step": start,
            "steps_run": final_step - start,
            "wall_time": wall,
            "steps_per_sec": (final_step - start) / max(wall, 1e-9),
            "checkpoint_path": str(mngr.directory / str(latest)) if latest is not None else None,
            "workdir": str(workdir),
            "losses": losses,
            "traces": traces[0] - traces_before,
        }
    finally:
        mngr.close()

"""The train state: flat float32 master weights, their EMA, the optimiser state and the RNG.

The model is split once with ``nnx.split(model, nnx.Param, ...)`` into a static ``graphdef``,
the trainable parameters and the remaining (non-trainable) variables.  :class:`TrainState` is a
pytree of arrays only (``graphdef`` and the flat ``layout`` are static fields), so it passes
through ``jax.jit`` with ``in_shardings``/``out_shardings`` (:mod:`pixeldit.parallel`).  Master
weights, the EMA and the AdamW moments are float32 and stored flat, one vector each
(:mod:`pixeldit.flat`: the optimiser and EMA then compile to a handful of kernels).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from pixeldit.flat import ParamLayout
from pixeldit.model import build_model
from pixeldit.parallel import DEFAULT_MIN_SHARD_SIZE, fsdp_size, state_shardings, with_shardings
from pixeldit.repa import REPAConfig, REPAProjector
from pixeldit.training.config import TrainConfig
from pixeldit.training.optim import make_optimizer

__all__ = [
    "TrainState",
    "abstract_sharded_state",
    "abstract_train_state",
    "create_sharded_train_state",
    "create_train_state",
    "ema_model",
    "train_model",
]


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
    can be checkpointed.  ``repa`` (REPA runs only, else ``None``) holds the alignment
    projector's float32 parameters and their AdamW state: ``{"params": nnx.State, "opt_state"}``
    (trained with the model, not averaged into the EMA).
    """

    step: jax.Array
    flat_params: jax.Array
    flat_ema: jax.Array
    opt_state: Any
    rng: jax.Array
    model_state: nnx.State
    graphdef: Any = struct.field(pytree_node=False)
    layout: ParamLayout = struct.field(pytree_node=False)
    repa: Any = None

    @property
    def params(self) -> nnx.State:
        """Per-leaf float32 master weights (slices of ``flat_params``: a copy outside ``jit``)."""
        return self.layout.unflatten(self.flat_params)

    @property
    def ema_params(self) -> nnx.State:
        """Per-leaf float32 EMA weights (slices of ``flat_ema``)."""
        return self.layout.unflatten(self.flat_ema)


@functools.lru_cache(maxsize=8)
def projector_graphdef(model_dim: int, repa: REPAConfig):
    """The static graphdef of the REPA projector of a model ``model_dim`` wide (its parameters live in ``state.repa``)."""
    return nnx.graphdef(nnx.eval_shape(lambda: REPAProjector.for_model(repa, model_dim, rngs=nnx.Rngs(0))))


def _repa_state(model: nnx.Module, repa: REPAConfig | None, tx: optax.GradientTransformation, seed) -> Any:
    """The projector's parameters (torch's Linear init, stream ``fold_in(key(seed), 2)``) and AdamW state."""
    if repa is None:
        return None
    rngs = nnx.Rngs(jax.random.fold_in(jax.random.key(seed), 2))
    params = nnx.state(REPAProjector.for_model(repa, model.config.hidden_size, rngs=rngs), nnx.Param)
    return {"params": params, "opt_state": tx.init(params)}


def _state_from_model(model: nnx.Module, tx: optax.GradientTransformation, seed, pad_multiple: int = 1,
                      repa: REPAConfig | None = None) -> TrainState:
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
        repa=_repa_state(model, repa, tx, seed),
    )


@functools.lru_cache(maxsize=8)
def _jitted_init(model_config: Any, clip: bool, pad_multiple: int, repa: REPAConfig | None = None):
    """The jitted initialiser ``seed -> TrainState``.

    The optimiser state's structure only depends on whether clipping is on, so every other
    train-config field shares one compiled initialiser.
    """
    tx = make_optimizer(TrainConfig() if clip else TrainConfig(grad_clip=None))

    def init(seed):
        model = build_model(model_config, rngs=nnx.Rngs(jax.random.key(seed)))
        return _state_from_model(model, tx, seed, pad_multiple, repa)

    return jax.jit(init)


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
        init = _jitted_init(model_config, train_config.grad_clip is not None, pad_multiple, train_config.repa)
        return init(jnp.asarray(train_config.seed, jnp.int32))
    tx = tx if tx is not None else make_optimizer(train_config)
    if model is None:
        model = build_model(model_config, rngs=nnx.Rngs(train_config.seed))
    return _state_from_model(model, tx, train_config.seed, pad_multiple, train_config.repa)


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


def abstract_sharded_state(
    model_config: Any,
    train_config: TrainConfig,
    mesh: Mesh,
    fsdp: bool = False,
    *,
    model_fn: Callable[[], Any] | None = None,
    min_shard_size: int = DEFAULT_MIN_SHARD_SIZE,
) -> TrainState:
    """Abstract train state laid out on ``mesh`` (restore target for any checkpoint of the run)."""
    abstract = abstract_train_state(model_config, train_config, model_fn=model_fn, pad_multiple=fsdp_size(mesh, fsdp))
    return with_shardings(abstract, state_shardings(abstract, mesh, fsdp, min_shard_size=min_shard_size))


@functools.lru_cache(maxsize=8)
def _jitted_sharded_init(model_config: Any, clip: bool, mesh: Mesh, fsdp: bool, min_shard_size: int,
                         repa: REPAConfig | None = None):
    train_config = TrainConfig(repa=repa) if clip else TrainConfig(grad_clip=None, repa=repa)
    pad = fsdp_size(mesh, fsdp)
    abstract = abstract_train_state(model_config, train_config, pad_multiple=pad)
    shardings = state_shardings(abstract, mesh, fsdp, min_shard_size=min_shard_size)
    # the same (cached, jitted) initialiser as create_train_state, nested in a jit with out_shardings
    return jax.jit(_jitted_init(model_config, clip, pad, repa), out_shardings=shardings)


def create_sharded_train_state(
    model_config: Any,
    train_config: TrainConfig,
    mesh: Mesh,
    fsdp: bool = False,
    *,
    model_fn: Callable[[], Any] | None = None,
    min_shard_size: int = DEFAULT_MIN_SHARD_SIZE,
) -> TrainState:
    """:func:`create_train_state` computed directly in its sharded layout on ``mesh``.

    The initialisation runs in one ``jax.jit`` with ``out_shardings``, so no
    device ever holds the whole state under FSDP; values equal the
    single-device initialisation (JAX's partitionable threefry RNG does not
    depend on the sharding).
    """
    if model_fn is None:
        init = _jitted_sharded_init(model_config, train_config.grad_clip is not None, mesh, bool(fsdp), min_shard_size,
                                    train_config.repa)
        return init(jnp.asarray(train_config.seed, jnp.int32))
    pad = fsdp_size(mesh, fsdp)
    abstract = abstract_train_state(model_config, train_config, model_fn=model_fn, pad_multiple=pad)
    shardings = state_shardings(abstract, mesh, fsdp, min_shard_size=min_shard_size)
    return jax.jit(
        lambda: create_train_state(model_config, train_config, model=model_fn(), pad_multiple=pad), out_shardings=shardings
    )()


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

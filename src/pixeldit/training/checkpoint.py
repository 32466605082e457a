"""Checkpoints: the one place that reads and writes them.

Checkpoints are written with orbax ``CheckpointManager`` (synchronously).  On a local filesystem
orbax writes every step into ``<step>.orbax-checkpoint-tmp-<timestamp>/`` and only renames it to
``<step>/`` after every item (and ``commit_success.txt``) has been written, so a crash mid-save
leaves at most a temporary directory, which is ignored when looking for the latest step and
deleted when the manager is next opened (``cleanup_tmp_directories=True``).  Old steps beyond
``keep_checkpoints`` are deleted only after a newer step has been committed.

Layout of a run directory (``workdir`` given to :func:`pixeldit.training.train`)::

    workdir/
      config.json          # model config + train config + dataset description
      metrics.jsonl        # one JSON object per logged step (pixeldit.training.metrics)
      checkpoints/
        <step>/            # e.g. 1000/; committed atomically by rename
          params/          # float32 master weights, per-leaf nnx.State tree (orbax PyTree, OCDBT)
          ema_params/      # float32 EMA weights, same tree
          opt_state/       # optax state of chain(clip_by_global_norm, adamw), moments as same tree
          extra/           # {"step", "rng" (raw uint32 key data), "model_state"}
          repa/            # REPA runs only: {"params", "opt_state"} of the alignment projector
          meta/            # JSON: model_config, train_config, dataset, step
          _CHECKPOINT_METADATA, commit_success.txt

Checkpoints hold per-leaf trees, so they do not depend on the flat layout, its padding or the
mesh they were written from.  In-memory datasets are deterministic in ``(seed, step)`` and the
step in ``extra`` is their position; a streaming dataset's position is stored in ``meta`` as
``data_state`` (:mod:`pixeldit.training.datastate`).  A model-only checkpoint
(:func:`save_model_checkpoint`, e.g. a converted reference model) has no ``opt_state``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from pixeldit.flat import ParamLayout
from pixeldit.model import build_model
from pixeldit.model_config import PixelDiTConfig, config_from_dict
from pixeldit.parallel import param_spec
from pixeldit.training.config import (
    RESUME_FREE_MODEL_FIELDS,
    RESUME_FREE_TRAIN_FIELDS,
    RESUME_OPTIMIZER_FIELDS,
    TrainConfig,
    effective_model_config,
)
from pixeldit.training.fallback import newest_readable
from pixeldit.training.state import TrainState, abstract_sharded_state

__all__ = [
    "CHECKPOINT_SUBDIR",
    "CONFIG_FILE",
    "Checkpoint",
    "IncompatibleCheckpointError",
    "check_compatible",
    "checkpoint_items",
    "checkpoint_manager",
    "describe_dataset",
    "json_roundtrip",
    "latest_checkpoint_step",
    "load_checkpoint",
    "newest_intact",
    "quiet_orbax",
    "read_checkpoint_meta",
    "read_meta",
    "restore_sharded_train_state",
    "restore_train_state",
    "run_meta",
    "save_model_checkpoint",
    "save_train_state",
]

CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"


@contextlib.contextmanager
def quiet_orbax():
    """Silence orbax's logging through absl while reading: notices about read-only managers, and the
    errors it logs itself about a damaged file (:func:`newest_intact` reports those in one line)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class IncompatibleCheckpointError(ValueError):
    """A checkpoint was written with settings that conflict with the requested run."""

    def __init__(self, message: str, differences: Sequence[str]):
        super().__init__(message)
        self.differences = list(differences)




def json_roundtrip(d: Any) -> Any:
    """``d`` as JSON would give it back (numpy scalars and arrays to numbers and lists, paths to strings)."""
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
            return json_roundtrip(dict(fn()))
    desc = {"class": f"{type(dataset).__module__}.{type(dataset).__qualname__}"}
    if type(dataset).__repr__ is not object.__repr__:  # a custom repr; the default one holds an address
        desc["repr"] = repr(dataset)
    return desc


def run_meta(model_config: Any, train_config: TrainConfig, dataset: Any) -> dict[str, Any]:
    """The JSON metadata a run stores with its checkpoints and checks a resume against
    (:func:`check_compatible`): the effective model config (``compute_dtype`` / ``remat`` applied),
    the train config and the dataset's description."""
    cfg = effective_model_config(model_config, train_config)
    return json_roundtrip({"model_config": cfg.to_dict(), "train_config": train_config.to_dict(),
                           "dataset": describe_dataset(dataset)})


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
        item_names=("params", "ema_params", "opt_state", "extra", "repa", "meta"),
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

    items = {
        "params": tree(state.flat_params),
        "ema_params": tree(state.flat_ema),
        "opt_state": _map_flat(state.layout, tree, state.opt_state),
        "extra": _extra(state),
    }
    if state.repa is not None:  # REPA runs: the projector and its AdamW state, an item of its own
        items["repa"] = state.repa
    return items


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
    meta = json_roundtrip(dict(meta, step=step))
    items = checkpoint_items(state)
    _test_pause(step)
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


def _test_pause(step: int) -> None:
    """Test hook: with ``PIXELDIT_TEST_SAVE_PAUSE=<seconds>`` every save prints one line to stderr and
    waits, so that a test can send a signal while a save is under way."""
    pause = os.environ.get("PIXELDIT_TEST_SAVE_PAUSE")
    if pause:
        print(f"test hook: pausing in the save of step {step}", file=sys.stderr, flush=True)
        time.sleep(float(pause))


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
            **({} if abstract_state.repa is None else {"repa": ocp.args.StandardRestore(abstract_state.repa)}),
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
        repa=None if abstract_state.repa is None else r.repa,
    )


def restore_sharded_train_state(mngr: ocp.CheckpointManager, step: int, model_config: Any, train_config: TrainConfig,
                                mesh: Mesh, fsdp: bool = False, **kw) -> TrainState:
    """Restore checkpoint ``step`` directly onto ``mesh`` (whatever layout it was saved from)."""
    return restore_train_state(mngr, step, abstract_sharded_state(model_config, train_config, mesh, fsdp, **kw))


def newest_intact(mngr: ocp.CheckpointManager, read: Callable[[int], Any], step: int | None = None, *,
                  then: str = "using an older one", warn: bool = True) -> tuple[int, Any]:
    """``(step, read(step))`` for the newest checkpoint of ``mngr`` that ``read`` can read
    (:func:`pixeldit.training.fallback.newest_readable`; an incompatible one is not skipped)."""
    return newest_readable(mngr.directory, mngr.all_steps(), read, step, then=then,
                           passthrough=(IncompatibleCheckpointError,), warn=warn)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """JSON metadata of checkpoint ``step`` of an open manager."""
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def latest_checkpoint_step(workdir: str | os.PathLike) -> int | None:
    """Latest committed checkpoint step in ``workdir`` (None if there is none)."""
    if not (Path(workdir) / CHECKPOINT_SUBDIR).exists():
        return None
    with quiet_orbax(), checkpoint_manager(workdir, read_only=True) as mngr:
        return mngr.latest_step()


def read_checkpoint_meta(workdir: str | os.PathLike, step: int | None = None, *, warn: bool = True) -> dict[str, Any]:
    """JSON metadata (model_config, train_config, dataset, step) of a checkpoint (default: the newest
    whose metadata can be read; ``warn=False``: skip a damaged one without the warning line)."""
    if not (Path(workdir) / CHECKPOINT_SUBDIR).exists():
        raise FileNotFoundError(f"no checkpoints in {workdir}")
    with quiet_orbax(), checkpoint_manager(workdir, read_only=True) as mngr:
        return newest_intact(mngr, functools.partial(read_meta, mngr), step, warn=warn)[1]


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


def _normalized_model_config(d: Mapping[str, Any]) -> dict[str, Any]:
    """A saved model config as the current config class writes it: fields added since it was
    written take their defaults, derived fields it stored are dropped (JSON form)."""
    try:
        return json_roundtrip(config_from_dict(dict(d)).to_dict())
    except (TypeError, ValueError):  # not one of this package's configs (model_fn runs): compare as stored
        return dict(d)


def check_compatible(saved_meta: Mapping[str, Any], new_meta: Mapping[str, Any], *, check_dataset: bool = True) -> None:
    """Raise :class:`IncompatibleCheckpointError` listing every differing field.

    Compares the model configs (except :data:`RESUME_FREE_MODEL_FIELDS`), the
    train configs (except :data:`RESUME_FREE_TRAIN_FIELDS` and :data:`RESUME_OPTIMIZER_FIELDS`) and, if
    ``check_dataset``, the dataset descriptions.
    """
    saved, new = json_roundtrip(dict(saved_meta)), json_roundtrip(dict(new_meta))
    saved_model, new_model = (_normalized_model_config(m.get("model_config", {})) for m in (saved, new))
    diffs = _diff_dicts("model", saved_model, new_model, RESUME_FREE_MODEL_FIELDS)
    saved_train, new_train = saved.get("train_config", {}), new.get("train_config", {})
    diffs += _diff_dicts("train", saved_train, new_train, RESUME_FREE_TRAIN_FIELDS | RESUME_OPTIMIZER_FIELDS)
    if "grad_clip" in saved_train and (saved_train["grad_clip"] is None) != (new_train.get("grad_clip") is None):
        diffs.append(f"train.grad_clip: checkpoint={saved_train['grad_clip']!r} requested={new_train.get('grad_clip')!r} "
                     "(clipping can change its bound on resume, not be switched on or off)")
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


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A model loaded from a run directory, with the run's metadata.

    ``model_config`` is the effective config used in training (compute dtype/remat overrides
    applied); ``meta`` is the checkpoint's JSON metadata (``model_config``, ``train_config``,
    ``dataset``, ``step`` and, for converted models, ``source``/``time_convention``).
    """

    model: nnx.Module
    model_config: PixelDiTConfig
    meta: dict[str, Any]
    step: int
    ema: bool

    @property
    def train_config(self) -> dict[str, Any]:
        """The run's train config as saved (a dict)."""
        return self.meta["train_config"]

    @property
    def dataset(self) -> dict[str, Any]:
        """The description of the training data (``metadata()`` of the dataset)."""
        return self.meta.get("dataset") or {}


def load_checkpoint(workdir: str | os.PathLike, step: int | None = None, ema: bool = True) -> Checkpoint:
    """Load a model from a run directory for sampling, evaluation or export (quietly).

    Args:
      workdir: the directory given to :func:`pixeldit.training.train` (or to a conversion).
      step: checkpoint step (default: the newest readable one; a damaged newer one is skipped
        with one warning line, see :func:`newest_intact`).
      ema: load the EMA weights (default) or the raw training weights.

    Only the requested weights are read (not the optimiser state).
    """
    if not (Path(workdir) / CHECKPOINT_SUBDIR).exists():
        raise FileNotFoundError(f"no checkpoints in {workdir}")
    with quiet_orbax(), checkpoint_manager(workdir, read_only=True) as mngr:
        step, (model, model_config, meta) = newest_intact(
            mngr, functools.partial(_read_model, mngr, ema=ema), None if step is None else int(step))
    return Checkpoint(model=model, model_config=model_config, meta=meta, step=step, ema=ema)


def _read_model(mngr: ocp.CheckpointManager, step: int, *, ema: bool) -> tuple[nnx.Module, PixelDiTConfig, dict]:
    """``(model, model_config, meta)`` of checkpoint ``step``: the (EMA or raw) weights and model state only."""
    meta = read_meta(mngr, step)
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
    return nnx.merge(graphdef, r[item], r.extra["model_state"]), model_config, meta


def save_model_checkpoint(model: nnx.Module, workdir: str | os.PathLike, *, image_shape: Sequence[int] | None,
                          extra_meta: Mapping[str, Any] | None = None, step: int = 0) -> Path:
    """Write ``model`` as a checkpoint of a new run directory that :func:`load_checkpoint` reads.

    The raw and EMA weights are both ``model``'s; no optimiser state is written (such a
    checkpoint is for sampling, evaluation and export, not for resuming training).  Raises
    ``FileExistsError`` when ``workdir`` already holds checkpoints.
    """
    workdir = Path(workdir)
    if latest_checkpoint_step(workdir) is not None:
        raise FileExistsError(f"'{workdir}' already holds checkpoints; use a new directory")
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda a: a.astype("float32"), params)
    extra = {"step": np.asarray(step, np.int32), "rng": np.zeros((2,), np.uint32), "model_state": rest}
    meta = json_roundtrip({
        "model_config": model.config.to_dict(),
        "train_config": TrainConfig().to_dict(),
        "dataset": {"name": "converted", "image_shape": list(image_shape) if image_shape else None},
        "step": step,
        **dict(extra_meta or {}),
    })
    with checkpoint_manager(workdir, keep=1) as mngr:
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            ema_params=ocp.args.StandardSave(params),
            extra=ocp.args.StandardSave(extra),
            meta=ocp.args.JsonSave(meta),
        ), force=True)
        mngr.wait_until_finished()
    (workdir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return workdir / CHECKPOINT_SUBDIR / str(step)

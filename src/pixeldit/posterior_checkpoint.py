"""Training-state checkpoints of the amortised posterior: what a resumed run continues from.

:func:`pixeldit.posterior_training.train_posterior` saves its full state every
``checkpoint_every`` steps, on SIGINT / SIGTERM and at the end, as one safetensors file per
step::

    workdir/posterior_state/<step>.safetensors
        params/...   trained weights          ema/...     EMA of the weights
        opt/...      optax state              buffers/... encoder.feature_shift / feature_scale
        key          raw PRNG key data (the key the next step splits)
        metadata     format, step, model and train config (JSON), history (the logged records),
                     running (loss sums since the last logged record), train_seconds, train_cpu_seconds

Arrays are stored under their pytree path (``jax.tree_util.keystr``) and read back into a
template of the same structure, so a file from another model layout fails with a one-line
error instead of loading silently.  A file is written to a temporary name, fsynced and
renamed: a reader never sees a partial file.  The newest :data:`KEEP` files are kept (the
previous one is the fallback when the newest cannot be read); older ones are deleted only
after a newer one has been committed.  An unreadable file is reported in one warning line and
moved to ``workdir/damaged_checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from pixeldit.training.fallback import DAMAGED_SUBDIR, newest_readable

__all__ = ["KEEP", "RESUME_FREE_FIELDS", "STATE_DIR", "IncompatibleResumeError", "PosteriorState",
           "load_state", "save_state", "state_steps"]

STATE_DIR = "posterior_state"
STATE_FORMAT = "pixeldit-posterior-train-state-1"
SUFFIX = ".safetensors"
KEEP = 2  # the newest checkpoint and one previous
RESUME_FREE_FIELDS = frozenset({"max_seconds", "checkpoint_every"})  # train settings a resumed run may change
GROUPS = ("params", "ema", "opt", "buffers")


class IncompatibleResumeError(ValueError):
    """A workdir's checkpoint was trained with settings that differ from the requested run's."""


@dataclasses.dataclass
class PosteriorState:
    """Everything a training step depends on, plus the history logged so far."""

    step: int  # optimiser steps done
    params: Any
    opt_state: Any
    ema: Any
    buffers: Any  # the model's non-trainable variables (nnx.State)
    key: jax.Array  # typed PRNG key
    history: dict[str, Any]
    running: dict[str, float]  # loss sums since the last logged record, and their "count"
    train_seconds: float = 0.0  # wall and process CPU time of the steps done, over all runs
    train_cpu_seconds: float = 0.0

    def trees(self) -> dict[str, Any]:
        return {"params": self.params, "ema": self.ema, "opt": self.opt_state, "buffers": self.buffers}


def state_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / STATE_DIR


def state_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the committed checkpoints in ``workdir``, ascending."""
    d = state_dir(workdir)
    if not d.is_dir():
        return []
    return sorted(int(p.name[: -len(SUFFIX)]) for p in d.iterdir()
                  if p.name.endswith(SUFFIX) and p.name[: -len(SUFFIX)].isdigit())


def _flatten(prefix: str, tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {f"{prefix}/{jax.tree_util.keystr(path)}": np.asarray(leaf) for path, leaf in leaves}


def _unflatten(prefix: str, template: Any, arrays: Mapping[str, np.ndarray], source: Path) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [f"{prefix}/{jax.tree_util.keystr(path)}" for path, _ in leaves]
    stored = {k for k in arrays if k.startswith(prefix + "/")}
    if set(names) != stored:
        raise ValueError(f"{source}: the {prefix} arrays do not match this model; missing "
                         f"{sorted(set(names) - stored)[:3]}, unexpected {sorted(stored - set(names))[:3]}")
    out = []
    for name, (_, leaf) in zip(names, leaves):
        a = arrays[name]
        if tuple(a.shape) != tuple(np.shape(leaf)):
            raise ValueError(f"{source}: {name} has shape {a.shape}, this model expects {np.shape(leaf)}")
        out.append(jnp.asarray(a, dtype=jnp.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _test_pause(step: int) -> None:
    """The main trainer's test hook: with ``PIXELDIT_TEST_SAVE_PAUSE=<seconds>`` every save prints one
    line to stderr and waits, so that a test can send a signal while a save is under way."""
    pause = os.environ.get("PIXELDIT_TEST_SAVE_PAUSE")
    if pause:
        print(f"test hook: pausing in the save of step {step}", file=sys.stderr, flush=True)
        time.sleep(float(pause))


def save_state(workdir: str | os.PathLike, state: PosteriorState, model_config: Mapping[str, Any],
               train_config: Mapping[str, Any]) -> Path:
    """Write ``state`` atomically as ``posterior_state/<step>.safetensors``; keep the newest :data:`KEEP`."""
    d = state_dir(workdir)
    d.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"key": np.asarray(jax.random.key_data(state.key))}
    for group, tree in state.trees().items():
        arrays.update(_flatten(group, tree))
    meta = {"format": STATE_FORMAT, "step": str(state.step), "model_config": json.dumps(dict(model_config)),
            "train_config": json.dumps(dict(train_config)), "history": json.dumps(state.history),
            "running": json.dumps(state.running),
            "times": json.dumps([state.train_seconds, state.train_cpu_seconds])}
    _test_pause(state.step)
    path = d / f"{state.step}{SUFFIX}"
    tmp = d / f".{state.step}{SUFFIX}.tmp-{os.getpid()}"
    save_file(arrays, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in state_steps(workdir)[:-KEEP]:
        (d / f"{old}{SUFFIX}").unlink(missing_ok=True)
    return path


def _check_compatible(path: Path, meta: Mapping[str, str], model_config: Mapping[str, Any],
                      train_config: Mapping[str, Any]) -> None:
    old_model, old_train = json.loads(meta["model_config"]), json.loads(meta["train_config"])
    new_model = json.loads(json.dumps(dict(model_config)))
    new_train = json.loads(json.dumps(dict(train_config)))
    diffs = [f"model.{k}: {old_model.get(k)!r} vs {new_model.get(k)!r}"
             for k in sorted(set(old_model) | set(new_model)) if old_model.get(k) != new_model.get(k)]
    diffs += [f"train.{k}: {old_train.get(k)!r} vs {new_train.get(k)!r}"
              for k in sorted((set(old_train) | set(new_train)) - RESUME_FREE_FIELDS)
              if old_train.get(k) != new_train.get(k)]
    if diffs:
        raise IncompatibleResumeError(
            f"cannot resume from {path}: this run's settings differ from the checkpoint's (checkpoint vs this run: "
            f"{'; '.join(diffs)}); give the checkpoint's settings or use a new --workdir")


def _read(path: Path, template: PosteriorState, model_config, train_config) -> PosteriorState:
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a posterior training checkpoint (format {meta.get('format')!r})")
    _check_compatible(path, meta, model_config, train_config)
    arrays = load_file(str(path))
    trees = {g: _unflatten(g, t, arrays, path) for g, t in template.trees().items()}
    seconds, cpu_seconds = json.loads(meta["times"])
    return PosteriorState(
        step=int(meta["step"]), params=trees["params"], opt_state=trees["opt"], ema=trees["ema"],
        buffers=trees["buffers"], key=jax.random.wrap_key_data(jnp.asarray(arrays["key"])),
        history=json.loads(meta["history"]), running=json.loads(meta["running"]),
        train_seconds=seconds, train_cpu_seconds=cpu_seconds)


def _move_aside(workdir: Path, step: int) -> None:
    dest_dir = workdir / DAMAGED_SUBDIR
    dest_dir.mkdir(exist_ok=True)
    dest, n = dest_dir / f"posterior-{step}{SUFFIX}", 1
    while dest.exists():
        dest, n = dest_dir / f"posterior-{step}-{n}{SUFFIX}", n + 1
    os.replace(state_dir(workdir) / f"{step}{SUFFIX}", dest)


def load_state(workdir: str | os.PathLike, template: PosteriorState, model_config: Mapping[str, Any],
               train_config: Mapping[str, Any]) -> PosteriorState | None:
    """The newest readable checkpoint of ``workdir`` in ``template``'s structure, or None when there is none.

    Newer files that cannot be read are reported in one warning line each and moved to
    ``damaged_checkpoints/``.  :class:`IncompatibleResumeError` when the readable checkpoint was
    trained with other settings (all but :data:`RESUME_FREE_FIELDS` must match).
    """
    workdir = Path(workdir)
    steps = state_steps(workdir)
    if not steps:
        return None
    step, state = newest_readable(
        state_dir(workdir), steps, lambda s: _read(state_dir(workdir) / f"{s}{SUFFIX}", template, model_config,
                                                   train_config),
        then="using the previous one", passthrough=(IncompatibleResumeError,))
    for damaged in (s for s in steps if s > step):
        _move_aside(workdir, damaged)
    return state

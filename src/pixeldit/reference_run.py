"""A reference (PyTorch Lightning) training checkpoint -> a workdir that ``pixeldit train`` continues.

The reference c2i trainer saves Lightning checkpoints whose ``state_dict`` holds the raw weights
(``denoiser.*``), the EMA (``ema_denoiser.*``) and, with REPA, the alignment projector
(``diffusion_trainer.proj.0.*``), next to ``global_step``.  :func:`reference_run_to_workdir`
pairs such a file with a run config (the settings the run continues under: data, optimiser,
REPA encoder...) and writes a workdir laid out as one that ``pixeldit train`` wrote itself:
``run.json``, ``config.json`` and a full training checkpoint at ``global_step``
(:func:`pixeldit.convert.reference_train_state`: weights, EMA, projector; AdamW's moments start at
zero, the torch optimiser state is not read).  Training it resumes at that step.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from pixeldit.convert import ConversionError, read_raw_checkpoint, reference_train_state
from pixeldit.runconfig import RunConfig, load_run_config, save_run_config
from pixeldit.runs import load_run_dataset, resolve_model_config, scaled_run_dataset
from pixeldit.training import (
    CONFIG_FILE,
    checkpoint_manager,
    effective_model_config,
    latest_checkpoint_step,
    run_meta,
    save_train_state,
    workdir_lock,
)
from pixeldit.training.datastate import with_data_state

__all__ = ["reference_run_to_workdir"]


def reference_run_to_workdir(checkpoint_file: str | os.PathLike, workdir: str | os.PathLike, config: str | os.PathLike,
                             overrides: Sequence[str] = (), *, data: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write a resumable ``workdir`` from a reference training checkpoint and a run config.

    ``config`` names the run config (built-in name or ``.toml``), ``overrides`` are its
    ``section.key=value`` changes and ``data`` replaces its ``[data]`` source, as for ``pixeldit
    train``.  The model the run config resolves to (against its data) must be the checkpoint's
    (every weight's name and shape is checked); ``train.repa`` must be set exactly when the
    checkpoint has a REPA projector, in its style; ``train.steps`` must be at least the
    checkpoint's ``global_step``.  Raises :class:`~pixeldit.convert.ConversionError` otherwise, or
    when ``workdir`` already holds checkpoints.  Returns a summary (``workdir``, ``step``, ``kind``,
    ``repa``, ``run_config``).
    """
    workdir = Path(workdir)
    if latest_checkpoint_step(workdir) is not None:
        raise ConversionError(f"'{workdir}' already holds checkpoints; use a new directory")
    run = load_run_config(config, overrides, data=data)
    raw = _read(checkpoint_file)
    step = _global_step(raw)
    if run.train.steps < step:
        raise ConversionError(f"train.steps={run.train.steps} is below the checkpoint's global_step {step}; "
                              f"set train.steps >= {step} (e.g. --set train.steps={step + 10000})")
    dataset = load_run_dataset(run)
    model_config = resolve_model_config(run.model, dataset)
    if model_config.kind != "c2i":
        raise ConversionError(f"a reference training checkpoint continues a class-conditional (c2i) run; the run "
                              f"config gives a {model_config.kind} model")
    dataset = scaled_run_dataset(run, dataset, {})
    state = reference_train_state(raw, effective_model_config(model_config, run.train), run.train)
    meta = run_meta(model_config, run.train, dataset)
    with workdir_lock(workdir):
        _write(workdir, run, state, meta, dataset, checkpoint_file)
    return {"workdir": str(workdir), "step": step, "kind": model_config.kind, "repa": run.train.repa is not None,
            "run_config": str(workdir / "run.json"), "config_name": run.name}


def _read(checkpoint_file) -> Any:
    """The checkpoint file's contents; a failure of its reader (torch.load, pickle, safetensors)
    becomes a :class:`~pixeldit.convert.ConversionError` naming the file."""
    try:
        return read_raw_checkpoint(checkpoint_file)
    except (ConversionError, OSError, ValueError, ImportError):
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConversionError(f"cannot read '{checkpoint_file}' as a reference checkpoint ({type(e).__name__}: "
                              f"{first})") from e


def _global_step(raw: Any) -> int:
    """The Lightning checkpoint's ``global_step`` (0 when it records none)."""
    step = raw.get("global_step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConversionError(f"the checkpoint's global_step must be a whole number >= 0, got {step!r}")
    return step


def _write(workdir: Path, run: RunConfig, state, meta: dict, dataset, checkpoint_file) -> None:
    """``run.json`` (with where the run came from in its history), the checkpoint and ``config.json``."""
    source = {"converted_from": str(Path(checkpoint_file).resolve()), "at_step": int(state.step),
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    save_run_config(run, workdir, history=[source])
    with checkpoint_manager(workdir, keep=run.train.keep_checkpoints) as mngr:
        save_train_state(mngr, state, with_data_state(meta, dataset))
    (workdir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

"""Run configs of the amortised posterior (``[model] kind = "posterior"``) and their training.

A posterior run config is a TOML file like the others (:mod:`pixeldit.runconfig`) with three
sections; the built-in one is ``grf-posterior``::

    [model]  kind = "posterior" and :class:`pixeldit.posterior_model.PosteriorConfig` sizes
    [train]  :class:`pixeldit.posterior_training.PosteriorTrainConfig` fields and log_every
    [data]   source = "grf" (simulated on the fly, the only simulator it trains on),
             size (the field side), prior_low / prior_high (the prior box)

``pixeldit train grf-posterior`` calls :func:`train_posterior_run`: the workdir gets
``run.json`` (this config, ``model.kind = "posterior"``), ``posterior_state/`` (the full
training state every ``train.checkpoint_every`` steps, :mod:`pixeldit.posterior_checkpoint`),
and at the end ``posterior.safetensors`` (the EMA model,
:func:`pixeldit.posterior_training.load_posterior`), ``history.json`` and ``summary.json``.
Running the same command again resumes from the newest checkpoint (a finished run is not
trained again); SIGINT / SIGTERM save the state at the next step boundary and exit with 130 /
143.  One process trains in a workdir at a time (:func:`pixeldit.training.workdir_lock`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pixeldit.posterior_checkpoint import state_steps
from pixeldit.posterior_model import PosteriorConfig
from pixeldit.posterior_training import (
    CHECKPOINT_NAME,
    POSTERIOR_KIND,
    PosteriorTrainConfig,
    is_posterior_workdir,
    train_posterior,
)
from pixeldit.runconfig import RUN_FILE, ConfigError, _read_raw, parse_override
from pixeldit.training.lock import workdir_lock

__all__ = ["PosteriorRun", "is_posterior_source", "load_posterior_run", "train_posterior_run", "train_posterior_source"]

SECTIONS = ("model", "train", "data")
DATA_KEYS = ("source", "size", "prior_low", "prior_high")
DATA_TO_MODEL = {"size": "image_size", "prior_low": "prior_low", "prior_high": "prior_high"}
RUN_TRAIN_KEYS = ("log_every",)  # [train] keys of the run, not of PosteriorTrainConfig


@dataclass(frozen=True)
class PosteriorRun:
    """A resolved posterior run config: the model and training configs plus the log interval."""

    name: str
    model: PosteriorConfig
    train: PosteriorTrainConfig
    log_every: int = 250

    def to_dict(self) -> dict[str, Any]:
        m = self.model.to_dict()
        skip = set(DATA_TO_MODEL.values()) | {"in_channels"}
        model = {"kind": POSTERIOR_KIND} | {k: v for k, v in m.items() if k not in skip}
        data = {"source": "grf"} | {k: m[v] for k, v in DATA_TO_MODEL.items()}
        return {"name": self.name, "model": model,
                "train": dataclasses.asdict(self.train) | {"log_every": self.log_every}, "data": data}


def _raw_kind(raw: Mapping[str, Any]) -> Any:
    model = raw.get("model", {})
    return model.get("kind") if isinstance(model, Mapping) else None


def is_posterior_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` (a built-in name, a .toml file or a workdir) is a posterior run config."""
    if is_posterior_workdir(source):
        return True
    try:
        _, raw = _read_raw(source)
    except ConfigError:
        return False  # not a config at all: the caller's own loader reports it
    return _raw_kind(raw) == POSTERIOR_KIND


def _unknown(section: str, given: Sequence[str], known: Sequence[str]) -> None:
    bad = sorted(set(given) - set(known))
    if bad:
        raise ConfigError(f"unknown key(s) in [{section}] of a posterior run: {', '.join(bad)}; "
                          f"known keys: {', '.join(sorted(known))}")


def build_posterior_run(name: str, raw: Mapping[str, Any]) -> PosteriorRun:
    """Validate a raw nested dict (sections ``model``, ``train``, ``data``) into a :class:`PosteriorRun`."""
    extra = sorted(s for s in raw if s not in SECTIONS and raw[s])
    if extra:
        raise ConfigError(f"a posterior run has sections {', '.join(f'[{s}]' for s in SECTIONS)} only, "
                          f"got {', '.join(f'[{s}]' for s in extra)}")
    model, train, data = (dict(raw.get(s, {})) for s in SECTIONS)
    if model.pop("kind", None) != POSTERIOR_KIND:
        raise ConfigError(f"a posterior run needs model.kind = {POSTERIOR_KIND!r}")
    from_data = set(DATA_TO_MODEL.values()) | {"in_channels"}  # the GRF simulator gives 1-channel fields
    model_keys = [f.name for f in dataclasses.fields(PosteriorConfig) if f.name not in from_data]
    _unknown("model", model, model_keys)
    _unknown("train", train, [f.name for f in dataclasses.fields(PosteriorTrainConfig)] + list(RUN_TRAIN_KEYS))
    _unknown("data", data, DATA_KEYS)
    if data.pop("source", "grf") != "grf":
        raise ConfigError("the amortised posterior trains on the built-in GRF simulator only: data.source must be 'grf'")
    model.update({DATA_TO_MODEL[k]: v for k, v in data.items()})
    log_every = train.pop("log_every", 250)
    if not isinstance(log_every, int) or log_every < 1:
        raise ConfigError(f"train.log_every must be an integer >= 1, got {log_every!r}")
    try:
        return PosteriorRun(name, PosteriorConfig(**model), PosteriorTrainConfig(**train), log_every)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"posterior run {name!r}: {e}") from e


def load_posterior_run(source: str | os.PathLike, overrides: Sequence[str] = ()) -> PosteriorRun:
    """Load a posterior run config (built-in name, .toml file or workdir) and apply ``section.key=value`` overrides."""
    name, raw = _read_raw(source)
    raw = {s: dict(raw.get(s) or {}) for s in set(raw) | set(SECTIONS)}
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"override {text!r}: a posterior run has sections {', '.join(SECTIONS)} only")
        raw[section][key] = value
    return build_posterior_run(name, raw)


def train_posterior_run(run: PosteriorRun, workdir: str | os.PathLike,
                        echo: Callable[[str], Any] | None = print) -> dict[str, Any]:
    """Train ``run`` into ``workdir`` (``run.json``, the checkpoints, ``history.json``, ``summary.json``),
    resuming from its newest training checkpoint if it has one.

    A workdir with a ``posterior.safetensors`` but no training checkpoint (a run saved before
    training became resumable) is refused; so is one another process is training in.
    """
    workdir = Path(workdir)
    with workdir_lock(workdir):  # before run.json is written: a second run must not touch it
        fresh = not state_steps(workdir)
        if fresh and (workdir / CHECKPOINT_NAME).is_file():
            raise ConfigError(f"{workdir} already holds a trained posterior ({CHECKPOINT_NAME}) and no training "
                              "checkpoint to resume from; choose another --workdir or delete that file to train again")
        if fresh:
            tmp = workdir / (RUN_FILE + f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(run.to_dict(), indent=2) + "\n")
            os.replace(tmp, workdir / RUN_FILE)
        _, history = train_posterior(run.model, run.train, workdir=workdir, log=echo, log_every=run.log_every)
        summary = {
            "kind": POSTERIOR_KIND, "workdir": str(workdir), "checkpoint_path": str(workdir / CHECKPOINT_NAME),
            "steps_done": history["steps_done"], "steps": run.train.steps, "train_seconds": history["train_seconds"],
            "train_cpu_seconds": history["train_cpu_seconds"], "final_loss": history["loss"][-1],
            "final_nll": history["nll"][-1], "final_flow": history["flow"][-1],
        }
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def train_posterior_source(source: str | os.PathLike, overrides: Sequence[str] = (), data: str | None = None,
                           workdir: str | os.PathLike | None = None, echo: Callable[[str], Any] = print) -> dict:
    """``pixeldit train SOURCE`` for a posterior run config: the summary, with the closing line as ``message``.

    ``workdir`` defaults to ``runs/<name>``.  An interrupt (Ctrl-C, SIGTERM) saves the training state at
    the next step boundary and exits with ``128 + signal`` after one line on stderr.
    """
    if data is not None:
        raise ConfigError("--data does not apply to an amortised posterior run: it simulates GRF fields on the fly")
    run = load_posterior_run(source, overrides)
    wd = Path(workdir) if workdir is not None else Path("runs") / run.name
    echo(f"run {run.name!r}: amortised posterior on simulated GRF fields, {run.train.steps} steps, workdir {wd}")
    try:
        s = train_posterior_run(run, wd, echo=echo)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        steps = state_steps(wd)
        saved = f"checkpoint at step {steps[-1]} in {wd}" if steps else "no checkpoint yet"
        print(f"\ninterrupted ({signal.Signals(signum).name}): {saved}; run the same command again to resume",
              file=sys.stderr)
        raise SystemExit(128 + signum) from None
    s["message"] = (f"done: {s['steps_done']} steps in {s['train_seconds']:.1f} s, final nll {s['final_nll']:.4f}, "
                    f"flow loss {s['final_flow']:.4f}\ncheckpoint: {s['checkpoint_path']}")
    return s

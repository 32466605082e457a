"""The training loop: :func:`train` (mesh, init or resume, loop, save) and its result."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
from flax import nnx
from tqdm.auto import tqdm

from pixeldit import parallel
from pixeldit.training.checkpoint import (
    CONFIG_FILE,
    check_compatible,
    checkpoint_manager,
    newest_intact,
    quiet_orbax,
    read_meta,
    restore_train_state,
    run_meta,
    save_train_state,
)
from pixeldit.training.config import TrainConfig, effective_model_config
from pixeldit.training.loggers import MetricsLogger, open_logger
from pixeldit.training.datastate import restore_data_state, stream_of, with_data_state
from pixeldit.training.fallback import DAMAGED_SUBDIR, move_aside
from pixeldit.training.lock import workdir_lock
from pixeldit.training.metrics import append_metrics, atomic_write_text, move_metrics_aside, truncate_metrics
from pixeldit.training.state import (
    TrainState,
    abstract_train_state,
    create_sharded_train_state,
    create_train_state,
    ema_model,
)
from pixeldit.training.step import prepare_batch, shared_sharded_train_step, shared_train_step

log = logging.getLogger(__name__)

__all__ = ["Interrupted", "NonFiniteLossError", "SignalFlag", "TrainResult", "train"]

Callback = Callable[[int, nnx.Module], Any]


class NonFiniteLossError(FloatingPointError):
    """Loss or gradient norm became NaN/inf; ``step`` is the failing step number."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint at ``step``.

    A ``KeyboardInterrupt``, so code that stops on Ctrl-C stops here too; ``signum`` says which
    signal came (the ``pixeldit`` command exits with ``128 + signum``: 130 or 143).
    """

    def __init__(self, signum: int, step: int | None):
        saved = f"checkpoint saved at step {step}" if step is not None else "no checkpoint could be saved"
        super().__init__(f"{signal.Signals(signum).name}: {saved}")
        self.signum, self.step = signum, step


class SignalFlag:
    """While active (main thread only), SIGINT and SIGTERM set :attr:`received` instead of raising.

    The loop checks it between steps: it finishes the step and any save under way, saves and
    stops.  A second signal during that save only says to wait; exceptions raised inside orbax's
    write would leave a half-written temporary directory and no checkpoint of this step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            log.warning("%s received: finishing this step, then saving a checkpoint and stopping", name)
        else:
            log.warning("%s received: still saving the checkpoint, please wait", name)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the final state, a summary, and (on first access) the EMA model.

    ``summary``: ``final_loss`` (loss of the last step run, None if no step ran), ``step``
    (final step), ``start_step``, ``steps_run``, ``wall_time`` (s), ``steps_per_sec``,
    ``checkpoint_path`` (latest checkpoint directory), ``workdir``, ``losses`` (per-step losses
    of this call) and ``traces`` (times the train step was traced in this call: 1 on a cold
    start, 0 when an earlier call compiled it).
    """

    state: TrainState
    summary: dict[str, Any]

    @functools.cached_property
    def model(self) -> nnx.Module:
        """The trained model with the EMA weights (the ones to sample from)."""
        return ema_model(self.state)


def train(
    model_config: Any,
    train_config: TrainConfig,
    dataset: Any,
    workdir: str | os.PathLike,
    *,
    callbacks: Callback | Sequence[Callback] | None = None,
    progress: bool = True,
    check_dataset: bool = True,
    model_fn: Callable[[], nnx.Module] | None = None,
    encoder: nnx.Module | None = None,
    logger: MetricsLogger | None = None,
) -> TrainResult:
    """Train (or resume training) until ``train_config.steps``; returns a :class:`TrainResult`.

    If ``workdir/checkpoints`` holds a checkpoint, training resumes from the latest one after
    checking that its model config, train settings and dataset description match
    (:func:`~pixeldit.training.checkpoint.check_compatible`; raises ``IncompatibleCheckpointError``
    listing each differing field).  Batch ``s`` (0-based) is ``dataset.get_batch(s, batch_size)``
    and produces state step ``s + 1``, so resumed runs see the same data stream (a streaming
    dataset's position is kept in the checkpoints: :mod:`pixeldit.training.datastate`).

    Checkpoints are saved every ``checkpoint_every`` steps and at the end.  A non-finite loss or
    gradient norm raises :class:`NonFiniteLossError` naming the step, without saving (the last
    good checkpoint stays the latest).  SIGINT (Ctrl-C) and SIGTERM (what schedulers send on
    preemption) let the current step and any save under way finish, save a checkpoint and its
    metrics record at that step, then raise :class:`Interrupted` (a ``KeyboardInterrupt``); a
    ``KeyboardInterrupt`` raised otherwise (e.g. by the dataset) also saves, then re-raises.

    Args:
      model_config: model config (:class:`pixeldit.model_config.PixelDiTConfig`).
      train_config: :class:`~pixeldit.training.config.TrainConfig`.
      dataset: object with ``get_batch(step, batch_size) -> {"x", "y"}`` (deterministic in step)
        and ideally ``metadata()``.
      workdir: run directory (created if missing).
      callbacks: callable(s) ``cb(step, ema_model)`` invoked every ``sample_every`` steps.  The
        EMA model shares the training state's buffers and must not be kept after the callback.
      progress: show a tqdm progress bar (loss, steps/s, ETA).
      check_dataset: include the dataset description in the resume check.
      model_fn: optional zero-argument builder used instead of
        ``pixeldit.model.build_model(model_config, rngs=nnx.Rngs(seed))``.
      encoder: the frozen REPA encoder (:class:`pixeldit.encoders.PatchEncoder` module), needed
        when ``train_config.repa`` is set; its weights go to the step as an argument.
      logger: where the logged metrics also go (:mod:`pixeldit.training.loggers`); the caller
        closes it.  ``None``: ``train_config.logger``'s, opened and closed here.

    Sharding: with ``train_config.mesh`` set, the state is created (or restored, from a checkpoint
    of any layout) directly on that device mesh, data parallel or FSDP (``train_config.fsdp``),
    and every step runs the sharded, donated step on batches split by
    :func:`pixeldit.parallel.shard_batch`.  Multi-host runs are started by
    :func:`pixeldit.parallel.initialize_distributed` (environment variables); only process 0
    writes ``config.json``, metrics and the progress bar.

    One training process per workdir: a second one raises
    :class:`~pixeldit.training.lock.WorkdirLockedError` naming the holder's PID and host.
    """
    t_start = time.perf_counter()
    tc, workdir = train_config, Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = effective_model_config(model_config, tc)
    meta = run_meta(model_config, tc, dataset)
    mesh, fsdp = _mesh(tc)
    is_main = jax.process_index() == 0  # writes config.json / metrics.jsonl / progress
    with workdir_lock(workdir) if is_main else contextlib.nullcontext():
        return _train(cfg, tc, dataset, workdir, meta, (mesh, fsdp), callbacks, progress, check_dataset, model_fn,
                      is_main, t_start, encoder=encoder, logger=logger)


def _train(cfg, tc: TrainConfig, dataset, workdir: Path, meta, mesh_fsdp, callbacks, progress: bool,
           check_dataset: bool, model_fn, is_main: bool, t_start: float, *, encoder=None, logger=None) -> TrainResult:
    """:func:`train` once the workdir lock is held."""
    mesh, fsdp = mesh_fsdp
    with quiet_orbax():  # orbax logs its own errors about a damaged checkpoint; _init_or_resume reports them
        mngr = checkpoint_manager(workdir, keep=tc.keep_checkpoints)
    with mngr:
        with quiet_orbax():
            state, shardings = _init_or_resume(mngr, cfg, tc, meta, mesh, fsdp, model_fn, check_dataset, dataset)
        if is_main:
            atomic_write_text(workdir / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
        enc_graphdef, enc_state = _split_encoder(tc, encoder, mesh)
        if mesh is None:
            # Commit every leaf to one explicit sharding so that fresh and restored states hit
            # the same compiled executable (uncommitted vs committed inputs compile separately).
            state = jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
            step_fn, traces = shared_train_step(state.graphdef, tc, cfg.dtype, enc_graphdef)
            put_batch = prepare_batch
        else:
            state = jax.device_put(state, shardings or parallel.state_shardings(state, mesh, fsdp))
            step_fn, traces = shared_sharded_train_step(state, tc, mesh, fsdp, cfg.dtype, encoder_graphdef=enc_graphdef)
            put_batch = functools.partial(parallel.shard_batch, mesh=mesh, process_local=_process_local(dataset))
        if enc_graphdef is not None:
            step_fn = functools.partial(_with_encoder, step_fn, enc_state)
        start, traces_before = int(jax.device_get(state.step)), traces[0]
        loop = _Loop(mngr, meta, tc, workdir, callbacks, progress and is_main, is_main, start, t_start, logger)
        with SignalFlag() as signals:
            state = loop.run(state, step_fn, put_batch, dataset, signals)
        if traces[0] - traces_before > 1:
            warnings.warn(f"the train step was traced {traces[0] - traces_before} times; check batch shapes/dtypes",
                          stacklevel=2)
        final_step = int(jax.device_get(state.step))
        if final_step > start:
            save_train_state(mngr, state, with_data_state(meta, dataset))
        wall = time.perf_counter() - t_start
        latest = mngr.latest_step()
        summary = {
            "final_loss": loop.losses[-1] if loop.losses else None,
            "step": final_step,
            "start_step": start,
            "steps_run": final_step - start,
            "wall_time": wall,
            "steps_per_sec": (final_step - start) / max(wall, 1e-9),
            "checkpoint_path": str(mngr.directory / str(latest)) if latest is not None else None,
            "workdir": str(workdir),
            "losses": loop.losses,
            "traces": traces[0] - traces_before,
        }
    return TrainResult(state=state, summary=summary)


def _split_encoder(tc: TrainConfig, encoder: nnx.Module | None, mesh) -> tuple[Any, Any]:
    """``(graphdef, weights on the devices)`` of the frozen REPA encoder, ``(None, None)`` without REPA."""
    if tc.repa is None:
        return None, None
    if encoder is None:
        raise ValueError("train_config.repa is set but no encoder was given (train(..., encoder=...))")
    graphdef, weights = nnx.split(encoder)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None else parallel.replicated(mesh)
    return graphdef, jax.device_put(weights, sharding)


def _with_encoder(step_fn, encoder_state, state, batch):
    return step_fn(state, batch, encoder_state)


def _mesh(tc: TrainConfig) -> tuple[Any, bool]:
    """The device mesh of the run (None: the single-device step) and whether it is FSDP."""
    parallel.initialize_distributed()  # a no-op unless the environment asks for multi-host
    spec = tc.mesh
    if spec is None and jax.process_count() > 1:
        log.warning("multi-process run without train.mesh: using data parallelism over all %d devices", jax.device_count())
        spec = "data"
    if spec is None:
        return None, False
    mesh = parallel.make_mesh(spec)
    fsdp = parallel.resolve_fsdp(mesh, tc.fsdp)
    parallel.check_batch_size(tc.batch_size, mesh)
    log.info("mesh %s, %s", dict(mesh.shape), "FSDP" if fsdp else "data parallel")
    return mesh, fsdp


def _process_local(dataset) -> bool:
    """Whether ``dataset`` serves only this host's rows (a stream sharded over hosts)."""
    return bool(getattr(stream_of(dataset), "process_local", False))


def _init_or_resume(mngr, cfg, tc: TrainConfig, meta, mesh, fsdp: bool, model_fn, check_dataset: bool, dataset):
    """``(state, shardings)``: restored from the newest readable checkpoint (after the resume check,
    with a streaming dataset put at the checkpoint's position) or fresh.  Unreadable newer
    checkpoints are reported and moved to ``workdir/damaged_checkpoints``."""
    if mngr.latest_step() is None:
        if jax.process_index() == 0 and (old := move_metrics_aside(mngr.directory.parent)) is not None:
            log.warning("no checkpoint to resume from: starting at step 0; the old metrics are kept as %s", old)
        if mesh is not None:
            return create_sharded_train_state(cfg, tc, mesh, fsdp, model_fn=model_fn), None
        return create_train_state(cfg, tc, model=model_fn() if model_fn is not None else None), None
    pad = parallel.fsdp_size(mesh, fsdp) if mesh is not None else 1
    abstract, shardings = abstract_train_state(cfg, tc, model_fn=model_fn, pad_multiple=pad), None
    if mesh is not None:  # read each device's slice straight into the target layout
        shardings = parallel.state_shardings(abstract, mesh, fsdp)
        abstract = parallel.with_shardings(abstract, shardings)

    def read(step):
        saved = read_meta(mngr, step)
        check_compatible(saved, meta, check_dataset=check_dataset)
        return saved, restore_train_state(mngr, step, abstract)

    workdir = Path(mngr.directory).parent
    latest, (saved, state) = newest_intact(mngr, read, then=f"moved to {workdir / DAMAGED_SUBDIR}, resuming from an older one")
    restore_data_state(dataset, saved, latest)
    damaged = [s for s in mngr.all_steps() if s > latest]
    if damaged and jax.process_index() == 0:
        for s in damaged:
            move_aside(mngr.directory, s)
    if damaged:
        mngr.reload()
    if jax.process_index() == 0:
        truncate_metrics(workdir, latest)
    log.info("resumed from %s at step %d", Path(mngr.directory) / str(latest), latest)
    return state, shardings


class _Loop:
    """The stepping part of :func:`train`: runs the steps, checks each loss one step late (so the
    host overlaps the device), logs metrics, saves checkpoints and calls the callbacks."""

    def __init__(self, mngr, meta, tc: TrainConfig, workdir: Path, callbacks, progress: bool, is_main: bool,
                 start: int, t_start: float, logger: MetricsLogger | None = None):
        self.mngr, self.meta, self.tc, self.workdir, self.is_main = mngr, meta, tc, workdir, is_main
        self.own_logger = logger is None  # opened here, closed at the end of run()
        self.logger = logger if logger is not None else open_logger(tc.logger, workdir, meta) if is_main else MetricsLogger()
        self.callbacks = [] if callbacks is None else [callbacks] if callable(callbacks) else list(callbacks)
        self.losses: list[float] = []
        self.last: tuple[int, dict[str, float]] | None = None  # the newest checked step and its metrics
        self.start, self.t0 = start, t_start  # t0: when train() began (the metrics' "time")
        self.log_t, self.log_step = time.perf_counter(), start
        self.pbar = tqdm(total=tc.steps, initial=start, unit="step", disable=not progress, dynamic_ncols=True, desc="train")

    def run(self, state, step_fn, put_batch, dataset, signals: SignalFlag):
        tc, pending = self.tc, None  # pending: (step, device metrics) not yet checked
        try:
            for s in range(self.start, tc.steps):
                if signals.received is not None:
                    break
                state, metrics = step_fn(state, put_batch(dataset.get_batch(s, tc.batch_size)))
                n = s + 1
                if pending is not None:
                    self.check(*pending)
                pending = (n, metrics)
                do_log = n % tc.log_every == 0
                do_ckpt = n % tc.checkpoint_every == 0 or n == tc.steps
                do_sample = bool(self.callbacks) and tc.sample_every > 0 and n % tc.sample_every == 0
                if not (do_log or do_ckpt or do_sample):
                    continue
                host, pending = self.check(*pending), None
                if do_log and self.is_main:
                    self.log(n, host)
                if do_ckpt:
                    save_train_state(self.mngr, state, with_data_state(self.meta, dataset))
                if do_sample:
                    model = ema_model(state)
                    for cb in self.callbacks:
                        cb(n, model)
                    del model
            if pending is not None:
                self.check(*pending)
                pending = None
            if signals.received is not None:
                step = self.save_on_interrupt(state, None, dataset, quiet=True)
                raise Interrupted(signals.received, step)
            return state
        except Interrupted:
            raise
        except KeyboardInterrupt:
            self.save_on_interrupt(state, pending, dataset)
            raise
        finally:
            self.pbar.close()
            if self.own_logger:
                self.logger.close()

    def check(self, n: int, metrics) -> dict[str, float]:
        """Metrics of step ``n`` on the host; raises :class:`NonFiniteLossError` on NaN/inf."""
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])):
            s = self.mngr.latest_step()
            last_good = f"latest checkpoint: step {s} ({self.mngr.directory / str(s)})" if s is not None else "no checkpoint saved"
            raise NonFiniteLossError(
                f"non-finite loss={host['loss']} / grad_norm={host['grad_norm']} at step {n} "
                f"(data batch {n - 1}); stopped without saving; {last_good}",
                n,
            )
        self.losses.append(host["loss"])
        self.last = (n, host)
        self.pbar.update(1)
        return host

    def log(self, n: int, host: dict[str, float]) -> None:
        now = time.perf_counter()
        record = {
            "step": n,
            "loss": host["loss"],
            "grad_norm": host["grad_norm"],
            "lr": host["lr"],
            **{k: v for k, v in host.items() if k not in ("loss", "grad_norm", "lr")},  # loss parts (REPA)
            "steps_per_sec": (n - self.log_step) / max(now - self.log_t, 1e-9),
            "time": now - self.t0,
            "timestamp": time.time(),
        }
        append_metrics(self.workdir, record)
        self.logger.scalars(n, {k: v for k, v in record.items() if k not in ("step", "time", "timestamp")})
        self.log_t, self.log_step = now, n
        self.pbar.set_postfix(loss=f"{host['loss']:.4g}", refresh=False)

    def save_on_interrupt(self, state, pending, dataset, quiet: bool = False) -> int | None:
        """Save ``state`` (and its metrics record, if not logged yet); returns the step saved
        (``quiet``: the caller reports it)."""
        try:
            if pending is not None:
                self.check(*pending)
            if self.is_main and self.last is not None and self.last[0] != self.log_step:
                self.log(*self.last)
            step = save_train_state(self.mngr, state, with_data_state(self.meta, dataset))
            (log.info if quiet else log.warning)("interrupted: saved checkpoint at step %d", step)
            return step
        except NonFiniteLossError as e:
            log.error("interrupted after a non-finite step; not saving: %s", e)
        except Exception as e:  # e.g. state buffers already donated
            log.error("interrupted: could not save a checkpoint: %s", e)
        return None

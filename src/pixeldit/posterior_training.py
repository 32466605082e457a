"""Training, saving and loading of the amortised posterior model (:mod:`pixeldit.posterior_model`).

Simulations are drawn on the fly from the built-in GRF simulator (:class:`pixeldit.data.grf.GRFDataset`,
a fresh batch of ``(theta, field)`` pairs from the prior every step).  The loss has two terms:

* the Gaussian stage's negative log-likelihood of ``u = standardize(theta)``,
  ``1/2 |L^-1 (u - mu)|^2 + sum(log diag L)`` (a proper scoring rule: it fits the posterior's
  mean and covariance);
* flow matching on ``z_1 = L^-1 (u - mu)`` (held fixed by ``stop_gradient``, else the Gaussian
  stage could shrink the flow's target instead of fitting the posterior): ``flow_samples`` pairs
  ``(t, eps)`` per field, ``t ~ U[0, 1]``, ``z_t = t z_1 + (1 - t) eps``, target ``z_1 - eps``.
  The encoder runs once per field, so extra flow samples are nearly free.

Optimiser: AdamW with linear warm-up and a cosine decay, global-norm clipping, and an EMA of the
weights, which is what :func:`train_posterior` returns and saves.  The EMA decay warms up
(:func:`ema_decay_at`): a short run with a fixed 0.999 would keep ``0.999**steps`` of the random
initial weights (18 % after 1,700 steps), which shrinks every posterior towards the prior centre.

Checkpoints: the full training state (weights, optimiser state, EMA, PRNG key, feature
z-scoring, history) is saved every ``checkpoint_every`` steps, at the end and on SIGINT / SIGTERM
(:mod:`pixeldit.posterior_checkpoint`), and training resumes from it.  The PRNG key is saved, not
derived from the step, and the simulations are indexed by step, so a resumed run gives the same
history and weights as an uninterrupted one.  The model for inference is one safetensors file,
``posterior.safetensors``, written at the end: the EMA weights under their ``/``-joined module
path and the model configuration as JSON metadata; written to a temporary file and renamed, so
a reader never sees a partial file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import load_file, save_file
from safetensors import safe_open

from pixeldit.data.grf import GRFDataset
from pixeldit.posterior_checkpoint import PosteriorState, load_state, save_state
from pixeldit.posterior_model import AmortizedPosterior, PosteriorConfig, standardize
from pixeldit.runconfig import RUN_FILE
from pixeldit.training.lock import workdir_lock
from pixeldit.training.loop import Interrupted, SignalFlag

CHECKPOINT_NAME = "posterior.safetensors"
CHECKPOINT_FORMAT = "pixeldit-amortized-posterior-1"
HISTORY_NAME = "history.json"
POSTERIOR_KIND = "posterior"  # model.kind in the run.json of a posterior run (pixeldit.posterior_run)
STANDARDIZE_FIELDS = 4096  # prior simulations that set the z-scoring of the encoder's fixed features
STANDARDIZE_BATCH_INDEX = 10**9  # a GRFDataset batch index no training step reaches (the stream is indexed by step)


@dataclass(frozen=True)
class PosteriorTrainConfig:
    """Optimisation settings of :func:`train_posterior`."""

    steps: int = 56000  # the built-in run (configs/grf-posterior.toml)
    batch_size: int = 64  # simulated fields per step
    flow_samples: int = 8  # (t, eps) pairs per field for the flow-matching term
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    final_lr_fraction: float = 0.02  # the cosine decays to this fraction of the peak
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0  # seeds the simulations (GRFDataset seed) and the model / noise keys
    max_seconds: float | None = None  # stop early after this much wall time (the schedule keeps `steps`)
    checkpoint_every: int = 1000  # save the training state every this many steps (0: only at the end)

    def __post_init__(self):
        for name in ("steps", "batch_size", "flow_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0: only at the end), got {self.checkpoint_every}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def ema_decay_at(step, decay: float):
    """EMA decay used after optimiser step ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def posterior_loss(
    model: AmortizedPosterior, x: jax.Array, theta: jax.Array, key: jax.Array, flow_samples: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Gaussian-stage NLL + flow-matching loss for fields ``(B, H, W, C)`` and parameters ``(B, K)``."""
    summary = model.encode(x)  # (B, S)
    mu, chol = model.gaussian(summary)  # (B, K), (B, K, K)
    r = standardize(theta.astype(jnp.float32), model.config) - mu  # (B, K)
    w = jax.vmap(lambda c, rr: jax.scipy.linalg.solve_triangular(c, rr, lower=True))(chol, r)  # (B, K)
    log_diag = jnp.log(jnp.diagonal(chol, axis1=1, axis2=2))  # (B, K)
    nll = jnp.mean(0.5 * jnp.sum(w * w, axis=-1) + jnp.sum(log_diag, axis=-1))

    b, k = w.shape
    t_key, eps_key = jax.random.split(key)
    z1 = jnp.broadcast_to(jax.lax.stop_gradient(w)[:, None, :], (b, flow_samples, k))  # (B, F, K)
    eps = jax.random.normal(eps_key, z1.shape, jnp.float32)
    t = jax.random.uniform(t_key, (b, flow_samples), jnp.float32)  # (B, F)
    z_t = t[..., None] * z1 + (1.0 - t[..., None]) * eps
    v = model.velocity(z_t, t, summary[:, None, :])  # (B, F, K)
    fm = jnp.mean(jnp.sum((v - (z1 - eps)) ** 2, axis=-1))
    return nll + fm, {"nll": nll, "flow": fm}


def _optimizer(tc: PosteriorTrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, min(tc.warmup_steps, tc.steps // 2), tc.steps, tc.learning_rate * tc.final_lr_fraction
    )
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), optax.adamw(schedule, weight_decay=tc.weight_decay))


def _check_grf_config(config: PosteriorConfig) -> None:
    if config.in_channels != 1 or config.theta_dim != 2:
        raise ValueError(
            f"the GRF simulator gives 1-channel fields and 2 parameters, got in_channels={config.in_channels} "
            f"and {config.theta_dim} parameters"
        )


def _initial_state(config: PosteriorConfig, tc: PosteriorTrainConfig, data: GRFDataset,
                   workdir: str | os.PathLike | None, log: Callable[[str], None] | None):
    """``(graphdef, state, resumed)``: the newest checkpoint of ``workdir`` if it has one, else a fresh
    state (initial weights, and the encoder's feature z-scoring set from prior simulations)."""
    model = AmortizedPosterior(config, rngs=nnx.Rngs(tc.seed))
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    template = PosteriorState(step=0, params=params, opt_state=_optimizer(tc).init(params), ema=params,
                              buffers=buffers, key=jax.random.key(tc.seed + 1), history=_new_history(), running={})
    if workdir is not None:
        resumed = load_state(workdir, template, config.to_dict(), dataclasses.asdict(tc))
        if resumed is not None:
            if log is not None:
                done = " (training finished)" if resumed.step >= tc.steps else ""
                log(f"resuming from the checkpoint at step {resumed.step}/{tc.steps}{done}")
            return graphdef, resumed, True
    model.encoder.set_standardization(data.get_batch(STANDARDIZE_BATCH_INDEX, STANDARDIZE_FIELDS)["x"])
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    state = dataclasses.replace(template, params=params, ema=jax.tree.map(jnp.copy, params), buffers=buffers)
    return graphdef, state, False


def _new_history() -> dict[str, list]:
    return {"step": [], "loss": [], "nll": [], "flow": [], "seconds": []}


def _make_train_step(graphdef, buffers, tc: PosteriorTrainConfig):
    opt, decay = _optimizer(tc), tc.ema_decay

    @jax.jit
    def train_step(params, opt_state, ema, x, theta, key, step):
        def loss_fn(p):
            return posterior_loss(nnx.merge(graphdef, p, buffers), x, theta, key, tc.flow_samples)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        d = ema_decay_at(step, decay)
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        return params, opt_state, ema, dict(parts, loss=loss)

    return train_step


def _log_record(state: PosteriorState, elapsed: float, tc: PosteriorTrainConfig, log) -> None:
    """Append the mean losses since the last record to the history and reset the running sums."""
    h, count = state.history, state.running.pop("count")
    h["step"].append(state.step)
    h["seconds"].append(round(elapsed, 2))
    for name in ("loss", "nll", "flow"):
        h[name].append(state.running[name] / count)
    state.running = {}
    if log is not None:
        log(f"step {state.step}/{tc.steps}  loss {h['loss'][-1]:.4f}  nll {h['nll'][-1]:.4f}  "
            f"flow {h['flow'][-1]:.4f}  {elapsed:.0f}s")


def _flush(state: PosteriorState, pending: list) -> None:
    """Add the losses of the steps in ``pending`` (device scalars, in step order) to the running sums.

    The loop keeps the losses on the device until a record or a checkpoint needs them, so that it
    never waits for a step to finish: the next batch is simulated while the step computes.  The
    sums are the same float64 sums, in the same order, as converting after every step.
    """
    for parts in pending:
        for name, value in parts.items():
            state.running[name] = state.running.get(name, 0.0) + float(value)
        state.running["count"] = state.running.get("count", 0) + 1
    pending.clear()


def _run_steps(state: PosteriorState, train_step, data: GRFDataset, tc: PosteriorTrainConfig, log, log_every: int,
               signals, save: Callable[[PosteriorState], None]) -> None:
    """Train ``state`` in place up to ``tc.steps``, ``tc.max_seconds`` or a signal (checked between steps)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    wall0, cpu0 = state.train_seconds, state.train_cpu_seconds
    pending: list = []

    def clock() -> None:
        now = time.perf_counter()
        state.train_seconds, state.train_cpu_seconds = wall0 + now - start, cpu0 + time.process_time() - cpu_start

    for step in range(state.step, tc.steps):
        if signals.received is not None:
            break
        batch = data.get_batch(step, tc.batch_size)
        state.key, sub = jax.random.split(state.key)
        state.params, state.opt_state, state.ema, parts = train_step(
            state.params, state.opt_state, state.ema, batch["x"], batch["y"], sub, jnp.float32(step))
        state.step = step + 1
        pending.append(parts)
        timed_out = tc.max_seconds is not None and time.perf_counter() - start >= tc.max_seconds
        last = state.step == tc.steps or timed_out
        record = state.step % log_every == 0 or last
        checkpoint = not last and tc.checkpoint_every and state.step % tc.checkpoint_every == 0
        if record or checkpoint:
            _flush(state, pending)  # waits for this step: the times below include its compute
        clock()
        if record:
            _log_record(state, state.train_seconds, tc, log)
        if last:
            break
        if checkpoint:
            save(state)
    if pending:  # a signal stopped the loop between records: wait for its steps, count and time them
        _flush(state, pending)
        clock()


def train_posterior(
    config: PosteriorConfig,
    train_config: PosteriorTrainConfig = PosteriorTrainConfig(),
    *,
    workdir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = print,
    log_every: int = 250,
) -> tuple[AmortizedPosterior, dict]:
    """Train on GRF simulations from the configuration's prior box; return the EMA model and a history.

    With ``workdir``: the full training state is saved there every ``checkpoint_every`` steps and
    at the end (:mod:`pixeldit.posterior_checkpoint`), and a workdir that holds one resumes from it
    (to the same history and weights as an uninterrupted run; a finished run is not trained again);
    at the end the EMA model is saved (:func:`save_posterior`) and the history written to
    ``workdir/history.json``.  SIGINT / SIGTERM let the step under way finish, save the state and
    raise :class:`pixeldit.training.Interrupted` (a ``KeyboardInterrupt``) naming the step saved.
    The workdir's training lock (:func:`pixeldit.training.workdir_lock`) is held throughout.
    """
    _check_grf_config(config)
    with workdir_lock(workdir) if workdir is not None else contextlib.nullcontext():
        return _train_locked(config, train_config, workdir, log, log_every)


def _train_locked(config: PosteriorConfig, tc: PosteriorTrainConfig, workdir: str | os.PathLike | None,
                  log: Callable[[str], None] | None, log_every: int) -> tuple[AmortizedPosterior, dict]:
    data = GRFDataset(config.image_size, seed=tc.seed, prior_low=config.prior_low, prior_high=config.prior_high)
    graphdef, state, resumed = _initial_state(config, tc, data, workdir, log)
    saved = [state.step if resumed else None]  # the step of the newest checkpoint

    def save(s: PosteriorState) -> None:
        if workdir is not None and saved[0] != s.step:
            save_state(workdir, s, config.to_dict(), dataclasses.asdict(tc))
            saved[0] = s.step

    steps_before = state.step
    with SignalFlag() as signals:
        _run_steps(state, _make_train_step(graphdef, state.buffers, tc), data, tc, log, log_every, signals, save)
        save(state)
        if signals.received is not None and state.step < tc.steps:
            raise Interrupted(signals.received, state.step if workdir is not None else None)
        history = dict(state.history, steps_done=state.step, train_seconds=round(state.train_seconds, 2),
                       train_cpu_seconds=round(state.train_cpu_seconds, 2))  # CPU: all threads of this process
        model = nnx.merge(graphdef, state.ema, state.buffers)
        if workdir is not None and (state.step != steps_before or not (Path(workdir) / CHECKPOINT_NAME).is_file()):
            save_posterior(model, workdir)
            _write_json(Path(workdir) / HISTORY_NAME, history)
    return model, history


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------------------------


def _flat_weights(model: AmortizedPosterior) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model))
    return {"/".join(str(p) for p in path): np.asarray(var.get_value()) for path, var in flat}


def save_posterior(model: AmortizedPosterior, workdir: str | os.PathLike) -> Path:
    """Write ``workdir/posterior.safetensors`` atomically (temporary file, then rename)."""
    path = Path(workdir) / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"format": CHECKPOINT_FORMAT, "config": json.dumps(model.config.to_dict())}
    save_file(_flat_weights(model), str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def is_posterior_workdir(workdir: str | os.PathLike) -> bool:
    """Whether ``workdir`` is an amortised posterior run: it holds the checkpoint, or its ``run.json`` says so."""
    path = Path(workdir)
    if (path / CHECKPOINT_NAME).is_file():
        return True
    try:
        model = json.loads((path / RUN_FILE).read_text()).get("model", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(model, dict) and model.get("kind") == POSTERIOR_KIND


def load_posterior(workdir: str | os.PathLike) -> AmortizedPosterior:
    """Load the model saved by :func:`save_posterior` (a run folder or the file itself)."""
    path = Path(workdir)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ValueError(f"expected an amortised posterior checkpoint at {path}, found none")
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an amortised posterior checkpoint (format {meta.get('format')!r})")
    config = PosteriorConfig.from_dict(json.loads(meta["config"]))
    model = nnx.eval_shape(lambda: AmortizedPosterior(config, rngs=nnx.Rngs(0)))
    weights = load_file(str(path))
    flat = nnx.to_flat_state(nnx.state(model))
    names = {"/".join(str(p) for p in k) for k, _ in flat}
    # checkpoints written before the feature z-scoring (2 December 2026) lack its two buffers: identity
    optional = {n for n in names if n.rsplit("/", 1)[-1] in ("feature_shift", "feature_scale")} - set(weights)
    names -= optional
    for key_path, var in flat:
        if "/".join(str(p) for p in key_path) in optional:
            fill = jnp.zeros if key_path[-1] == "feature_shift" else jnp.ones
            var.set_value(fill(var.shape, jnp.float32))
    flat = [(k, v) for k, v in flat if "/".join(str(p) for p in k) not in optional]
    if names != set(weights):
        raise ValueError(f"{path}: weights do not match the model; missing {sorted(names - set(weights))[:5]}, "
                         f"unexpected {sorted(set(weights) - names)[:5]}")
    for key_path, var in flat:
        name = "/".join(str(p) for p in key_path)
        if tuple(weights[name].shape) != tuple(var.shape):
            raise ValueError(f"{path}: {name} has shape {weights[name].shape}, the model expects {var.shape}")
        var.set_value(jnp.asarray(weights[name]))
    return model

"""Training hyper-parameters: :class:`TrainConfig` and the fields that may change on resume."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

from pixeldit import flow
from pixeldit.parallel import validate_mesh_spec
from pixeldit.repa import REPAConfig

__all__ = [
    "COMPUTE_DTYPES",
    "RESUME_FREE_MODEL_FIELDS",
    "RESUME_FREE_TRAIN_FIELDS",
    "RESUME_OPTIMIZER_FIELDS",
    "TrainConfig",
    "effective_model_config",
    "numerics_key",
]

COMPUTE_DTYPES = ("float32", "bfloat16")

#: TrainConfig fields that may change between a checkpoint and a resumed run
#: (they do not affect the optimisation trajectory or the state's structure).
RESUME_FREE_TRAIN_FIELDS = frozenset(
    {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "remat", "mesh", "fsdp", "logger"}
)
#: Optimiser settings a resumed run may change, e.g. a lower ``lr`` after a divergence (they change
#: the trajectory from the checkpoint on, not the state's structure; ``grad_clip`` may change
#: between values but not to or from None, which adds or drops a transform of the optimiser).
RESUME_OPTIMIZER_FIELDS = frozenset({"lr", "warmup_steps", "grad_clip", "ema_decay"})
#: Model config fields that may change on resume (memory/compute trade-offs only).
RESUME_FREE_MODEL_FIELDS = frozenset({"remat", "scan_unroll"})


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
      decay_steps: cosine decay of the lr to 0 over the last ``n = min(decay_steps, steps)``
        updates: the warm-up factor times ``(1 + cos(pi * u)) / 2``, ``u = clip((i - (steps - n))
        / n, 0, 1)``; 0 (default) keeps the lr constant after the warm-up.  With a decay,
        ``steps`` is part of the schedule: a run resumed with other ``steps`` decays toward them.
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
      remat: overrides the model config's ``remat`` (``True``, ``False`` or ``"dots"``, see
        :class:`pixeldit.model_config.PixelDiTConfig`); ``None`` keeps it.
      mesh: device mesh spec for sharded training, e.g. ``"data"`` (data
        parallel on every device), ``"data:4"``, ``"fsdp:8"``,
        ``"data:2,fsdp:2"`` (see :mod:`pixeldit.parallel`); an int ``n`` means
        ``"data:n"``.  ``None`` (default): the unsharded single-device step.
      fsdp: shard parameters, EMA and optimiser moments over the mesh (FSDP)
        instead of replicating them; implied by a mesh with an ``fsdp`` axis.
        ``mesh`` and ``fsdp`` may change when resuming.
      repa: REPA alignment (:class:`pixeldit.repa.REPAConfig`, or its fields as a dict); ``None``
        trains with the flow loss alone.  The projector trains in the same AdamW (and the same
        global-norm clipping) as the model, outside the EMA.
      logger: ``"jsonl"`` (``metrics.jsonl`` only), ``"tensorboard"`` or ``"wandb"`` (both beside
        ``metrics.jsonl``; see :mod:`pixeldit.training.loggers`); may change when resuming.
    """

    batch_size: int = 32
    steps: int = 10_000
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    decay_steps: int = 0
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
    remat: bool | Literal["dots"] | None = None
    mesh: str | None = None
    fsdp: bool = False
    repa: REPAConfig | None = None
    logger: str = "jsonl"

    def __post_init__(self):
        if isinstance(self.repa, Mapping):
            names = {f.name for f in dataclasses.fields(REPAConfig)}
            if set(self.repa) - names:
                raise ValueError(f"unknown REPA fields {sorted(set(self.repa) - names)}; expected some of {sorted(names)}")
            object.__setattr__(self, "repa", REPAConfig(**self.repa))
        if self.repa is not None and not isinstance(self.repa, REPAConfig):
            raise ValueError(f"repa must be a REPAConfig, a table of its fields or None, got {self.repa!r}")
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
        for name in ("warmup_steps", "decay_steps", "sample_every", "seed"):
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
        need(self.logger in ("jsonl", "tensorboard", "wandb"),
             f"logger must be \"jsonl\", \"tensorboard\" or \"wandb\", got {self.logger!r}")
        if self.mesh is not None:
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


def numerics_key(train_config: TrainConfig, **extra_free) -> TrainConfig:
    """``train_config`` with the fields that do not affect the compiled step reset to defaults.

    Compiled steps and initialisers are cached under this key, so a run and its resumption in
    one process share them.  ``steps`` stays in the key when the lr decays toward it
    (``decay_steps > 0``): the compiled step's schedule reads it.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    free = {name: defaults[name] for name in RESUME_FREE_TRAIN_FIELDS}
    if train_config.decay_steps > 0:
        del free["steps"]
    free.update(extra_free)
    return dataclasses.replace(train_config, **free)

"""Training, one concern per module.

``config`` (:class:`TrainConfig`), ``optim`` (clipping + AdamW), ``state`` (:class:`TrainState`:
flat float32 master weights, EMA, optimiser state), ``step`` (the jitted train step, single
device or sharded), ``checkpoint`` (every checkpoint read and write), ``metrics``
(``metrics.jsonl``) and ``loop`` (:func:`train`).  Sharding rules live one floor below, in
:mod:`pixeldit.parallel`.
"""

from pixeldit.training.checkpoint import (
    CHECKPOINT_SUBDIR,
    CONFIG_FILE,
    Checkpoint,
    IncompatibleCheckpointError,
    check_compatible,
    checkpoint_items,
    checkpoint_manager,
    describe_dataset,
    latest_checkpoint_step,
    load_checkpoint,
    read_checkpoint_meta,
    restore_sharded_train_state,
    restore_train_state,
    run_meta,
    save_model_checkpoint,
    save_train_state,
)
from pixeldit.training.config import (
    COMPUTE_DTYPES,
    RESUME_FREE_MODEL_FIELDS,
    RESUME_FREE_TRAIN_FIELDS,
    RESUME_OPTIMIZER_FIELDS,
    TrainConfig,
    effective_model_config,
)
from pixeldit.training.fallback import DAMAGED_SUBDIR
from pixeldit.training.lock import WorkdirLockedError, workdir_lock
from pixeldit.training.loop import Interrupted, NonFiniteLossError, TrainResult, train
from pixeldit.training.metrics import METRICS_FILE, read_metrics
from pixeldit.training.optim import clip_by_global_norm, lr_schedule, make_optimizer
from pixeldit.training.state import (
    TrainState,
    abstract_sharded_state,
    abstract_train_state,
    create_sharded_train_state,
    create_train_state,
    ema_model,
    projector_graphdef,
    train_model,
)
from pixeldit.training.step import (
    make_sharded_train_step,
    make_train_step,
    make_train_step_fn,
    prepare_batch,
    shared_sharded_train_step,
    shared_train_step,
)

__all__ = [
    "CHECKPOINT_SUBDIR",
    "COMPUTE_DTYPES",
    "CONFIG_FILE",
    "Checkpoint",
    "IncompatibleCheckpointError",
    "Interrupted",
    "METRICS_FILE",
    "NonFiniteLossError",
    "RESUME_FREE_MODEL_FIELDS",
    "RESUME_FREE_TRAIN_FIELDS",
    "RESUME_OPTIMIZER_FIELDS",
    "TrainConfig",
    "TrainResult",
    "WorkdirLockedError",
    "TrainState",
    "abstract_sharded_state",
    "abstract_train_state",
    "check_compatible",
    "DAMAGED_SUBDIR",
    "checkpoint_items",
    "checkpoint_manager",
    "clip_by_global_norm",
    "create_sharded_train_state",
    "create_train_state",
    "describe_dataset",
    "effective_model_config",
    "ema_model",
    "latest_checkpoint_step",
    "load_checkpoint",
    "lr_schedule",
    "make_optimizer",
    "make_sharded_train_step",
    "make_train_step",
    "make_train_step_fn",
    "prepare_batch",
    "projector_graphdef",
    "read_checkpoint_meta",
    "read_metrics",
    "restore_sharded_train_state",
    "restore_train_state",
    "run_meta",
    "save_model_checkpoint",
    "save_train_state",
    "shared_sharded_train_step",
    "shared_train_step",
    "train",
    "train_model",
    "workdir_lock",
]

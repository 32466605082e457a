"""Device meshes and sharding rules: data parallel, FSDP, multi-host, batches.

This module is the floor under :mod:`pixeldit.training` and imports nothing from it.  Everything
here is JAX's own SPMD machinery: a :class:`jax.sharding.Mesh`,
:class:`~jax.sharding.NamedSharding` / :class:`~jax.sharding.PartitionSpec`
for every leaf of the train state (:class:`pixeldit.training.TrainState`) and of the batch;
the training package jits the ordinary train step
(:func:`pixeldit.training.step.make_sharded_train_step`) with ``in_shardings``,
``out_shardings`` and the state donated.  XLA's partitioner inserts the
collectives (gradient all-reduce / reduce-scatter, parameter all-gathers); the
step's maths is the single-device one, so a sharded step gives the same loss
and updates as one device on the same global batch (up to float summation
order).

Layouts
-------
* **Data parallel** (default): parameters, EMA and AdamW moments replicated on
  every device; the batch split along its leading axis over *all* mesh axes.
* **FSDP** (``fsdp=True``, or a mesh with an ``fsdp`` axis): the train state
  stores the parameters, their EMA and the AdamW ``mu``/``nu`` as flat vectors
  (:mod:`pixeldit.flat`), zero-padded to a multiple of the FSDP group size (the
  mesh's ``fsdp`` axis if it has one, else the whole mesh) and split evenly
  over it; the step all-gathers the parameters once for the forward pass and
  sums the gradient with an all-reduce, of which each device keeps its part
  (:func:`pixeldit.flat.gather`).  Vectors shorter than ``min_shard_size``
  elements stay replicated.  The batch is still
  split over all mesh axes, so ``"data:2,fsdp:2"`` is hybrid sharding: FSDP
  within pairs of devices, data parallel across pairs.
* Step counter, RNG and non-trainable model variables are always replicated.

Mesh specs (``TrainConfig.mesh``, CLI ``--set train.mesh=...``)::

    "data"            data parallel over every device
    "data:4"          data parallel over 4 devices
    "fsdp:8"          FSDP over 8 devices (FSDP is implied by an fsdp axis)
    "data:2,fsdp:4"   hybrid: 4-way FSDP groups, 2-way data parallel
    "data:-1,fsdp:2"  -1 takes the remaining devices

How-to: one host, several GPUs
------------------------------
``pixeldit train ... --set train.mesh=data`` (data parallel on all local
GPUs) or ``--set train.mesh=fsdp:8`` / ``--set train.mesh=data --set
train.fsdp=true`` (FSDP).  ``train.batch_size`` is the *global* batch and must
be divisible by the number of devices.  From Python::

    from pixeldit import TrainConfig, train
    tc = TrainConfig(batch_size=256, mesh="data:2,fsdp:4")
    train(model_config, tc, dataset, "runs/x")

or by hand (``from pixeldit import parallel, training``): ``mesh = parallel.make_mesh("fsdp:8")``,
``state = training.create_sharded_train_state(cfg, tc, mesh, fsdp=True)``,
``step, _ = training.shared_sharded_train_step(state, tc, mesh, fsdp=True)``,
``state, metrics = step(state, parallel.shard_batch(batch, mesh))``.

How-to: several hosts
---------------------
Start the same command on every host (one process per host, each seeing its
local accelerators).  Before JAX touches a device, :func:`initialize_distributed`
calls :func:`jax.distributed.initialize` when the environment asks for it:

* ``JAX_COORDINATOR_ADDRESS=host0:1234`` (address of process 0, any free port),
  ``JAX_NUM_PROCESSES=<n>`` and ``JAX_PROCESS_ID=<0..n-1>``; optionally
  ``JAX_LOCAL_DEVICE_IDS=0,1,...`` (read by JAX itself); or
* ``PIXELDIT_DISTRIBUTED=1`` to let JAX detect the cluster (Slurm ``srun``,
  Open MPI ``mpirun``, Cloud TPU pods, Kubernetes).
* ``PIXELDIT_DISTRIBUTED=0`` never initialises.

:func:`pixeldit.training.train` calls it itself when a mesh is configured; a
program that uses JAX before that must call it first.  The mesh then spans the
devices of all processes.  Data: every process calls
``dataset.get_batch(step, global_batch)`` (datasets are deterministic in the
step), keeps only the rows its own devices hold (:func:`process_batch_rows`)
and assembles the global array with :func:`jax.make_array_from_process_local_data`
(:func:`shard_batch`), so no process ever transfers another's rows; a data
pipeline that loads only local rows passes them with ``process_local=True``.
Only process 0 writes ``config.json``, ``metrics.jsonl`` and the progress bar;
checkpoints are written by orbax cooperatively (every process writes its own
shards), so ``workdir`` must be on a filesystem all hosts share.

Checkpoints
-----------
orbax writes each array shard by shard (OCDBT), independently of the mesh it
came from.  Restoring builds the abstract state of the *target* layout --
``jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(target_mesh,
spec))`` leaves (:func:`pixeldit.training.abstract_sharded_state`) -- and orbax reads each
device's slice straight into place, so a checkpoint written on 8 devices
restores on 1, on a 2x2 mesh, FSDP or not.  ``mesh``/``fsdp`` are resume-free
train settings: resuming a run on a different mesh is allowed.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

__all__ = [
    "AXES",
    "DEFAULT_MIN_SHARD_SIZE",
    "batch_arrays",
    "batch_axes",
    "batch_sharding",
    "check_batch_size",
    "fsdp_axes",
    "fsdp_size",
    "host_batch",
    "initialize_distributed",
    "local_data_mesh",
    "make_mesh",
    "param_spec",
    "parse_mesh_spec",
    "process_batch_rows",
    "replicated",
    "resolve_fsdp",
    "shard_batch",
    "state_shardings",
    "validate_mesh_spec",
    "with_shardings",
]

#: Mesh axis names understood by the sharding rules.
AXES = ("data", "fsdp")
#: Flat parameter vectors with fewer elements than this stay replicated under FSDP.
DEFAULT_MIN_SHARD_SIZE = 1024

_TRUE = {"1", "true", "yes", "on", "auto"}
_FALSE = {"0", "false", "no", "off", ""}


# --------------------------------------------------------------------------- #
# Multi-host start
# --------------------------------------------------------------------------- #


def _backend_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # pragma: no cover - private API moved
        return False


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    auto: bool | None = None,
) -> bool:
    """Start JAX's multi-host runtime (:func:`jax.distributed.initialize`) when asked to.

    Arguments win over the environment: ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (and ``JAX_LOCAL_DEVICE_IDS``,
    read by JAX).  ``auto=True`` or ``PIXELDIT_DISTRIBUTED=1`` calls
    ``jax.distributed.initialize()`` with JAX's cluster auto-detection (Slurm,
    Open MPI, Cloud TPU, Kubernetes); ``PIXELDIT_DISTRIBUTED=0`` disables
    everything.  Without any of these it does nothing (single process).

    Must run before anything initialises a JAX backend (``jax.devices()``,
    any computation).  Idempotent.  Returns True when the process is part of
    an initialised multi-process run.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    flag = env.get("PIXELDIT_DISTRIBUTED", "").strip().lower()
    if flag in _FALSE - {""}:
        return False
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    explicit = num_processes is not None or process_id is not None
    if auto is None:
        if flag and flag not in _TRUE:
            raise ValueError(f"PIXELDIT_DISTRIBUTED must be 0 or 1, got {env['PIXELDIT_DISTRIBUTED']!r}")
        auto = flag in _TRUE
    if not (explicit or auto):
        return False
    if explicit and (num_processes is None or process_id is None or coordinator_address is None):
        raise ValueError(
            "multi-host start needs the coordinator address, the number of processes and this process's id "
            "(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), got "
            f"coordinator={coordinator_address!r} num_processes={num_processes!r} process_id={process_id!r}"
        )
    if _backend_initialized():
        raise RuntimeError(
            "multi-host training was requested (JAX_NUM_PROCESSES/JAX_PROCESS_ID or PIXELDIT_DISTRIBUTED) "
            "but a JAX backend is already initialised in this process; call "
            "pixeldit.parallel.initialize_distributed() at program start, before any JAX computation"
        )
    kwargs: dict[str, Any] = {}
    if explicit:
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    elif coordinator_address is not None:
        kwargs["coordinator_address"] = coordinator_address
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(**kwargs)
    log.info(
        "jax.distributed initialised: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return True


# --------------------------------------------------------------------------- #
# Mesh
# --------------------------------------------------------------------------- #


def parse_mesh_spec(
    spec: str | int | Mapping[str, int] | Sequence[tuple[str, int]] | None, n_devices: int | None
) -> tuple[tuple[str, int], ...]:
    """Resolve a mesh spec to ``((axis, size), ...)`` whose sizes multiply to at most ``n_devices``.

    ``None``/``""``/``"data"``: data parallel over all devices; an int ``n``:
    ``data:n``; ``"data:2,fsdp:2"``; a mapping or pairs.  One size may be
    ``-1`` (or omitted): the devices left over.  Axis names: ``data``, ``fsdp``.
    ``n_devices=None`` checks the syntax only (a free size stays -1).
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        items: list[tuple[str, int]] = [("data", -1)]
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        items = [("data", int(spec))]
    elif isinstance(spec, str):
        items = []
        for part in spec.replace(" ", "").split(","):
            m = re.fullmatch(r"([A-Za-z_]\w*)(?:[:=](-?\d+))?", part)
            if not m:
                raise ValueError(f"bad mesh spec {spec!r}: expected e.g. 'data:4' or 'data:2,fsdp:2'")
            items.append((m.group(1), int(m.group(2)) if m.group(2) is not None else -1))
    elif isinstance(spec, Mapping):
        items = [(str(k), int(v)) for k, v in spec.items()]
    else:
        items = [(str(k), int(v)) for k, v in spec]
    names = [n for n, _ in items]
    bad = [n for n in names if n not in AXES]
    if bad:
        raise ValueError(f"unknown mesh axis {bad[0]!r} in {spec!r}; axes are {AXES}")
    if len(set(names)) != len(names):
        raise ValueError(f"repeated mesh axis in {spec!r}")
    free = [i for i, (_, s) in enumerate(items) if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis size may be -1/omitted in {spec!r}")
    if any(s == 0 or s < -1 for _, s in items):
        raise ValueError(f"mesh axis sizes must be >= 1 (or -1), got {spec!r}")
    fixed = math.prod(s for _, s in items if s != -1)
    if n_devices is None:
        return tuple(items)
    if free:
        if n_devices % fixed:
            raise ValueError(f"mesh {spec!r}: {n_devices} devices are not divisible by {fixed}")
        items[free[0]] = (items[free[0]][0], n_devices // fixed)
    total = math.prod(s for _, s in items)
    if total > n_devices:
        raise ValueError(f"mesh {spec!r} needs {total} devices, only {n_devices} available")
    return tuple(items)


def validate_mesh_spec(spec: Any) -> None:
    """Raise ``ValueError`` if ``spec`` is not a valid mesh spec (device counts are not checked)."""
    parse_mesh_spec(spec, None)


def make_mesh(spec: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a :class:`jax.sharding.Mesh` from a spec (see :func:`parse_mesh_spec`).

    Devices default to ``jax.devices()`` (all processes); ``jax.make_mesh``
    orders them for the interconnect.  Axes are ``AxisType.Auto`` (the
    compiler propagates shardings through the model).  With several processes
    the mesh must use every device.
    """
    devices = list(jax.devices() if devices is None else devices)
    items = parse_mesh_spec(spec, len(devices))
    shape = tuple(s for _, s in items)
    names = tuple(n for n, _ in items)
    if math.prod(shape) != len(devices):
        if jax.process_count() > 1:
            raise ValueError(f"a multi-host mesh must use all {len(devices)} devices, {spec!r} uses {math.prod(shape)}")
        devices = devices[: math.prod(shape)]
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names), devices=devices)


def local_data_mesh() -> Mesh | None:
    """Data-parallel mesh over this process's devices (:func:`jax.local_devices`); None with one device.

    For work every process does on its own, such as drawing its share of an ADM export
    (:func:`pixeldit.evaluate.fid_eval.adm_export`): no collective crosses hosts.
    """
    devices = jax.local_devices()
    return make_mesh("data", devices) if len(devices) > 1 else None


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def _axes_entry(axes: Sequence[str]):
    axes = tuple(axes)
    return axes[0] if len(axes) == 1 else axes


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes the batch's leading dimension is split over: every axis of size > 1 (all are data-like)."""
    return tuple(n for n in mesh.axis_names if mesh.shape[n] > 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over :func:`batch_axes`, other axes replicated."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, P(_axes_entry(axes)) if axes else P())


def resolve_fsdp(mesh: Mesh, fsdp: bool = False) -> bool:
    """FSDP is on when asked for or when the mesh has an ``fsdp`` axis of size > 1."""
    return bool(fsdp) or mesh.shape.get("fsdp", 1) > 1


def fsdp_axes(mesh: Mesh, fsdp: bool = True) -> tuple[str, ...]:
    """Axes parameters are split over: ``("fsdp",)`` if the mesh has it, else all axes; ``()`` without FSDP."""
    if not resolve_fsdp(mesh, fsdp):
        return ()
    if mesh.shape.get("fsdp", 1) > 1:
        return ("fsdp",)
    return tuple(n for n in mesh.axis_names if mesh.shape[n] > 1)


def param_spec(shape: Sequence[int], n: int, axes: Sequence[str], min_size: int = DEFAULT_MIN_SHARD_SIZE) -> P:
    """FSDP spec of one leaf: its largest axis divisible by ``n`` split over ``axes`` (ties: the later axis).

    ``P()`` (replicated) when ``n <= 1``, the leaf has fewer than ``min_size``
    elements, or no axis is divisible by ``n``.
    """
    shape = tuple(int(d) for d in shape)
    if n <= 1 or not axes or not shape or math.prod(shape) < min_size:
        return P()
    best = None
    for i, d in enumerate(shape):
        if d % n == 0 and (best is None or d >= shape[best]):
            best = i
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = _axes_entry(axes)
    return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool = False, *, min_shard_size: int = DEFAULT_MIN_SHARD_SIZE):
    """Train state (:class:`pixeldit.training.TrainState`) of :class:`NamedSharding` leaves for ``abstract_state``.

    ``abstract_state`` may hold arrays or ``ShapeDtypeStruct``s (only shapes are
    read).  Data parallel: everything replicated.  FSDP: the flat parameter,
    EMA and AdamW-moment vectors (:mod:`pixeldit.flat`) are split evenly over
    :func:`fsdp_axes` (the step gathers the parameters once and all-reduces
    the gradient, :func:`pixeldit.flat.gather`); vectors shorter than
    ``min_shard_size`` or whose length does not divide, step, RNG, optimiser
    counters and ``model_state`` replicated.  Create the state with
    ``pad_multiple=fsdp_size(mesh, fsdp)`` so that its vectors divide.
    """
    repl = replicated(mesh)
    axes = fsdp_axes(mesh, fsdp)
    n = fsdp_size(mesh, fsdp)
    layout = abstract_state.layout

    def leaf(a):
        if not axes or not layout.is_flat(a):
            return repl
        return NamedSharding(mesh, param_spec(a.shape, n, axes, min_shard_size))

    return abstract_state.replace(
        step=repl,
        flat_params=leaf(abstract_state.flat_params),
        flat_ema=leaf(abstract_state.flat_ema),
        opt_state=jax.tree.map(leaf, abstract_state.opt_state),
        rng=repl,
        model_state=jax.tree.map(lambda _: repl, abstract_state.model_state),
        repa=jax.tree.map(lambda _: repl, getattr(abstract_state, "repa", None)),  # the REPA projector: small
    )


def fsdp_size(mesh: Mesh, fsdp: bool = False) -> int:
    """Number of devices the FSDP vectors are split over (1 without FSDP): the state's ``pad_multiple``."""
    axes = fsdp_axes(mesh, fsdp)
    return math.prod(mesh.shape[a] for a in axes) if axes else 1


def with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """``abstract_state`` with each leaf a ``ShapeDtypeStruct`` carrying the matching sharding."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


# --------------------------------------------------------------------------- #
# Batches
# --------------------------------------------------------------------------- #


def batch_arrays(batch: Mapping[str, Any], xp: Any = np) -> dict[str, Any]:
    """The one batch preparation: ``x`` float32, integer ``y`` int32, boolean ``y`` kept, other ``y``
    float32, ``mask`` kept; no ``"y"`` key when ``y`` is absent or None (unconditional).

    ``xp=np`` keeps the arrays on the host (:func:`shard_batch` places them), ``xp=jax.numpy``
    puts them on the default device (:func:`pixeldit.training.step.prepare_batch`).
    """
    out = {"x": xp.asarray(batch["x"], np.float32)}
    y = batch.get("y")
    if y is not None:
        dtype = np.asarray(y).dtype if not hasattr(y, "dtype") else np.dtype(y.dtype)
        if np.issubdtype(dtype, np.integer):
            out["y"] = xp.asarray(y, np.int32)
        elif np.issubdtype(dtype, np.bool_):
            out["y"] = xp.asarray(y)
        else:
            out["y"] = xp.asarray(y, np.float32)
    if batch.get("mask") is not None:
        out["mask"] = xp.asarray(batch["mask"])
    return out


def host_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """:func:`batch_arrays` on the host (numpy arrays)."""
    return batch_arrays(batch, np)


def process_batch_rows(mesh: Mesh, global_batch_size: int, process_index: int | None = None) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` of the global batch held by this process's devices.

    In increasing order; the process-local batch is their concatenation (the
    layout :func:`jax.make_array_from_process_local_data` expects).  One range
    on the usual meshes (a process's devices are contiguous along the batch).
    """
    pid = jax.process_index() if process_index is None else process_index
    sharding = batch_sharding(mesh)
    n = int(global_batch_size)
    rows = set()
    for dev, idx in sharding.devices_indices_map((n,)).items():
        if dev.process_index != pid:
            continue
        start, stop, _ = idx[0].indices(n)
        rows.add((start, stop))
    merged: list[list[int]] = []
    for start, stop in sorted(rows):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


def check_batch_size(n: int, mesh: Mesh) -> None:
    """Raise ``ValueError`` unless the global batch ``n`` splits evenly over the mesh's batch axes."""
    d = math.prod(mesh.shape[a] for a in batch_axes(mesh)) if batch_axes(mesh) else 1
    if n % d:
        raise ValueError(f"global batch size {n} is not divisible by the {d} data-parallel devices of mesh {dict(mesh.shape)}")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, *, process_local: bool = False) -> dict[str, jax.Array]:
    """Put a batch on ``mesh``, split along its leading axis (:func:`batch_sharding`).

    ``batch`` is the *global* batch (every process passes the same one; each
    keeps only its rows, :func:`process_batch_rows`) unless ``process_local``:
    then it holds just this process's rows, in that order.  Arrays are built
    with :func:`jax.make_array_from_process_local_data`; dtypes as in
    :func:`batch_arrays`.
    """
    b = host_batch(batch)
    sharding = batch_sharding(mesh)
    nproc = len({d.process_index for d in mesh.devices.flat})
    if process_local:
        local_n = b["x"].shape[0]
        global_n = local_n * nproc
    else:
        global_n = b["x"].shape[0]
    check_batch_size(global_n, mesh)
    if not process_local and nproc > 1:
        rows = process_batch_rows(mesh, global_n)
        b = {k: np.concatenate([v[a:z] for a, z in rows]) if len(rows) > 1 else v[rows[0][0] : rows[0][1]] for k, v in b.items()}
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_n,) + v.shape[1:]) for k, v in b.items()
    }

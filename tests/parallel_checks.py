"""Sharded-training checks on simulated CPU devices, run as subprocesses by test_parallel.py.

Usage::

    python tests/parallel_checks.py single OUT.json WORKDIR   # one process, 4 devices
    python tests/parallel_checks.py multi OUT.json WORKDIR    # one of 2 processes, 2 devices each
                                                              # (JAX_COORDINATOR_ADDRESS etc. set),
                                                              # resuming the single run's checkpoint

The device count must be forced before JAX initialises, hence separate
processes (pytest-xdist workers share one JAX runtime between test modules).
Each run writes one JSON object of measurements; the assertions live in
test_parallel.py.

Compiles are the expensive part on CPU, so the single-process run has five,
each reused: the single-device and the sharded (``fsdp:4``) initialisation,
the single-device step, the data-parallel step on ``data:4`` and the FSDP step
on ``fsdp:4``; the ``train()`` runs (fresh on ``fsdp:4``, resumed on
``data:4``) reuse them, and restoring onto other meshes compiles nothing.
XLA's CPU backend optimisation is turned down (the same flags for every
variant compared) to shorten compiles several-fold.
"""

import os
import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else "single"
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
_flags.append(f"--xla_force_host_platform_device_count={2 if MODE == 'multi' else 4}")
for _flag in (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
):
    if not any(f.startswith(_flag.split("=")[0]) for f in _flags):
        _flags.append(_flag)
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pixeldit import parallel as par  # noqa: E402
from pixeldit import training as T  # noqa: E402
from pixeldit.model import C2IConfig  # noqa: E402

CFG = C2IConfig(
    in_channels=1, patch_size=4, hidden_size=32, num_groups=2, patch_depth=2, pixel_depth=1, pixel_hidden_size=8, num_classes=10
)
TC = T.TrainConfig(
    batch_size=8, steps=4, lr=1e-3, ema_decay=0.9, p_uncond=0.1, grad_clip=1.0, log_every=1, checkpoint_every=2
)


class Data:
    """Deterministic 8x8 single-channel batches with labels 0..9."""

    def get_batch(self, step, batch_size):
        rng = np.random.default_rng([7, step])
        return {
            "x": rng.uniform(-1, 1, size=(batch_size, 8, 8, 1)).astype(np.float32),
            "y": rng.integers(0, 10, size=batch_size).astype(np.int32),
        }

    def metadata(self):
        return {"name": "parallel-checks"}


def host(tree):
    return [np.array(a) for a in jax.tree.leaves(tree)]


def host_state(state):
    """Every per-leaf array of a train state, as a checkpoint stores it (independent of padding and mesh)."""
    return host(T.checkpoint_items(state))


def maxdiff(a, b):
    la, lb = host(a) if not isinstance(a, list) else a, host(b) if not isinstance(b, list) else b
    assert len(la) == len(lb)
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0)) for x, y in zip(la, lb))


def _spec(a):
    return (str(a.sharding.spec), list(a.addressable_shards[0].data.shape), list(a.shape))


def flat_specs(state):
    """{name: (spec, per-device shard shape, shape)} of the flat vectors (parameters, EMA, Adam moments)."""
    adam = state.opt_state[1][0]
    return {name: _spec(a) for name, a in
            (("params", state.flat_params), ("ema", state.flat_ema), ("mu", adam.mu), ("nu", adam.nu))}


def leaf_specs(tree):
    """{path: (spec, shard shape, shape)} of the sharded leaves of a per-leaf tree."""
    return {jax.tree_util.keystr(path): _spec(a) for path, a in jax.tree_util.tree_leaves_with_path(tree)
            if any(e is not None for e in a.sharding.spec)}


def run_steps(step_fn, state, put, n=2, first=0):
    losses = []
    for s in range(first, first + n):
        state, m = step_fn(state, put(Data().get_batch(s, TC.batch_size)))
        losses.append(float(m["loss"]))
    return state, losses


def tc(**kw):
    return dataclasses.replace(TC, **kw)


def single(out_path, workdir):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    res = {"devices": jax.device_count(), "timings": {}}
    t0 = (time.perf_counter(), time.process_time())

    def lap(name):  # wall and CPU seconds of each phase
        nonlocal t0
        now = (time.perf_counter(), time.process_time())
        res["timings"][name] = [round(now[0] - t0[0], 2), round(now[1] - t0[1], 2)]
        print(name, res["timings"][name], flush=True)
        t0 = now

    # ---- initial state, created directly in the FSDP layout on fsdp:4 (train()'s fresh start)
    mesh_f = par.make_mesh("fsdp:4")
    fs_state = T.create_sharded_train_state(CFG, TC, mesh_f, fsdp=True)
    one = T.create_train_state(CFG, TC)  # its flat vectors are unpadded, fs_state's padded for 4 devices
    init_np = jax.tree.map(np.array, one)  # host copy: the start of the single-device and data-parallel runs
    res["fsdp_init_maxdiff"] = maxdiff(host_state(one), host_state(fs_state))
    res["layout"] = {"size": fs_state.layout.size, "padded_size": fs_state.layout.padded_size,
                     "unpadded_size": one.layout.padded_size}
    lap("init")

    # ---- single-device reference: four steps of train()'s shared step, from the same values
    dev0 = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ref_step, _ = T.shared_train_step(fs_state.graphdef, TC)
    ref, ref_losses = run_steps(ref_step, jax.device_put(init_np, dev0), T.prepare_batch)
    ref_host = host_state(ref)  # per-leaf, so states of any padding compare
    ref_params = host(ref.params)
    ref, more = run_steps(ref_step, ref, T.prepare_batch, first=2)
    res["ref_losses"] = ref_losses + more
    res["ref_final"] = host_state(ref)
    np.savez(workdir / "ref_final.npz", *res["ref_final"])  # for the multi-process run
    res["ref_leaves"] = len(res["ref_final"])
    lap("single_device")

    # ---- data parallel on data:4 (state replicated, batch split 4 ways)
    mesh4 = par.make_mesh("data:4")
    sh = par.state_shardings(init_np, mesh4, fsdp=False)
    dp_state = jax.device_put(init_np, sh)
    res["dp_all_replicated"] = all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree.leaves(sh))
    dp_step, dp_traces = T.shared_sharded_train_step(dp_state, TC, mesh4)
    batch0 = par.shard_batch(Data().get_batch(0, TC.batch_size), mesh4)
    res["batch_spec"] = str(batch0["x"].sharding.spec)
    res["batch_shard_shape"] = list(batch0["x"].addressable_shards[0].data.shape)
    dp, dp_losses = run_steps(dp_step, dp_state, lambda b: par.shard_batch(b, mesh4))
    res["dp_losses"] = dp_losses
    res["dp_state_maxdiff"] = maxdiff(ref_host, host_state(dp))
    res["dp_params_maxdiff"] = maxdiff(ref_params, host(dp.params))
    res["dp_traces"] = dp_traces[0]
    res["dp_donated"] = all(a.is_deleted() for a in jax.tree.leaves(dp_state))
    lap("data_parallel")

    # ---- FSDP on fsdp:4
    res["fsdp_specs"] = flat_specs(fs_state)
    res["fsdp_replicated_rest"] = all(
        a.sharding.spec == jax.sharding.PartitionSpec()
        for a in jax.tree.leaves((fs_state.step, fs_state.rng, fs_state.model_state, fs_state.opt_state[1][0].count))
    )
    fs_step, fs_traces = T.shared_sharded_train_step(fs_state, TC, mesh_f, fsdp=True)
    hlo = fs_step.lower(fs_state, par.shard_batch(Data().get_batch(0, TC.batch_size), mesh_f)).compile().as_text()
    res["fsdp_collectives"] = {
        op: [line.split(" = ")[1].split(f" {op}")[0] for line in hlo.splitlines() if re.search(rf"\b{op}(-start)?\(", line)]
        for op in ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
    }
    fs, fs_losses = run_steps(fs_step, fs_state, lambda b: par.shard_batch(b, mesh_f))
    res["fsdp_losses"] = fs_losses
    res["fsdp_state_maxdiff"] = maxdiff(ref_host, host_state(fs))
    res["fsdp_params_maxdiff"] = maxdiff(ref_params, host(fs.params))
    res["fsdp_out_specs_kept"] = flat_specs(fs) == res["fsdp_specs"]
    res["fsdp_checkpoint_leaf_specs"] = leaf_specs(T.checkpoint_items(fs)["params"])  # per-leaf views stay split
    res["fsdp_traces"] = fs_traces[0]
    lap("fsdp")

    # ---- checkpoint saved from the 4-device FSDP layout, restored on other meshes
    saved = host_state(fs)
    meta = {"model_config": CFG.to_dict(), "train_config": TC.to_dict(), "dataset": Data().metadata()}
    with T.checkpoint_manager(workdir / "ckpt") as mngr:
        step = T.save_train_state(mngr, fs, meta)
    res["saved_step"] = step
    lap("checkpoint_save")
    restored = {}
    with T.checkpoint_manager(workdir / "ckpt", read_only=True) as mngr:
        one = T.restore_train_state(mngr, step, T.abstract_train_state(CFG, TC))
        restored["one_device"] = one
        mesh22 = par.make_mesh("data:2,fsdp:2")
        restored["mesh_2x2_fsdp"] = T.restore_sharded_train_state(mngr, step, CFG, TC, mesh22, fsdp=True)
    res["restore"] = {}
    for name, st in restored.items():
        devs = {d for a in jax.tree.leaves(st) for d in a.sharding.device_set}
        res["restore"][name] = {
            "maxdiff": maxdiff(saved, host_state(st)),
            "n_devices": len(devs),
            "step": int(st.step),
            "specs": flat_specs(st) if name != "one_device" else {},
        }
    expected = par.state_shardings(restored["mesh_2x2_fsdp"], mesh22, fsdp=True)
    res["restore"]["mesh_2x2_fsdp"]["layout_as_requested"] = all(
        a.sharding == s for a, s in zip(jax.tree.leaves(restored["mesh_2x2_fsdp"]), jax.tree.leaves(expected))
    )
    lap("checkpoint")

    # ---- train(): start on fsdp:4 (FSDP), resume on data:4 (replicated); compare with one device
    a = T.train(CFG, tc(steps=2, mesh="fsdp:4", fsdp=True), Data(), workdir / "run", progress=False).summary
    lap("train_fsdp4")
    b = T.train(CFG, tc(steps=4, mesh="data:4"), Data(), workdir / "run", progress=False).summary
    lap("train_resume_data4")
    res["train"] = {
        "a": {k: a[k] for k in ("start_step", "step", "losses", "traces")},
        "b": {k: b[k] for k in ("start_step", "step", "losses", "traces")},
        "metrics_steps": [r["step"] for r in T.read_metrics(workdir / "run")],
        "saved_mesh": T.read_checkpoint_meta(workdir / "run")["train_config"]["mesh"],
    }
    with T.checkpoint_manager(workdir / "run", read_only=True) as mngr:
        final = T.restore_train_state(mngr, 4, T.abstract_train_state(CFG, TC))
    res["train"]["final_state_maxdiff"] = maxdiff(res.pop("ref_final"), host_state(final))
    lap("compare")

    Path(out_path).write_text(json.dumps(res, indent=1))


def multi(out_path, workdir):
    """One process of a 2-process run (2 CPU devices each).

    ``workdir`` holds the step-2 checkpoint the single-process run saved from
    ``fsdp:4``; ``train()`` resumes it on the 2x2 mesh ``data:2,fsdp:2``
    spanning both processes (data axis across processes, fsdp within).
    """
    t0 = time.perf_counter()
    started = par.initialize_distributed()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    mesh = par.make_mesh("data:2,fsdp:2")
    res = {
        "initialized": started,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "devices": jax.device_count(),
        "rows": par.process_batch_rows(mesh, TC.batch_size),
        "mesh_processes": [[d.process_index for d in row] for row in mesh.devices],
    }
    full = Data().get_batch(0, TC.batch_size)
    batch = par.shard_batch(full, mesh)  # every process passes the global batch and keeps its rows
    res["shards_match"] = all(
        np.array_equal(np.asarray(sh.data), full[k][sh.index]) for k in ("x", "y") for sh in batch[k].addressable_shards
    )
    res["batch_shape"] = list(batch["x"].shape)
    t1 = time.perf_counter()
    s = T.train(CFG, tc(steps=4, mesh="data:2,fsdp:2"), Data(), workdir, progress=False).summary
    res["timings"] = {"start": round(t1 - t0, 2), "train": round(time.perf_counter() - t1, 2)}
    res["summary"] = {k: s[k] for k in ("start_step", "step", "losses", "traces")}
    Path(out_path).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    {"single": single, "multi": multi}[MODE](sys.argv[2], sys.argv[3])

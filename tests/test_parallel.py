"""Tests for pixeldit.parallel: data parallel / FSDP steps, resharding restores, multi-host.

The device-level checks need 4 CPU devices (``--xla_force_host_platform_device_count``),
which must be set before JAX initialises, so they run in subprocesses
(``tests/parallel_checks.py``): one process with 4 devices, then a 2-process
``jax.distributed`` run on localhost (2 devices per process) that resumes the
first run's checkpoint.  Each subprocess writes its measurements as JSON; the
tests here assert on them.
The remaining tests are pure logic and run in-process.
"""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pixeldit import parallel as par
from pixeldit import training as T

SCRIPT = Path(__file__).with_name("parallel_checks.py")
TOL = 1e-5
TIMEOUT = 600  # generous: compiles are slow on a loaded 2-core machine


def _env(cache=False, **extra):
    drop = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "PIXELDIT_DISTRIBUTED")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(JAX_PLATFORMS="cpu", **extra)
    import jax

    cache_dir = jax.config.jax_compilation_cache_dir  # the session's persistent cache (conftest.py), if any
    if cache and cache_dir:
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache_dir),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    return env


def _fail(what, proc):
    out = proc.stdout[-4000:] if proc.stdout else ""
    err = proc.stderr[-4000:] if proc.stderr else ""
    pytest.fail(f"{what} failed (rc={proc.returncode}):\n{out}\n{err}")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("parallel_single")
    out = d / "out.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "single", str(out), str(d / "work")],
        env=_env(cache=True), capture_output=True, text=True, timeout=TIMEOUT,
    )
    if proc.returncode != 0 or not out.exists():
        _fail("4-device check script", proc)
    return dict(json.loads(out.read_text()), workdir=d / "work")


@pytest.fixture(scope="module")
def multi(single, tmp_path_factory):
    """Two processes resume the single run's step-2 checkpoint (saved from fsdp:4) on a 2x2 mesh."""
    d = tmp_path_factory.mktemp("parallel_multi")
    shutil.copytree(single["workdir"] / "ckpt", d / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = _env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        cmd = [sys.executable, str(SCRIPT), "multi", str(d / f"out{pid}.json"), str(d / "run")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for pid, p in enumerate(procs):
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            if p.returncode != 0 or not (d / f"out{pid}.json").exists():
                _fail(f"process {pid} of the 2-process run", subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
            results.append(json.loads((d / f"out{pid}.json").read_text()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"procs": results, "workdir": d / "run"}


# --------------------------------------------------------------------------- 4 devices, one process


def test_data_parallel_step_matches_one_device(single):
    assert single["devices"] == 4
    assert single["dp_all_replicated"]
    assert single["batch_spec"] == "P('data',)" and single["batch_shard_shape"] == [2, 8, 8, 1]
    np.testing.assert_allclose(single["dp_losses"], single["ref_losses"][:2], rtol=0, atol=TOL)
    assert single["dp_params_maxdiff"] < TOL
    assert single["dp_state_maxdiff"] < TOL  # params, EMA, Adam moments, step, rng
    assert single["dp_traces"] == 1  # compiled once for both steps
    assert single["dp_donated"]


def test_fsdp_step_matches_one_device_and_shards_parameters(single):
    assert single["fsdp_init_maxdiff"] == 0.0  # sharded init == create_train_state
    np.testing.assert_allclose(single["fsdp_losses"], single["ref_losses"][:2], rtol=0, atol=TOL)
    assert single["fsdp_params_maxdiff"] < TOL
    assert single["fsdp_state_maxdiff"] < TOL
    lay = single["layout"]
    assert lay["padded_size"] % 4 == 0 and 0 <= lay["padded_size"] - lay["size"] < 4  # padded for 4 devices
    assert lay["unpadded_size"] == lay["size"]  # one device: no padding
    # parameters, EMA and both Adam moments: one vector each, split evenly 4 ways
    assert set(single["fsdp_specs"]) == {"params", "ema", "mu", "nu"}
    for name, (spec, shard, full) in single["fsdp_specs"].items():
        assert (spec, shard, full) == ("P('fsdp',)", [lay["padded_size"] // 4], [lay["padded_size"]]), name
    assert single["fsdp_replicated_rest"]  # step, RNG, counters, model_state
    # communication: one all-gather of the parameter vector, the gradients summed by all-reduce
    # (a reduce-scatter once XLA fuses it with the split), nothing re-split piece by piece
    coll = single["fsdp_collectives"]
    assert coll["all-gather"] == [f"f32[{lay['padded_size']}]{{0}}"], coll
    assert coll["all-reduce"] or coll["reduce-scatter"], coll
    assert not coll["collective-permute"] and not coll["all-to-all"], coll
    # per-leaf views for checkpoints stay split (largest divisible axis), never gathered on one device
    leaf = single["fsdp_checkpoint_leaf_specs"]["['patch_blocks']['adaLN_modulation']['layers'][0]['kernel'].value"]
    assert leaf == ["P(None, None, 'fsdp')", [2, 32, 48], [2, 32, 192]]
    assert single["fsdp_out_specs_kept"]  # the step returns the state in the same layout
    assert single["fsdp_traces"] == 1


def test_checkpoint_from_4_devices_restores_on_1_device_and_2x2(single):
    r = single["restore"]
    assert single["saved_step"] == 2
    one, grid = r["one_device"], r["mesh_2x2_fsdp"]
    assert one["maxdiff"] == 0.0 and one["n_devices"] == 1 and one["step"] == 2
    assert grid["maxdiff"] == 0.0 and grid["n_devices"] == 4 and grid["step"] == 2
    assert grid["layout_as_requested"]
    assert set(grid["specs"]) == set(single["fsdp_specs"])
    for name, (spec, shard, full) in grid["specs"].items():  # now 2-way (fsdp axis of the 2x2 mesh)
        assert spec == "P('fsdp',)" and full[0] % 2 == 0 and shard == [full[0] // 2], name


def test_train_resumes_on_a_different_mesh(single):
    t = single["train"]
    a, b = t["a"], t["b"]
    assert (a["start_step"], a["step"]) == (0, 2)  # fresh, FSDP on fsdp:4
    assert (b["start_step"], b["step"]) == (2, 4)  # resumed, data parallel on data:4
    np.testing.assert_allclose(a["losses"] + b["losses"], single["ref_losses"], rtol=0, atol=TOL)
    assert a["traces"] == 0 and b["traces"] == 0  # reused the steps compiled above (mesh is resume-free)
    assert t["metrics_steps"] == [1, 2, 3, 4]
    assert t["saved_mesh"] == "data:4"
    assert t["final_state_maxdiff"] < TOL


# --------------------------------------------------------------------------- 2 processes x 2 devices


@pytest.mark.slow  # ~30 s more: two more JAX processes, each compiling the step
def test_multi_process_resume_matches_one_device(single, multi):
    p0, p1 = multi["procs"]
    for i, p in enumerate((p0, p1)):
        assert p["initialized"] and p["process_index"] == i and p["process_count"] == 2
        assert p["local_devices"] == 2 and p["devices"] == 4
        assert p["mesh_processes"] == [[0, 0], [1, 1]]  # data axis across processes, fsdp within
        assert p["shards_match"] and p["batch_shape"] == [8, 8, 8, 1]
        s = p["summary"]
        assert (s["start_step"], s["step"]) == (2, 4)  # resumed the 1-process fsdp:4 checkpoint
        np.testing.assert_allclose(s["losses"], single["ref_losses"][2:], rtol=0, atol=TOL)
    assert p0["rows"] == [[0, 4]] and p1["rows"] == [[4, 8]]  # each process holds its half of the batch
    run = multi["workdir"]
    assert sorted(x.name for x in (run / T.CHECKPOINT_SUBDIR).iterdir()) == ["2", "4"]
    assert [r["step"] for r in T.read_metrics(run)] == [3, 4]  # written once, by process 0
    # the checkpoint both processes wrote restores on one device and matches the reference
    import jax

    with T.checkpoint_manager(run, read_only=True) as mngr:
        from pixeldit.model import config_from_dict

        meta = T.read_checkpoint_meta(run)
        assert meta["train_config"]["mesh"] == "data:2,fsdp:2"
        abstract = T.abstract_train_state(config_from_dict(meta["model_config"]), T.TrainConfig.from_dict(meta["train_config"]))
        state = T.restore_train_state(mngr, 4, abstract)
    ref = np.load(single["workdir"] / "ref_final.npz")  # per-leaf checkpoint items of the reference
    leaves = jax.tree.leaves(T.checkpoint_items(state))
    assert len(leaves) == len(ref.files) == single["ref_leaves"]
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - ref[f"arr_{i}"]), initial=0.0)) for i, a in enumerate(leaves))
    assert diff < TOL


# --------------------------------------------------------------------------- pure logic (in-process)


def test_parse_mesh_spec():
    assert par.parse_mesh_spec(None, 8) == (("data", 8),)
    assert par.parse_mesh_spec("data", 8) == (("data", 8),)
    assert par.parse_mesh_spec(4, 8) == (("data", 4),)
    assert par.parse_mesh_spec("data:2,fsdp:2", 4) == (("data", 2), ("fsdp", 2))
    assert par.parse_mesh_spec("data:-1, fsdp:2", 8) == (("data", 4), ("fsdp", 2))
    assert par.parse_mesh_spec("fsdp", 4) == (("fsdp", 4),)
    assert par.parse_mesh_spec({"fsdp": 2}, 4) == (("fsdp", 2),)
    assert par.parse_mesh_spec("data:-1,fsdp:3", None) == (("data", -1), ("fsdp", 3))
    for bad, n, msg in [
        ("model:2", 4, "unknown mesh axis"),
        ("data:2,data:2", 4, "repeated"),
        ("data,fsdp", 4, "at most one"),
        ("data:8", 4, "needs 8 devices"),
        ("data:-1,fsdp:3", 4, "not divisible"),
        ("data:0", 4, ">= 1"),
        ("data:x", 4, "bad mesh spec"),
    ]:
        with pytest.raises(ValueError, match=msg):
            par.parse_mesh_spec(bad, n)


def test_param_spec_rule():
    P = par.P
    assert par.param_spec((2, 32, 192), 4, ("fsdp",), 1024) == P(None, None, "fsdp")
    assert par.param_spec((2, 32, 85), 4, ("fsdp",), 1024) == P(None, "fsdp", None)  # 85 not divisible
    assert par.param_spec((256, 32), 4, ("data", "fsdp"), 1024) == P(("data", "fsdp"), None)
    assert par.param_spec((32, 32), 4, ("fsdp",), 1024) == P(None, "fsdp")  # tie: the later axis
    assert par.param_spec((11, 32), 4, ("fsdp",), 1024) == P()  # below min size
    assert par.param_spec((3, 1023, 5), 4, ("fsdp",), 1) == P()  # nothing divisible
    assert par.param_spec((), 4, ("fsdp",), 0) == P()
    assert par.param_spec((64, 64), 1, ("fsdp",), 0) == P()


def test_train_config_mesh_fields_validated_and_resume_free():
    c = T.TrainConfig(mesh="data:2,fsdp:2", fsdp=True)
    assert T.TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert T.TrainConfig(mesh=4).mesh == "data:4"
    with pytest.raises(ValueError, match="mesh"):
        T.TrainConfig(mesh="tensor:2")
    with pytest.raises(ValueError, match="fsdp"):
        T.TrainConfig(fsdp="yes")
    assert {"mesh", "fsdp"} <= T.RESUME_FREE_TRAIN_FIELDS
    base = T.TrainConfig()
    meta = lambda tc: {"model_config": {"a": 1}, "train_config": tc.to_dict(), "dataset": None}  # noqa: E731
    T.check_compatible(meta(base), meta(dataclasses.replace(base, mesh="fsdp:8", fsdp=True)))
    old = meta(base)
    del old["train_config"]["mesh"], old["train_config"]["fsdp"]  # a checkpoint from before these fields
    T.check_compatible(old, meta(dataclasses.replace(base, mesh="data")))


def test_initialize_distributed_only_when_asked(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "PIXELDIT_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    assert par.initialize_distributed() is False  # single process: nothing to do
    monkeypatch.setenv("PIXELDIT_DISTRIBUTED", "0")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    assert par.initialize_distributed() is False  # explicitly disabled
    monkeypatch.delenv("PIXELDIT_DISTRIBUTED")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        par.initialize_distributed()  # incomplete multi-host settings are an error, not a silent single run
    monkeypatch.setenv("PIXELDIT_DISTRIBUTED", "maybe")
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    with pytest.raises(ValueError, match="PIXELDIT_DISTRIBUTED"):
        par.initialize_distributed()

"""ADM export data parallel over 2 simulated CPU devices equals the single-device export; two
``jax.distributed`` processes share an export and process 0 joins it after the barrier.

The device count must be forced before JAX initialises, so the exports run in subprocesses
(``tests/adm_sharded_checks.py``), which write their files and measurements; the assertions are here.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pixeldit.evaluate.fid_eval import as_uint8_rgb, batch_seed

SCRIPT = Path(__file__).with_name("adm_sharded_checks.py")
TIMEOUT = 600  # generous: compiles are slow on a loaded 2-core machine


def _env(**extra):
    drop = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS",
            "PIXELDIT_DISTRIBUTED")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("adm_sharded")
    env = _env()
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    if proc.returncode:
        pytest.fail(f"adm_sharded_checks.py failed (rc={proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return out, json.loads((out / "result.json").read_text())


def test_every_batch_is_drawn_on_both_devices_with_replicated_weights(checks):
    _, r = checks
    assert r["devices"] == 2 and r["mesh_shape"] == {"data": 2}
    # batches of 3, 3, 1 samples: padded to 4, 4, 2 rows, split over both devices, weights on both
    assert [s["noise_rows"] for s in r["seen_two"]] == [4, 4, 2]
    assert all(s["noise_devices"] == 2 and s["out_devices"] == 2 and s["params_replicated_on"] == 2
               for s in r["seen_two"])
    assert [s["noise_rows"] for s in r["seen_one"]] == [3, 3, 1]  # no mesh: the single-device path as before
    assert all(s["noise_devices"] == 1 for s in r["seen_one"])


def test_sharded_export_writes_the_same_files_as_one_device(checks):
    out, r = checks
    assert (r["one"]["batches"], r["one"]["batches_drawn"]) == (3, 3)
    assert (r["two"]["batches"], r["two"]["batches_drawn"]) == (3, 3)
    names = sorted(p.name for p in (out / "one").iterdir())
    assert names == ["batch_000000.npz", "batch_000001.npz", "batch_000002.npz", "samples_7.npz"]
    assert sorted(p.name for p in (out / "two").iterdir()) == names
    for name in names:
        with np.load(out / "one" / name) as a, np.load(out / "two" / name) as b:
            assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape[1:] == (8, 8, 3)
            assert b["arr_0"].dtype == np.uint8 and b["arr_0"].shape == a["arr_0"].shape
            np.testing.assert_array_equal(b["arr_0"], a["arr_0"])
            np.testing.assert_array_equal(b["arr_1"], a["arr_1"])
    with np.load(out / "two" / "samples_7.npz") as f:
        assert f["arr_0"].shape == (7, 8, 8, 3)
        np.testing.assert_array_equal(f["arr_1"], (np.arange(7) * 3) % 10)


def test_sharded_draw_equals_the_single_device_draw(checks):
    out, _ = checks
    with np.load(out / "floats.npz") as f:
        one, two = f["one"], f["two"]
    assert one.shape == (7, 8, 8, 1) and np.isfinite(one).all() and one.std() > 0
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)


def test_sharded_export_resumes_the_missing_batch(checks):
    _, r = checks
    assert (r["resumed"]["batches_drawn"], r["resumed"]["batches_skipped"]) == (1, 2)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_share_an_export_and_process_0_merges_after_the_barrier(tmp_path):
    addr = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), "multi"],
                              env=_env(JAX_COORDINATOR_ADDRESS=addr, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=TIMEOUT)
        if p.returncode:
            pytest.fail(f"process {i} failed (rc={p.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
    r0, r1 = (json.loads((tmp_path / f"result_{i}.json").read_text()) for i in range(2))
    assert (r0["process_count"], r0["process_index"], r1["process_index"]) == (2, 0, 1)
    assert (r0["batches"], r0["batches_drawn"], r1["batches_drawn"]) == (4, 2, 2)  # 7 samples in 2s: 0, 2 | 1, 3
    assert r0["merged_exists_on_return"]  # process 0 merged only after process 1's late files were there
    with np.load(tmp_path / "shared" / "samples_7.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (7, 4, 4, 3)
    np.testing.assert_array_equal(labels, np.arange(7) % 10)
    # the stand-in sampler of adm_sharded_checks.py, batch i seeded by batch_seed(5, i)
    expected = [as_uint8_rgb(np.random.default_rng(batch_seed(5, i)).uniform(-1, 1, (n, 4, 4, 3))
                             .astype(np.float32)) for i, n in enumerate((2, 2, 2, 1))]
    np.testing.assert_array_equal(images, np.concatenate(expected))

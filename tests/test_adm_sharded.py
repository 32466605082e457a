"""ADM export data parallel over 2 simulated CPU devices equals the single-device export.

The device count must be forced before JAX initialises, so the export runs in a subprocess
(``tests/adm_sharded_checks.py``), which writes its files and measurements; the assertions are here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("adm_sharded_checks.py")
TIMEOUT = 600  # generous: compiles are slow on a loaded 2-core machine


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("adm_sharded")
    drop = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS",
            "PIXELDIT_DISTRIBUTED")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    if proc.returncode:
        pytest.fail(f"adm_sharded_checks.py failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
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

"""ADM export on 2 simulated CPU devices, run as a subprocess by test_adm_sharded.py.

Usage::

    python tests/adm_sharded_checks.py OUT_DIR          # one process, 2 devices
    python tests/adm_sharded_checks.py OUT_DIR multi    # one of 2 jax.distributed processes
                                                        # (JAX_COORDINATOR_ADDRESS etc. set)

The device count must be forced before JAX initialises, hence a separate process.  A tiny
class-conditional model (random weights) draws the same export twice: on one device
(``mesh=None``, the single-device path) into ``OUT_DIR/one`` and data parallel over both
devices into ``OUT_DIR/two``; then batch 1 of ``two`` is deleted and the sharded export
resumed.  It writes ``OUT_DIR/result.json`` (counts, shardings seen by the sampler) and
``OUT_DIR/floats.npz`` (the float samples of both paths); the assertions live in the test.
In ``multi`` mode each process exports its share of a numpy-drawn export into ``OUT_DIR/shared``
with the real barrier (process 1 after a pause, so that process 0 waits for its files) and
writes ``OUT_DIR/result_<process>.json``.
"""

import os
import sys

_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
_flags.append("--xla_force_host_platform_device_count=2")
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pixeldit import parallel  # noqa: E402
from pixeldit.conditions import draw_samples  # noqa: E402
from pixeldit.evaluate.fid_eval import adm_export  # noqa: E402
from pixeldit.model import C2IConfig, build_model  # noqa: E402
from pixeldit.sampling import api as sampling_api  # noqa: E402  (where _dispatch looks up _run)

CFG = C2IConfig(in_channels=1, patch_size=4, hidden_size=32, num_groups=2, patch_depth=2, pixel_depth=1,
                pixel_hidden_size=8, num_classes=10)
NUM, BATCH, SEED = 7, 3, 5  # 3 batches (3, 3, 1): a batch of 3 pads to 4 on 2 devices, the last 1 to 2


def main(out: Path) -> None:
    model = build_model(CFG, rngs=nnx.Rngs(0))
    y = (np.arange(NUM) * 3) % CFG.num_classes
    y_null = np.full(NUM, CFG.num_classes)
    seen = []
    run = sampling_api._run

    def spy(static_model, params, noise, *args, **kwargs):
        x, xs, info = run(static_model, params, noise, *args, **kwargs)
        leaves = jax.tree.leaves(params)
        seen.append({"noise_devices": len(noise.sharding.device_set), "noise_rows": int(noise.shape[0]),
                     "out_devices": len(x.sharding.device_set),
                     "params_replicated_on": min(len(a.sharding.device_set) for a in leaves)
                     if all(a.sharding.is_fully_replicated for a in leaves) else 0})
        return x, xs, info

    sampling_api._run = spy
    mesh = parallel.local_data_mesh()

    def drawer(m):
        def draw(yb, ynb, seed):
            return draw_samples(model, CFG, (8, 8), yb, ynb, method="heun", steps=2, guidance=2.0,
                                seed=seed, batch_size=BATCH, mesh=m)
        return draw

    one = adm_export(drawer(None), y, y_null, out / "one", batch_size=BATCH, seed=SEED, labels=True)
    seen_one, seen[:] = list(seen), []
    two = adm_export(drawer(mesh), y, y_null, out / "two", batch_size=BATCH, seed=SEED, labels=True)
    seen_two, seen[:] = list(seen), []
    (out / "two" / "batch_000001.npz").unlink()
    resumed = adm_export(drawer(mesh), y, y_null, out / "two", batch_size=BATCH, seed=SEED, labels=True)
    floats = {name: drawer(m)(y, y_null, SEED) for name, m in (("one", None), ("two", mesh))}
    np.savez(out / "floats.npz", **floats)
    result = {"devices": jax.local_device_count(), "mesh_shape": dict(mesh.shape) if mesh is not None else None,
              "one": one, "two": two, "resumed": resumed, "seen_one": seen_one, "seen_two": seen_two}
    (out / "result.json").write_text(json.dumps(result))


def numpy_draw(yb, ynb, seed):
    """A stand-in sampler: images fixed by the batch seed."""
    return np.random.default_rng(seed).uniform(-1, 1, (len(yb), 4, 4, 3)).astype(np.float32)


def multi(out: Path) -> None:
    import time  # noqa: PLC0415

    parallel.initialize_distributed()
    pid = jax.process_index()
    if pid == 1:
        time.sleep(2.0)  # process 0 reaches the barrier first: its merge must wait for these files
    y = np.arange(NUM) % CFG.num_classes
    res = adm_export(numpy_draw, y, y, out / "shared", batch_size=2, seed=SEED, labels=True)
    res["merged_exists_on_return"] = Path(res["adm_npz"]).is_file()
    (out / f"result_{pid}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "multi":
        multi(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))

"""Benchmark of the streaming loader (pixeldit.data.stream) on a folder of 10,000 small PNGs.

Makes (once) a folder of generated 32x32 RGB PNGs in 10 class subfolders, then runs each
measurement in its own process so that peak memory is not shared between them:

* ``loader``: batches/s of the loader alone (``workers`` decoding processes, 0 = threads only);
* ``train-memory``: train steps/s of a small PixelDiT on the folder loaded into memory
  (:func:`pixeldit.data.load_image_folder`);
* ``train-stream``: the same steps fed by the streaming iterator;
* ``train-ab``: both feeds in one process, alternating blocks of 10 steps on one compiled step
  (the throughput ratio of the two, robust to the machine's load changing between runs).

Peak resident memory is ``ru_maxrss`` of the process (plus the largest worker process);
``rss_before`` is the resident memory just before the first batch is read.

    PYTHONPATH=src JAX_PLATFORMS=cpu python scripts/bench_streaming.py [--workers 0 2] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path("/tmp/pixeldit_stream_bench")


def make_folder(root: Path, n: int, classes: int, size: int) -> Path:
    """``root/c<k>/<i>.png``: smooth random colour images (seeded), written once."""
    from PIL import Image

    folder = root / f"png{n}_{size}"
    done = folder / ".complete"
    if done.exists():
        return folder
    rng = np.random.default_rng(0)
    for i in range(n):
        k = i % classes
        (folder / f"c{k}").mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # a random 4x4 colour field, upsampled
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        img.save(folder / f"c{k}" / f"{i:05d}.png")
    done.write_text("ok")
    return folder


def rss_mib() -> float:
    """Current resident memory of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mib": round(own, 1), "peak_worker_rss_mib": round(children, 1)}


def run_loader(folder: Path, args) -> dict:
    from pixeldit.data.stream import open_stream

    ds = open_stream(folder, seed=0)
    it = ds.iterator(args.batch, workers=args.workers)
    before = rss_mib()
    for _ in range(args.warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    dt = time.perf_counter() - t0
    it.close()
    return {"batches_per_s": round(args.batches / dt, 2), "images_per_s": round(args.batches * args.batch / dt, 1),
            "rss_before_mib": round(before, 1), **peak_mib()}


def _train_setup(ds, args):
    from pixeldit.model import C2IConfig
    from pixeldit.training import TrainConfig, create_train_state, make_train_step

    h, w, c = ds.image_shape
    mc = C2IConfig(in_channels=c, num_classes=ds.num_classes, hidden_size=64, num_groups=2, patch_depth=4,
                   pixel_depth=1, pixel_hidden_size=16, patch_size=4)
    tc = TrainConfig(batch_size=args.batch, steps=args.steps, lr=1e-3, seed=0)
    state = create_train_state(mc, tc)
    return state, make_train_step(state.graphdef, tc)


def run_train(folder: Path, args, streaming: bool) -> dict:
    import jax

    from pixeldit.data import load_image_folder
    from pixeldit.data.stream import open_stream
    from pixeldit.training import prepare_batch

    if streaming:
        ds = open_stream(folder, seed=0)
        it = ds.iterator(args.batch, workers=args.workers)
        next_batch = lambda step: next(it)  # noqa: E731
    else:
        ds = load_image_folder(folder, seed=0)
        next_batch = lambda step: ds.get_batch(step, args.batch)  # noqa: E731
    state, step_fn = _train_setup(ds, args)
    before = rss_mib()
    for s in range(args.warmup):  # compile and fill the loader's buffers
        state, metrics = step_fn(state, prepare_batch(next_batch(s)))
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for s in range(args.warmup, args.warmup + args.steps):
        state, metrics = step_fn(state, prepare_batch(next_batch(s)))
    jax.block_until_ready(metrics)
    dt = time.perf_counter() - t0
    if streaming:
        it.close()
    return {"steps_per_s": round(args.steps / dt, 3), "rss_before_mib": round(before, 1), **peak_mib()}


def run_train_ab(folder: Path, args) -> dict:
    """Both feeds in one process, alternating blocks of steps: the ratio is robust to load drift."""
    import jax

    from pixeldit.data import load_image_folder
    from pixeldit.data.stream import open_stream
    from pixeldit.training import prepare_batch

    memory = load_image_folder(folder, seed=0)
    it = open_stream(folder, seed=0).iterator(args.batch, workers=args.workers)
    feeds = {"memory": lambda s: memory.get_batch(s, args.batch), "stream": lambda s: next(it)}
    state, step_fn = _train_setup(memory, args)
    for s in range(args.warmup):
        for feed in feeds.values():
            state, metrics = step_fn(state, prepare_batch(feed(s)))
    jax.block_until_ready(metrics)
    seconds = {k: 0.0 for k in feeds}
    block, s = 10, args.warmup
    for _ in range(max(1, args.steps // block)):
        for name, feed in feeds.items():
            t0 = time.perf_counter()
            for _ in range(block):
                state, metrics = step_fn(state, prepare_batch(feed(s)))
                s += 1
            jax.block_until_ready(metrics)
            seconds[name] += time.perf_counter() - t0
    it.close()
    n = max(1, args.steps // block) * block
    rate = {k: n / v for k, v in seconds.items()}
    return {"memory_steps_per_s": round(rate["memory"], 3), "stream_steps_per_s": round(rate["stream"], 3),
            "stream_over_memory": round(rate["stream"] / rate["memory"], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["all", "loader", "train-memory", "train-stream", "train-ab"], default="all")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=100, help="timed loader batches")
    p.add_argument("--steps", type=int, default=50, help="timed train steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, nargs="+", default=[0])
    args = p.parse_args()
    folder = make_folder(ROOT, args.n, args.classes, args.size)
    if args.mode != "all":
        args.workers = args.workers[0]
        fn = {"loader": run_loader, "train-memory": lambda f, a: run_train(f, a, False),
              "train-stream": lambda f, a: run_train(f, a, True), "train-ab": run_train_ab}[args.mode]
        print(json.dumps({"mode": args.mode, "workers": args.workers, **fn(folder, args)}), flush=True)
        return
    common = [f"--n={args.n}", f"--classes={args.classes}", f"--size={args.size}", f"--batch={args.batch}",
              f"--batches={args.batches}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
    runs = [("loader", w) for w in args.workers] + [("train-memory", 0)] + [("train-stream", w) for w in args.workers]
    runs += [("train-ab", w) for w in args.workers]
    print(json.dumps({"folder": str(folder), "images": args.n, "cpus": os.cpu_count(), "load_avg": os.getloadavg()}))
    for mode, w in runs:
        out = subprocess.run([sys.executable, __file__, f"--mode={mode}", "--workers", str(w), *common],
                             capture_output=True, text=True, check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        print(lines[-1] if lines else json.dumps({"mode": mode, "workers": w, "error": out.stderr[-2000:]}), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Where the device time of a profiled run goes: ``python scripts/trace_summary.py TRACE [--steps N]``.

``TRACE`` is the ``perfetto_trace.json.gz`` that ``pixeldit bench --profile DIR`` writes under
``DIR/plugins/profile/<time>/`` (or that folder itself).  Device events (GPU/TPU streams; a
CPU-only trace has none) are summed by HLO operation and by kind (matrix products,
fused attention, collectives, copies, other fusions), per train step when ``--steps`` says how
many steps the trace holds.  With ``--hlo train_step.hlo.txt`` each operation's line of the
optimised program is shown beside it.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path

KINDS = [  # first match wins; tested against the HLO op name and the kernel name
    ("attention", re.compile(r"fmha|cudnn|flash|attention", re.I)),
    ("matmul", re.compile(r"gemm|cublas|nvjet|dot|matmul|xmma|triton_gemm", re.I)),
    ("collective", re.compile(r"nccl|all-reduce|all-gather|reduce-scatter|collective|all_reduce|all_gather", re.I)),
    ("dynamic-(update-)slice", re.compile(r"dynamic[-_]update[-_]slice|dynamic[-_]slice", re.I)),
    ("copy/transpose", re.compile(r"^copy|memcpy|transpose|memset", re.I)),
    ("reduction fusion", re.compile(r"reduce", re.I)),
]


def kind_of(*names: str) -> str:
    for kind, rx in KINDS:
        if any(rx.search(n or "") for n in names):
            return kind
    return "other fusion/kernel"


def load(path: Path) -> list[dict]:
    if path.is_dir():
        path = next(path.rglob("perfetto_trace.json.gz"))
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--steps", type=int, default=1, help="train steps in the trace (bench --profile: 3)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--hlo", type=Path, help="optimised HLO text (train_step.hlo.txt) to quote each op from")
    args = ap.parse_args()

    events = load(args.trace)
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device_pids = {pid for pid, name in procs.items() if re.search(r"GPU|TPU|device", name, re.I)}
    print("processes:", {pid: procs[pid] for pid in sorted(procs)})
    spans = [e for e in events if e.get("ph") == "X" and e["pid"] in device_pids]
    if not spans:
        raise SystemExit("no device events in this trace (CPU-only run?)")

    by_stream = collections.Counter()
    by_op: dict[str, float] = collections.Counter()
    kernel_of: dict[str, str] = {}
    by_kind = collections.Counter()
    for e in spans:
        a = e.get("args", {})
        op = a.get("hlo_op") or a.get("long_name") or e["name"]
        if op.startswith("command_buffer"):  # a CUDA graph of many kernels: name them one by one
            op = e["name"]
        dur = float(e.get("dur", 0.0)) / 1e3  # ms
        by_stream[threads.get((e["pid"], e.get("tid")), str(e.get("tid")))] += dur
        by_op[op] += dur
        kernel_of.setdefault(op, e["name"])
        by_kind[kind_of(op, e["name"])] += dur
    n = max(args.steps, 1)
    total = sum(by_op.values())
    print(f"\ndevice busy time: {total / n:.2f} ms per step ({len(spans)} events, {n} step(s))")
    print("by stream:", {k: round(v / n, 2) for k, v in by_stream.most_common()})
    print("\nby kind (ms per step, share):")
    for kind, v in by_kind.most_common():
        print(f"  {kind:24s} {v / n:9.2f}  {100 * v / total:5.1f} %")

    hlo_lines: dict[str, str] = {}
    if args.hlo is not None:
        for line in args.hlo.read_text().splitlines():
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
            if m:
                hlo_lines.setdefault(m.group(1), m.group(2)[:160])
    print(f"\ntop {args.top} operations (ms per step, share, kind, kernel):")
    for op, v in by_op.most_common(args.top):
        print(f"  {v / n:8.3f}  {100 * v / total:5.1f} %  {kind_of(op, kernel_of[op]):18s} {op[:60]}  [{kernel_of[op][:50]}]")
        if op in hlo_lines:
            print(f"             {hlo_lines[op]}")


if __name__ == "__main__":
    main()

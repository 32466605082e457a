#!/usr/bin/env bash
# Prepared benchmark runs on a lent GPU (docs/benchmark-log.md, "GPU"): one call, one budget.
#
#   bash scripts/gpu_bench.sh BUDGET_S [VARIANT ...]
#
# Each VARIANT is a string of `pixeldit bench` options for the xl16-256 preset, optionally
# prefixed by environment settings (e.g. "PIXELDIT_ATTENTION=xla --batch 32"); the default list
# is the preset itself (batch 64, stacks unrolled by scan_unroll="auto"), then batch 32, then the
# stacks as a loop, then the preset with --gemm-floor (docs/benchmark-log.md).  A variant starts only when the budget left is at least 1.2x the first
# one's duration.  With CHECKS=1 (default) it first runs
# the tiny preset and the cuDNN-vs-XLA attention test; when the machine's own flax/optax cannot
# run the package it falls back to the tested versions carried in .whl/ (made beforehand with
# `pip download --no-deps --only-binary=:all: -d .whl flax==0.12.8 optax==0.2.8
# orbax-checkpoint==0.12.8`; without it, that fallback stops the script).  Everything printed
# goes to $OUT/gpu_bench.log, each result's JSON to $OUT/<variant>.json; a variant with
# --profile DIR also leaves DIR's Perfetto trace and train-step HLO in $OUT.
set -u
BUDGET=${1:-300}; shift || true
if [ $# -eq 0 ]; then set -- "" "--batch 32" "--scan-unroll 1" "--gemm-floor"; fi
OUT=${OUT:-/tmp/pixeldit-gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_bench.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
left() { echo $((BUDGET - SECONDS)); }
show() { $PY -c "import json,sys; from pixeldit.bench import format_result; r=json.loads(open(sys.argv[1]).read().splitlines()[-1]); print(format_result(r)); print('cudnn attention calls', r['cudnn_attention_calls'], '| remat', r['remat'], '| unroll', r['scan_unroll'], '| attention', r['attention'])" "$1"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"

if [ "${CHECKS:-1}" = 1 ]; then
  if ! timeout 90 $PY -m pixeldit bench --preset tiny --repeats 2 --json > "$OUT/tiny.json"; then
    echo "== tiny bench failed on the machine's packages; retrying with the carried wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PWD/src:/tmp/site"
    timeout 90 $PY -m pixeldit bench --preset tiny --repeats 2 --json > "$OUT/tiny.json" || exit 1
  fi
  timeout 90 $PY -m pixeldit bench --preset tiny --repeats 1 --gemm-floor --json > "$OUT/tiny_gemm_floor.json" \
    || echo "== bench --gemm-floor failed on the tiny preset"
  echo "== cuDNN attention vs XLA ($(left) s left)"
  if ! timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_attention_backend.py > "$OUT/attention_test.log" 2>&1; then
    echo "== cuDNN attention check failed: benchmarks run with PIXELDIT_ATTENTION=xla"; export PIXELDIT_ATTENTION=xla
  fi
  tail -n 3 "$OUT/attention_test.log"
fi

FIRST=""
for variant in "$@"; do
  if [ -n "$FIRST" ] && [ "$(left)" -lt $(( FIRST * 12 / 10 )) ]; then echo "== skipped: $variant"; continue; fi
  name=xl16-256$(echo "$variant" | tr -c 'A-Za-z0-9_\n' '_' | tr -s '_')
  envs=(); opts=()
  for tok in $variant; do case $tok in *=*) envs+=("$tok");; *) opts+=("$tok");; esac; done
  echo "== xl16-256 $variant ($(left) s left)"
  T0=$SECONDS
  env "${envs[@]}" timeout $(( $(left) - 5 )) $PY -m pixeldit bench --preset xl16-256 "${opts[@]}" --json > "$OUT/$name.json" && show "$OUT/$name.json"
  FIRST=${FIRST:-$(( SECONDS - T0 ))}
  prof=$(echo "$variant" | sed -n 's/.*--profile \([^ ]*\).*/\1/p')
  if [ -n "$prof" ]; then
    cp "$(find "$prof" -name perfetto_trace.json.gz | head -n 1)" "$OUT/$name.perfetto_trace.json.gz"
    gzip -c "$prof/train_step.hlo.txt" > "$OUT/$name.train_step.hlo.txt.gz"
  fi
done
echo "== done in $SECONDS s"

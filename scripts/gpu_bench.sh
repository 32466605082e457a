#!/usr/bin/env bash
# One prepared benchmark run on a lent GPU (see docs/PERF_NOTES.md, "GPU").
#
# Runs on the device machine's own Python (jax with its CUDA plugin); when that machine's flax
# or optax cannot run the package, it falls back to the tested versions carried in .whl/.
# Everything it prints also goes to $OUT/gpu_bench.log; each benchmark's JSON to $OUT.
# Usage (device root of this repo): bash scripts/gpu_bench.sh [seconds-budget]
set -u
BUDGET=${1:-300}
OUT=${OUT:-/tmp/pixeldit-gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_bench.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
left() { echo $((BUDGET - SECONDS)); }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"

if ! timeout 90 $PY -m pixeldit bench --preset tiny --repeats 2 --json > "$OUT/tiny.json"; then
  echo "== tiny bench failed on the machine's packages; retrying with the carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD/src:/tmp/site"
  timeout 90 $PY -m pixeldit bench --preset tiny --repeats 2 --json > "$OUT/tiny.json" || exit 1
fi
tail -n 1 "$OUT/tiny.json"

echo "== cuDNN attention vs XLA ($(left) s left)"
if ! timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_rope_attention.py -k "cudnn or attention_implementation" > "$OUT/attention_test.log" 2>&1; then
  echo "== cuDNN attention check failed: benchmarks run with PIXELDIT_ATTENTION=xla"; export PIXELDIT_ATTENTION=xla
fi
tail -n 3 "$OUT/attention_test.log"
show() { $PY -c "import json,sys; from pixeldit.bench import format_result; r=json.loads(open(sys.argv[1]).read().splitlines()[-1]); print(format_result(r)); print('cudnn attention calls', r['cudnn_attention_calls'], '| remat', r['remat'])" "$1"; }

echo "== xl16-256, batch 32 ($(left) s left)"
T0=$SECONDS
timeout $(( $(left) - 5 )) $PY -m pixeldit bench --preset xl16-256 --json > "$OUT/xl16-256-b32.json" && show "$OUT/xl16-256-b32.json"
T1=$(( SECONDS - T0 ))  # one xl16-256 benchmark's duration

for variant in "--remat false" "--batch 64 --remat false"; do
  if [ "$(left)" -gt $(( T1 * 12 / 10 )) ]; then  # only what should finish
    name=xl16-256$(echo "$variant" | tr -d ' -')
    echo "== xl16-256 $variant ($(left) s left)"
    timeout $(( $(left) - 5 )) $PY -m pixeldit bench --preset xl16-256 $variant --json > "$OUT/$name.json" && show "$OUT/$name.json"
  fi
done
if [ "$(left)" -gt 40 ]; then
  echo "== s8-64 ($(left) s left)"
  timeout $(( $(left) - 5 )) $PY -m pixeldit bench --preset s8-64 --json > "$OUT/s8-64.json" && tail -n 1 "$OUT/s8-64.json"
fi
echo "== done in $SECONDS s"

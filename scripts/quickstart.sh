#!/usr/bin/env bash
# The main job on a fresh machine: create .venv (if absent), install pixeldit, train the built-in
# `digits` run (class-conditional PixelDiT on scikit-learn's handwritten digits; <= 10 minutes on
# 2 CPU cores), draw samples, evaluate them, and say where the pictures and numbers are.
#
#   bash scripts/quickstart.sh                          # everything with the defaults
#   bash scripts/quickstart.sh --set train.steps=400    # extra arguments go to `pixeldit train`
#   WORKDIR=runs/other bash scripts/quickstart.sh       # another run directory
#
# Running it again resumes training from the last checkpoint (a finished run is not retrained).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${WORKDIR:-runs/digits}

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e .
PIXELDIT=.venv/bin/pixeldit

echo "== train (progress bar: loss, steps/s, ETA; sample grids every few hundred steps)"
"$PIXELDIT" train digits --workdir "$WORKDIR" "$@"
echo "== sample (EMA weights, classifier-free guidance)"
"$PIXELDIT" sample "$WORKDIR"
echo "== eval (independent scikit-learn classifier on 500 class-conditional samples)"
"$PIXELDIT" eval "$WORKDIR"

cat <<MSG

Pictures:
  $WORKDIR/samples/samples.png          samples, one column per class
  $WORKDIR/samples/step_*.png           EMA samples next to real digits during training
  $WORKDIR/eval/samples_vs_real.png     generated vs real digits
Numbers:
  $WORKDIR/eval/metrics.json            accuracy, per-class diversity, checks
  $WORKDIR/metrics.jsonl                training loss per logged step
Arrays:
  $WORKDIR/samples/samples.npz          x (N, 16, 16, 1) in [-1, 1], y labels
MSG

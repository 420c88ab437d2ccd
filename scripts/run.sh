#!/usr/bin/env bash
# The main job on the embedded default data (scikit-learn's digits, no download):
# cross-check the hand-written backprop against jax.grad and finite differences, then train
# 64-128-128-10 ReLU (He init, SGD with momentum) and report the test accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/digits-$(date +%Y%m%d-%H%M%S)}
echo "== cross-check: hand-written backprop vs jax.grad vs finite differences =="
.venv/bin/fnbp check --sizes 64,128,128,10 --batch-size 32
echo
echo "== training on digits (hand-written grads) =="
.venv/bin/fnbp train --dataset digits --sizes 64,128,128,10 --activation relu --init he_normal \
  --optimizer sgd --lr 0.02 --momentum 0.9 --l2 1e-3 --epochs 30 --seed 0 --grads manual --out "$out"

#!/usr/bin/env bash
# The main job, in four steps on the bundled digits:
#   1. the initialization study: He vs naive vs LeCun vs Glorot, trained at 5 and 30 hidden
#      layers, 8 seeds each, plain SGD;
#   2. gradient stability at init: ‖δ⁽ˡ⁾‖² across 30 layers of 512 units beside mean-field
#      theory (4 seeds here; the experiment's default is 10);
#   3. the cures at init (dropout, BatchNorm, LayerNorm, residual blocks) beside theory (4 seeds,
#      no finite-width sweep here; the experiment's default is 8 seeds and the sweep);
#   4. the cures trained: plain, residual (α = 1, 1/√L), BatchNorm, LayerNorm and residual +
#      BatchNorm nets of 30 hidden layers, He vs naive init, SGD and Adam, 4 seeds, 5 epochs.
# Each experiment's full run is its own command (docs/experiments/, one page each).
# Usage: bash scripts/run.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-results/main-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
start=$SECONDS
.venv/bin/python experiments/init_study.py --depths 5,30 \
  --schemes naive,lecun_normal,glorot_normal,he_normal --seeds 8 --epochs 20 \
  --out "$out/init_study" --overwrite
echo
.venv/bin/python experiments/gradient_stability.py --seeds 4 \
  --out "$out/gradient_stability" --overwrite
echo
.venv/bin/python experiments/cures.py --seeds 4 --sweep-widths "" --out "$out/cures" --overwrite
echo
.venv/bin/python experiments/cures_training.py --datasets digits --depths 30 --seeds 4 \
  --epochs 5 --out "$out/cures_training" --overwrite
echo
echo "main job: $((SECONDS - start)) s; reports:"
for name in init_study gradient_stability cures cures_training; do
  echo "  $out/$name/report.md"
done

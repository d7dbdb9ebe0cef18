#!/usr/bin/env bash
# The mixed-precision study of the docs (issue 26): the three small Fashion-MNIST models, plain QDrop, uniform
# W2/W3/W4 against searched allocations at the size of uniform W3 and of uniform W2 plus 10 %, every measure,
# 3 seeds; then the front tables/plots and the measures' rank correlation with top-1. Runs are Ray tasks in
# two lanes of one thread; finished runs are skipped, so re-running continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-outputs/bits}
SEEDS=${SEEDS:-1 2 3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for model in mbv2 resnet regnet; do
  $PY -m mrecg bits --config configs/fashion/${model}_2_4.yaml --uniform 2 3 4 --budgets size=w3 'size=w2*1.1' \
      --measures output fisher weight random --seeds $SEEDS --set mrecg.metric=none --out "$OUT/$model" \
      --ray --ray-cpus 1 --correlate
done

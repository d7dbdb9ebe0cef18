#!/usr/bin/env bash
# The Fashion-MNIST benchmark of the README: both small models, every method, W4A4/W2A4/W3A3/W2A2, 3 seeds,
# plus MRECG with the loss metric on the MobileNetV2 model (issue 3). Two sweeps run side by side, one per
# model, one thread each (two torch processes with default threads oversubscribe a 2-core machine).
# Finished runs are skipped, so re-running continues where it stopped. Then:
#   python scripts/collect_results.py outputs/fashion --out outputs/fashion/table
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-outputs/fashion}
SEEDS=${SEEDS:-1 2 3}
MQ_SEEDS=${MQ_SEEDS:-$SEEDS}
BITS="4_4 2_4 3_3 2_2"
COMMON=(--set process.cache_calibration=true)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

sweep_model() {  # $1 = mbv2 | resnet
  local cfg=configs/fashion/$1_2_4.yaml
  if [ "$1" = mbv2 ]; then  # issue 3 first: plain QDrop vs MRECG (ModCap and loss metric) at W2A4 and W3A3
    $PY scripts/sweep.py --configs "$cfg" --bits 2_4 3_3 --methods nearest qdrop mrecg+qdrop \
      --grouping modcap loss --k 3 --seeds $SEEDS --out "$OUT" "${COMMON[@]}"
  fi
  $PY scripts/sweep.py --configs "$cfg" --bits $BITS --methods nearest adaround brecq qdrop mrecg+brecq mrecg+qdrop \
    --grouping modcap --k 3 --seeds $SEEDS --out "$OUT" "${COMMON[@]}"
  $PY scripts/sweep.py --configs "$cfg" --bits $BITS --methods mqbench-brecq mqbench-qdrop \
    --seeds $MQ_SEEDS --out "$OUT" "${COMMON[@]}"
}

sweep_model mbv2 > "$OUT.mbv2.log" 2>&1 &
sweep_model resnet > "$OUT.resnet.log" 2>&1 &
wait

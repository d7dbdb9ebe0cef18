#!/usr/bin/env bash
# The Fashion-MNIST benchmark of the README: both small models, every method, W4A4/W2A4/W3A3/W2A2, 3 seeds,
# plus MRECG with the loss metric on the MobileNetV2 model (issue 3). Two lanes of sweeps run side by side,
# one thread each (two torch processes with default threads oversubscribe a 2-core machine).
# Finished runs are skipped, so re-running continues where it stopped. Then:
#   mrecg collect outputs/fashion --out outputs/fashion/table
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-outputs/fashion}
SEEDS=${SEEDS:-1 2 3}
MQ_SEEDS=${MQ_SEEDS:-$SEEDS}
BITS="4_4 2_4 3_3 2_2"
# the paper's grouping rule, with which the README's table was made (the defaults are now the safe rule)
COMMON=(--set process.cache_calibration=true mrecg.difference=squared mrecg.exclude_classifier=false
        mrecg.group_iterations=one_unit)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

run() {  # $1 = model (mbv2 | resnet), $2 = bit pairs, $3 = methods; then the MRECG variants via --grouping
  local cfg=configs/fashion/$1_2_4.yaml bits=$2 methods=$3; shift 3
  $PY -m mrecg sweep --configs "$cfg" --bits $bits --methods $methods --seeds $SEEDS --out "$OUT" "${COMMON[@]}" "$@"
}
ALL="nearest adaround brecq qdrop mrecg+brecq mrecg+qdrop"
MQ="mqbench-brecq mqbench-qdrop"

lane1() {  # issue 3 first (plain QDrop vs MRECG with ModCap and with the loss metric, MBV2 W2A4 and W3A3)
  run mbv2 "2_4 3_3" "nearest qdrop mrecg+qdrop" --grouping modcap loss --k 3
  run mbv2 "2_4 3_3" "$ALL" --grouping modcap --k 3
  SEEDS=$MQ_SEEDS run mbv2 "2_4 3_3" "$MQ"
  run resnet "2_4 3_3" "mrecg+qdrop" --grouping loss --k 3
}
lane2() {
  run resnet "$BITS" "$ALL" --grouping modcap --k 3
  SEEDS=$MQ_SEEDS run resnet "$BITS" "$MQ"
  run mbv2 "4_4 2_2" "$ALL" --grouping modcap --k 3
  SEEDS=$MQ_SEEDS run mbv2 "4_4 2_2" "$MQ"
}

lane1 > "$OUT.lane1.log" 2>&1 &
lane2 > "$OUT.lane2.log" 2>&1 &
wait

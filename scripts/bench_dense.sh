#!/usr/bin/env bash
# The dense-prediction benchmarks (issue 33) on the composed Fashion-MNIST canvases: the small FCN (TASK=
# segmentation, scored by mean IoU) or the small FCOS (TASK=detection, COCO mAP), its backbone the quantized
# part (model.quantize_part), the whole network scored. BRECQ, QDrop, MRECG (the config's ModCap grouping,
# k=2) + QDrop and MQBench's own ptq_reconstruction (QDrop) on the same part, W4A4 / W3A3 / W2A4, 3 seeds. Two
# lanes of sweeps, one thread each; finished runs are skipped. Then:
#   mrecg collect outputs/segmentation --out outputs/segmentation/table --no-curves
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
TASK=${TASK:-segmentation}
OUT=${OUT:-outputs/$TASK}
SEEDS=${SEEDS:-1 2 3}
BITS=${BITS:-4_4 3_3 2_4}
CFG=$([ "$TASK" = detection ] && echo configs/detection/fcos_small_2_4.yaml || echo configs/segmentation/fcn_small_2_4.yaml)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
sweep() { $PY -m mrecg sweep --configs "$CFG" --bits $BITS --seeds $SEEDS --out "$OUT" --methods "$@"; }
sweep brecq qdrop > "$OUT.lane1.log" 2>&1 &
{ sweep mrecg+qdrop && sweep mqbench-qdrop; } > "$OUT.lane2.log" 2>&1 &
wait

#!/usr/bin/env bash
# The GPU suite: one command for the first session that is lent a GPU (aim: under 9 minutes on one H200).
#
#   bash scripts/gpu_suite.sh                         # on the GPU machine, from the repository root
#   bash scripts/gpu_suite.sh --device cpu --input-size 32 --quick     # the dry run on a CPU (a few minutes)
#
# Steps (each with its own time limit and log under $OUT; a failed step is reported and the next one runs):
#   1. the CUDA tests (tests marked for a GPU; they skip on a CPU);
#   2. the synthetic bench, four paper models at batch 32 and 256, ours (kernels auto) against MQBench;
#   3. ours alone with the eager `cuda` kernel set (the device-mask path without a compiler);
#   4. the 4096-image cache peaks of ours (batch 256);
#   5. the small benches (digits, Fashion ResNet-18) where their data is on the machine;
#   6. a profile of one ResNet-18 run at batch 256 (kernels.txt, trace.json);
#   7. scripts/record_gpu.py: the rows into results/ (then `python scripts/gen_docs.py` regenerates the docs).
# $OUT defaults to bench_out/gpu_suite. The device machine has torch, timm and onnx but not mqbench or easydict:
#   here:   mkdir -p .device_libs && cp -r .venv/lib/python3.11/site-packages/{mqbench,easydict} .device_libs/
#   device: run(carry=[".device_libs"], command="PYTHONPATH=.device_libs bash scripts/gpu_suite.sh --out $OUT/suite")
#   then here: copy $OUT/suite back to bench_out/gpu_suite, python scripts/record_gpu.py bench_out/gpu_suite,
#   python scripts/gen_docs.py, and commit the rows.
set -u
SIZE=224
DEVICE=cuda
QUICK=0
OUT=${OUT:-bench_out/gpu_suite}
while [ $# -gt 0 ]; do
  case "$1" in
    --input-size) SIZE=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "usage: scripts/gpu_suite.sh [--device cuda|cpu] [--input-size N] [--out DIR] [--quick]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
mkdir -p "$OUT"
MODELS="resnet18 mobilenet_v2 resnet50 regnetx_600m"
BATCHES="32 256"
ITERS=10
IMAGES=4096
if [ "$QUICK" = 1 ]; then MODELS="resnet18 mobilenet_v2"; BATCHES="8 16"; ITERS=2; IMAGES=64; fi
STATUS=()

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  STATUS+=("$name rc=$rc $((SECONDS - t0))s")
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
}

$PY - <<'EOF' > "$OUT/environment.txt" 2>&1
import platform, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version())
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')
try:
    import triton; print('triton', triton.__version__)
except ImportError:
    print('triton: not installed (kernels auto -> cuda)')
EOF
cat "$OUT/environment.txt"

step cuda_tests 180 $PY -m pytest -q -rs tests/test_kernels.py tests/test_reconstruction.py tests/test_export.py -k "cuda or gpu"
# kernels auto: compiled on CUDA with Triton; on a CPU dry run the compiled set is asked for, so it is what runs
MAIN_SET=$([ "$DEVICE" = cuda ] && echo "process.deterministic=false" || echo "quantize.reconstruction.kernels=compiled")
step synthetic 270 $PY -m mrecg bench --synthetic $MODELS --batch $BATCHES --iters $ITERS --device "$DEVICE" \
  --input-size "$SIZE" --set "$MAIN_SET" --json "$OUT/synthetic.json"
step synthetic_cuda 90 $PY -m mrecg bench --synthetic $MODELS --batch $BATCHES --iters $ITERS --device "$DEVICE" \
  --input-size "$SIZE" --engines ours --set quantize.reconstruction.kernels=cuda --json "$OUT/synthetic_cuda.json"
step peaks 90 $PY -m mrecg bench --synthetic $MODELS --batch 256 --images $IMAGES --iters 1 --device "$DEVICE" \
  --input-size "$SIZE" --engines ours --set "$MAIN_SET" --json "$OUT/peaks.json"
if $PY -c "import sklearn" 2>/dev/null; then
  step bench_digits 60 $PY -m mrecg bench --config configs/digits/mbv2_2_4.yaml --iters $((ITERS * 20)) --device "$DEVICE"
else
  STATUS+=("bench_digits skipped: scikit-learn (the digits) not installed")
fi
if [ -e /usr/share/datasets/fashion-mnist ]; then
  step bench_fashion 90 $PY -m mrecg bench --config configs/bench/fashion_resnet18_2_4.yaml --iters $((ITERS * 10)) \
    --device "$DEVICE"
else
  STATUS+=("bench_fashion skipped: /usr/share/datasets/fashion-mnist absent")
fi
step profile 60 $PY scripts/gpu_profile.py --model resnet18 --batch "${BATCHES##* }" --input-size "$SIZE" \
  --iters 3 --device "$DEVICE" --set "$MAIN_SET" --out "$OUT/profile"
step record 30 $PY scripts/record_gpu.py "$OUT" $([ "$DEVICE" = cuda ] || echo --dry-run)
echo "== summary"
printf '%s\n' "${STATUS[@]}" | tee "$OUT/summary.txt"

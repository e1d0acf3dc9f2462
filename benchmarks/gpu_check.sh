#!/usr/bin/env bash
# Every GPU check of the GPU path in one device run of under 9 minutes:
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh
#
# 1. build the CUDA backend;
# 2. at once, in parallel (nothing timed): the whole test suite; the tiny checkpoint's FP16-vs-FP32 accuracy
#    on 1000 episodes; and one process per bench row and batch size that compiles and captures it, which
#    fills inductor's on-disk caches so that the timed runs below do not spend minutes compiling;
# 3. one after the other, the GPU to itself: `crnet bench` of r50 at batch 1 and at batch 64 (all rows side
#    by side, the anchor among them), the native op against the compiled loop, and a kernel profile.
# Every step has a deadline inside the overall budget, so a slow step costs the later ones, not the run.
# Files into $OUT (8 come back): run.log, pytest.log, bench_b1.json, bench_b64.json, bench_tiny.json,
# ops.log, profile.txt, profile.json.
set -u
OUT=${OUT:?set OUT to the folder the logs go to}
BUDGET=${BUDGET:-520}  # seconds, for everything
START=$(date +%s)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
step() { echo; echo "== $* (t=$(($(date +%s) - START)) s)"; }
# within CAP COMMAND...: run COMMAND for at most CAP seconds and never past the budget (SIGINT first, so
# that pytest still prints its summary).
within() {
  local cap=$1 left=$((START + BUDGET - $(date +%s)))
  shift
  ((left < cap)) && cap=$left
  if ((cap < 15)); then echo "skipped (budget spent): $*"; return 124; fi
  timeout -s INT -k 10 "$cap" "$@"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
  --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"

step build
pip install --no-build-isolation --no-deps -e . >/tmp/build.log 2>&1 || tail -30 /tmp/build.log
python3 -c "import crnet.ops as o; print('native op:', o.AVAILABLE, o.MISSING)"

R50=/tmp/r50_untrained.pt DATA=/tmp/crnet-latency
ROWS=(torch:fp16+channels-last torch:fp16+channels-last+cuda-graphs
  torch:fp16+channels-last+cuda-graphs+torch-loop torch:fp16+anchor)
COMPILED=("${ROWS[@]:1}")

step "in parallel: tests, tiny FP16 accuracy, compiling every bench row"
(within 260 python3 -m pytest -q -p no:cacheprovider -n 6 --timeout 180 -rfE >"$OUT/pytest.log" 2>&1
  echo "pytest exit $? (t=$(($(date +%s) - START)) s)") &
(python3 -m crnet synth /tmp/crnet-synthetic >/dev/null &&
  within 250 python3 -m crnet bench checkpoints/tiny_fold0.pt --data /tmp/crnet-synthetic \
    --runtime torch:fp16+channels-last+cuda-graphs --runtime torch:fp16+channels-last --repeats 5 --warmup 2 \
    --json "$OUT/bench_tiny.json" --chart /tmp/chart_tiny.png --no-progress >/tmp/tiny.log 2>&1
  echo "tiny accuracy exit $? (t=$(($(date +%s) - START)) s)") &
python3 -m crnet synth "$DATA" --train-per-class 2 --val-per-class 10 >/dev/null &
python3 benchmarks/untrained_checkpoint.py --preset r50 --out "$R50" >/dev/null
for batch in 1 64; do
  for spec in "${COMPILED[@]}"; do
    (within 250 python3 benchmarks/gpu_profile.py "$R50" --spec "$spec" --batch "$batch" --calls 0 \
      >"/tmp/warm_${batch}_${spec//[:+]/_}.log" 2>&1
      echo "compiled $spec batch $batch: exit $? (t=$(($(date +%s) - START)) s)") &
  done
done
wait
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -15
tail -12 /tmp/tiny.log

for batch in 1 64; do
  step "r50 321 px, 1-shot, T=5, batch $batch"
  args=()
  for spec in "${ROWS[@]}"; do args+=(--runtime "$spec"); done
  within 110 python3 -m crnet bench "$R50" --data "$DATA" "${args[@]}" --episodes 0 --batch-size "$batch" \
    --warmup 5 --repeats 50 --json "$OUT/bench_b$batch.json" --chart "/tmp/chart_b$batch.png" --no-progress
done

step "native op against the compiled PyTorch loop"
within 70 python3 -m crnet.commands.bench_ops --repeats 5 --warmup 1 >"$OUT/ops.log" 2>&1
tail -25 "$OUT/ops.log"

step "where the GPU time goes, batch 1"
within 90 python3 benchmarks/gpu_profile.py "$R50" --batch 1 --json "$OUT/profile.json" \
  --spec torch:fp16+anchor --spec torch:fp16+channels-last+cuda-graphs \
  --spec torch:fp16+channels-last+cuda-graphs+torch-loop >"$OUT/profile.txt" 2>&1
grep -v "^      " "$OUT/profile.txt" | head -60
step done

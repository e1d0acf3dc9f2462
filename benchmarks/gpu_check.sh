#!/usr/bin/env bash
# The GPU checks of the GPU path, as device runs of under 10 minutes each (not yet timed on a GPU: the
# torch.compile'd rows compile each shape on first use, so the bench phase is the long one):
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh tests   # build the CUDA backend, the whole test suite
#     OUT=/some/folder bash benchmarks/gpu_check.sh bench   # build, then the bench tables, ops, a profile
#
# Files into $OUT (8 come back): build.log, pytest.log, run.log (what was printed); bench_b1.json,
# bench_b64.json, bench_tiny.json, ops.log, profile.txt. A failing step is logged and the next one runs.
set -u
OUT=${OUT:?set OUT to the folder the logs go to}
PHASE=${1:?say tests or bench}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
step() { echo; echo "== $* ($(date +%T))"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

step build
pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
python3 -c "import crnet.ops as o; print('native op:', o.AVAILABLE, o.MISSING)"

if [ "$PHASE" = tests ]; then
  step tests
  timeout 360 python3 -m pytest -q -p no:cacheprovider >"$OUT/pytest.log" 2>&1
  echo "pytest exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -15

  step "tiny checkpoint, fp16 against fp32 on 1000 episodes"
  python3 -m crnet synth /tmp/crnet-synthetic >/dev/null
  timeout 120 python3 -m crnet bench checkpoints/tiny_fold0.pt --data /tmp/crnet-synthetic \
    --runtime torch:fp16+channels-last --repeats 10 \
    --json "$OUT/bench_tiny.json" --chart /tmp/chart_tiny.png --no-progress
  exit 0
fi

step "latency data (content does not matter) and an untrained r50"
DATA=/tmp/crnet-latency
python3 -m crnet synth "$DATA" --train-per-class 2 --val-per-class 10 >/dev/null
python3 benchmarks/untrained_checkpoint.py --preset r50 --out /tmp/r50_untrained.pt

RUNTIMES=(
  --runtime torch:fp16+channels-last
  --runtime torch:fp16+channels-last+cuda-graphs
  --runtime torch:fp16+anchor
)
for batch in 1 64; do
  step "r50 321 px, 1-shot, T=5, batch $batch"
  timeout 200 python3 -m crnet bench /tmp/r50_untrained.pt --data "$DATA" "${RUNTIMES[@]}" \
    --episodes 0 --batch-size "$batch" --warmup 3 --repeats 50 \
    --json "$OUT/bench_b$batch.json" --chart /tmp/chart_b$batch.png --no-progress
done

step "native op against the PyTorch loop"
timeout 60 python3 -m crnet.commands.bench_ops --repeats 5 --warmup 1 >"$OUT/ops.log" 2>&1; tail -20 "$OUT/ops.log"
step "profile: one fp16 episode, eager, fused op"
timeout 45 python3 - >"$OUT/profile.txt" 2>&1 <<'EOF'
import torch
from torch.profiler import ProfilerActivity, profile

from crnet.engines import RuntimeSpec, open_runtime

runtime = open_runtime(RuntimeSpec.parse("torch:fp16+channels-last"), checkpoint="/tmp/r50_untrained.pt",
                       device="cuda")
query = torch.randn(1, 3, 321, 321, device="cuda")
supports = torch.randn(1, 1, 3, 321, 321, device="cuda")
masks = (torch.rand(1, 1, 321, 321, device="cuda") > 0.5).long()
for _ in range(5):
    runtime.episode(query, supports, masks)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    runtime.episode(query, supports, masks)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
EOF
head -50 "$OUT/profile.txt"
step done

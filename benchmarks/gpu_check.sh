#!/usr/bin/env bash
# Everything the GPU path needs checked, as one run on a lent CUDA machine (about 8 minutes on an H100):
# build the CUDA backend, the whole test suite, then the bench tables of docs/BENCHMARKS.md.
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh
#
# Writes at most 8 files into $OUT: build.log, pytest.log, bench_b1.json, bench_b64.json, bench_tiny.json,
# ops.log, profile.txt, run.log (the tables as printed). A failing step is logged and the next one runs.
set -u
OUT=${OUT:?set OUT to the folder the logs go to}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
step() { echo; echo "== $* ($(date +%T))"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

step build
pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
python3 -c "import crnet.ops as o; print('native op:', o.AVAILABLE, o.MISSING)"

step tests
timeout 300 python3 -m pytest -q -p no:cacheprovider -x >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"; tail -5 "$OUT/pytest.log"

step data and checkpoints
DATA=/tmp/crnet-synthetic
python3 -m crnet synth "$DATA" >/dev/null
python3 benchmarks/untrained_checkpoint.py --preset r50 --out /tmp/r50_untrained.pt

RUNTIMES=(
  --runtime torch:fp16+channels-last
  --runtime torch:fp16+channels-last+cuda-graphs
  --runtime torch:fp16+anchor
)
for batch in 1 64; do
  step "r50 321 px, 1-shot, T=5, batch $batch"
  timeout 240 python3 -m crnet bench /tmp/r50_untrained.pt --data "$DATA" "${RUNTIMES[@]}" \
    --episodes 0 --batch-size "$batch" --warmup 10 --repeats 50 \
    --json "$OUT/bench_b$batch.json" --chart /tmp/chart_b$batch.png --no-progress
done

step "tiny checkpoint, fp16 against fp32 on 1000 episodes"
timeout 180 python3 -m crnet bench checkpoints/tiny_fold0.pt --data "$DATA" \
  --runtime torch:fp16+channels-last --runtime torch:fp16+channels-last+cuda-graphs \
  --json "$OUT/bench_tiny.json" --chart /tmp/chart_tiny.png --no-progress

step "native op against the PyTorch loop"
timeout 120 python3 -m crnet.commands.bench_ops >"$OUT/ops.log" 2>&1; tail -20 "$OUT/ops.log"

step "profile: one fp16 episode, eager, fused op"
timeout 120 python3 - >"$OUT/profile.txt" 2>&1 <<'EOF'
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

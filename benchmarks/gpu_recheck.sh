#!/usr/bin/env bash
# A short device run after a change: build, the named tests, and `crnet bench` of the named rows at the named
# batch sizes (the anchor among them), all within BUDGET seconds; for a session's last minutes of device
# time, when the full benchmarks/gpu_check.sh no longer fits.
#
#     OUT=$OUT BUDGET=220 ROWS="torch:fp16+anchor ..." BATCHES="64 1" TESTS="tests/..." \
#         bash benchmarks/gpu_recheck.sh
#
# Compiled rows are compiled first, one process per row and batch size, in parallel with the tests, so the
# benches find inductor's caches warm. Files: run.log, pytest.log, bench_b<N>.json, stem.txt.
set -u
OUT=${OUT:?set OUT to the folder the logs go to}
BUDGET=${BUDGET:-220}
ROWS=(${ROWS:?name the bench rows})
BATCHES=(${BATCHES:-64 1})
TESTS=(${TESTS:-})
PRESET=${PRESET:-r50} DEVICE=(${DEVICE:-})  # a CPU rehearsal: PRESET=tiny DEVICE="--device cpu"
START=$(date +%s)
mkdir -p "$OUT"
LOG="$OUT/run.log"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }
within() {  # within CAP COMMAND...: at most CAP seconds, never past the budget
  local cap=$1 left=$((START + BUDGET - $(date +%s)))
  shift
  ((left < cap)) && cap=$left
  if ((cap < 10)); then say "skipped (budget spent): $*"; return 124; fi
  timeout -s INT -k 5 "$cap" "$@"
}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-4}
WORK=$(mktemp -d)
MODEL=$WORK/${PRESET}_untrained.pt LATENCY=$WORK/latency
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -m pip install --no-build-isolation --no-deps -e . >"$WORK/build.log" 2>&1 || tail -20 "$WORK/build.log"
python3 -c "import crnet.ops as o; print('native op:', o.AVAILABLE, o.MISSING)" 2>&1 | tee -a "$LOG" || exit 1
say "built (t=$(($(date +%s) - START)) s)"
pids=()
if ((${#TESTS[@]})); then
  (within 150 python3 -m pytest -v -p no:cacheprovider -n 6 --timeout 140 -rfE "${TESTS[@]}" >"$OUT/pytest.log" 2>&1
    say "pytest exit $? (t=$(($(date +%s) - START)) s)") &
  pids+=($!)
fi
python3 -m crnet synth "$LATENCY" --train-per-class 2 --val-per-class 10 >/dev/null &
pids+=($!)
python3 benchmarks/untrained_checkpoint.py --preset "$PRESET" --out "$MODEL" >/dev/null
for batch in "${BATCHES[@]}"; do
  for spec in "${ROWS[@]}"; do
    [[ $spec == *compile* || $spec == *anchor* ]] || continue
    (within 120 python3 benchmarks/gpu_profile.py "$MODEL" --spec "$spec" --batch "$batch" --calls 0 "${DEVICE[@]}" \
      >"$WORK/warm_${batch}_${spec//[:+]/_}.log" 2>&1
      say "compiled $spec, batch $batch: exit $? (t=$(($(date +%s) - START)) s)") &
    pids+=($!)
  done
done
wait "${pids[@]}"
if ((${#TESTS[@]})); then
  grep -E " (FAILED|ERROR) |[0-9]+ (passed|failed)" "$OUT/pytest.log" | sort -u | tail -20 | tee -a "$LOG"
fi
for batch in "${BATCHES[@]}"; do
  say "== $PRESET, 1-shot, T=5, batch $batch (t=$(($(date +%s) - START)) s)"
  args=()
  for spec in "${ROWS[@]}"; do args+=(--runtime "$spec"); done
  within $((batch > 8 ? 60 : 45)) python3 -m crnet bench "$MODEL" --data "$LATENCY" "${args[@]}" "${DEVICE[@]}" --episodes 0 \
    --batch-size "$batch" --warmup 5 --repeats $((batch > 8 ? 20 : 50)) --json "$OUT/bench_b$batch.json" \
    --chart "$WORK/chart_b$batch.png" --no-progress >"$WORK/bench_b$batch.log" 2>&1
  say "bench exit $?"
  grep -v -i "warn\|softmax\|reduction\|use case" "$WORK/bench_b$batch.log" | tail -12 | tee -a "$LOG"
done
say "== the stem alone (t=$(($(date +%s) - START)) s)"
within 40 python3 benchmarks/stem.py --batch 2 --batch 128 "${DEVICE[@]}" >"$OUT/stem.txt" 2>&1
grep "^|\|^stem" "$OUT/stem.txt" | tee -a "$LOG"
say "== done (t=$(($(date +%s) - START)) s)"

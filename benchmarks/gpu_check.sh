#!/usr/bin/env bash
# Every GPU check of the GPU path in ONE device run of under 10 minutes: a drawn task has 15 minutes of
# device time in all, the machine's start (a minute or two) included, so there is no second call to count on.
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh                 # on the GPU machine (timeout_s 600)
#     OUT=/tmp/rehearsal REHEARSE=1 BUDGET=700 bash benchmarks/gpu_check.sh   # the same steps on a CPU
#     OUT=... BUDGET=230 CHECK_ROWS="torch:fp16+anchor ..." CHECK_BATCHES=64 CHECK_TESTS="tests/ops" \
#         bash benchmarks/gpu_check.sh     # a short check after a change: what the budget leaves is skipped
#     OMP_NUM_THREADS=1 timeout -s INT 200 python3 benchmarks/unreached_tests.py -- -n 14 >$OUT/rest.log
#                                      # then, on the still-warm machine: the tests its suite did not reach or failed;
#     timeout -s INT 150 python3 benchmarks/head_convs.py --batch 1 --batch 64 >$OUT/convs.log 2>&1
#                                      # or, if the suite finished: the head's convolutions in every form
#
# Steps, most important first; each has a deadline inside the overall budget, so a slow step costs the
# later ones, not the run, and what is left when the budget is spent is skipped and says so:
# 1. build the CUDA backend with the python that runs the checks (stop at once if crnet does not import);
# 2. the test suite (-n 14, a thread each), with nothing compiling beside it; meanwhile the data, the untrained r50 and
#    the tiny checkpoint's FP16-vs-FP32 agreement on 400 episodes;
# 3. in parallel, nothing timed: one process per compiled bench row and batch size that compiles and
#    captures it (the profiler script with no calls), and one for the ops bench's compiled loop: they fill
#    inductor's on-disk caches, so that the timed runs below do not spend minutes compiling;
# 4. then the GPU to itself, one after the other: `crnet bench` of r50 at batch 1 and at batch 64 (all rows
#    side by side, the anchor among them; a row whose warm-up ran out of time stays out, as it would compile
#    inside the bench, past its cap); a batch-64 kernel profile of the deployed row and the candidates; if
#    time is left, the neck alone in each form from 2 to 128 images (benchmarks/neck_shapes.py); which
#    module and op launched each kernel, run eagerly, of the deployed row at batch 1 and
#    of the candidate at batch 64 (benchmarks/kernel_owners.py), a batch-1 profile of the deployed and
#    Triton rows, and the native op against the compiled loop under graph replay (bench_ops).
# The rows (since 2026-11-27, sixteenth session): the deployed row, the anchor, and two candidates on the
# deployed row: `+chunked-neck`, the neck on chunks of at most 16 images (in the eighth run's neck table,
# eager and captured, 1.27x the one call at 128 images, 1.24x at 64; at batch 1 the neck sees 2 images and
# runs as it is), and `+triton-head` (below). `+split-neck` made way after the eighth run (0.7% faster than
# the deployed row at batch 64, 2.2% slower at batch 1; chunks of 16 beat it in the neck table at 32 to 128
# images). It was, from the fifteenth session:
# `+split-neck`, the encoder's neck as bare convolutions over pieces of at most 512 channels
# (the sixth run's kernels' owners: the layer3 half's 1024-channel convolution, with cuDNN's add-ReLU
# epilogue, took 2.45 ms of the batch-64 episode on an sm80 kernel, the layer2 half's 512-channel one 0.63
# ms on an sm90 one), each layer3 piece a copy of its channel slice: in the seventh run 0.9% faster at
# batch 64, 1.9% slower at batch 1; and `+triton-head` (faster than the deployed row at batch 1 in the
# sixth and seventh runs, slower in the fifth, slower at batch 64 in every run: the best batch-1 row to
# know, never one to deploy). `+grouped-neck` (the split's pieces as one grouped convolution, which cuDNN
# ran by slicing the groups itself: 1.6% slower at batch 64, 1.4% at batch 1) made way after the seventh
# run. `+bare-neck` made way after the sixth run (level with the deployed row at
# batch 64, 25.65 against 25.61 ms, 0.03 ms slower at batch 1), and so did `+cudnn-benchmark` (0.6% faster
# at batch 64, 1.8% slower at batch 1; its captures time cuDNN's algorithms for every convolution, the
# longest warm-up). The Triton shapes' table (benchmarks/triton_shapes.py) made way for the kernels' owners
# after the fifth run.
# `+banded-aspp` (twice as slow at batch 1), `+concurrent-aspp` (9% slower at batch 64) and `+triton-encoder`
# (0.10 ms more encoder time at batch 1) made way after the third GPU run. The two max-autotune rows (with
# and without cuDNN's epilogues) made way after the fourth: neither compiled within 180 s at either batch
# size beside the other rows' compiles, which spent 90 s of the run on nothing; CHECK_ROWS can bring them
# back for a run of their own. The suite gets 120 s (SUITE_CAP), beside the tiny accuracy (done at t=199 s in
# the sixth run), with its GPU-only tests first; benchmarks/unreached_tests.py runs the rest on the
# still-warm machine, the slow ones first (the +max-autotune row of test_gpu_runtimes_match_the_model has
# no outcome in any GPU log yet: the seventh and eighth runs' reruns stopped at their deadlines with it
# still compiling).
# Files (8 come back): run.log, pytest.log, bench_b1.json, bench_b64.json, bench_tiny.json, ops.log,
# profile.txt (the kernels' owners too), profile.json.
# The rehearsal runs every step on a CPU (tiny preset, CPU rows, two test files): it catches a broken script
# before it costs device time. Seen on the H200: with pytest's workers compiling too, six compiling
# processes took over 120 s each; with the suite's mostly CPU tests beside them, at most 104 s. Hence the
# suite first, alone.
set -u
OUT=${OUT:?set OUT to the folder the logs go to}
BUDGET=${BUDGET:-570}  # seconds, for everything; the device call's timeout_s is 600
REHEARSE=${REHEARSE:-0}
SUITE_CAP=${SUITE_CAP:-120}  # seconds for the test suite
WARM_CAP=${WARM_CAP:-180}    # seconds for each row's compile-and-capture (max-autotune, if asked for, times templates)
START=$(date +%s)
mkdir -p "$OUT"
LOG="$OUT/run.log"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }
step() { say ""; say "== $* (t=$(($(date +%s) - START)) s)"; }
# within CAP COMMAND...: run COMMAND for at most CAP seconds and never past the budget (SIGINT first, so
# that pytest still prints its summary).
within() {
  local cap=$1 left=$((START + BUDGET - $(date +%s)))
  shift
  ((left < cap)) && cap=$left
  if ((cap < 15)); then say "skipped (budget spent): $*"; return 124; fi
  timeout -s INT -k 10 "$cap" "$@"
}
# Many compiling processes at once: fewer compile workers each, so they do not thrash 16 cores.
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-4}
WORK=$(mktemp -d)
# ROWS: the deployed row, the anchor, then the candidates. All compile (warmed up in parallel), none runs the
# native op (bench_ops measures it against the compiled loop); the rehearsal's CPU refuses cuDNN's epilogues.
if ((REHEARSE)); then
  PRESET=tiny P=fp32 DEVICE=(--device cpu) TESTS=(tests/commands/test_bench.py tests/test_layers.py)
  ROWS=(torch:fp32+compile+torch-loop torch:fp32+anchor torch:fp32+chunked-neck+compile+torch-loop)
  SYNTH=(--train-per-class 2 --val-per-class 12) BATCHES=(1 4) PYTEST=() TINY=(torch:fp32+compile 50)
else
  # The tests that only a GPU exercises first (Triton's kernels, the options, the graphs), so that a suite cut
  # off at its deadline has run those; pytest keeps a folder's files together, in this order otherwise.
  TESTS=(tests/engines/test_triton_head.py tests/engines/test_triton_encoder.py tests/engines tests/model
    tests/test_device.py tests/ops tests/commands tests/data tests/export tests/test_files.py tests/test_layers.py
    tests/test_metrics.py)
  PRESET=r50 P=fp16 DEVICE=() SYNTH=() BATCHES=(1 64) PYTEST=(-n 14 --timeout 200 --durations 30)
  DEPLOYED=torch:fp16+channels-last+cudnn-epilogues+space-to-depth+compile+cuda-graphs+torch-loop
  # The deployed row on 400 episodes: a check that its FP16 masks still agree (the 1000-episode figures of
  # 2026-11-26 stand); 1000 made this the step that the compiles waited for (t=266 s against the suite's 200).
  TINY=("$DEPLOYED" 400)
  ROWS=("$DEPLOYED" torch:fp16+anchor "$DEPLOYED+chunked-neck" "$DEPLOYED+triton-head")
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv,noheader | tee -a "$LOG"
fi
# A shorter run after a change, for a session's last minutes (with BUDGET): other rows, batch sizes or tests.
[[ -n ${CHECK_ROWS:-} ]] && read -ra ROWS <<<"$CHECK_ROWS"
[[ -n ${CHECK_BATCHES:-} ]] && read -ra BATCHES <<<"$CHECK_BATCHES"
[[ -n ${CHECK_TESTS:-} ]] && read -ra TESTS <<<"$CHECK_TESTS"
COMPILED=("${ROWS[@]}")
python3 -c "import sys, torch; print(sys.executable, 'torch', torch.__version__)" | tee -a "$LOG"
python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1 | tee -a "$LOG"

step build
# `pip` may belong to another python than `python3` (so it was on the H100 image): always python3 -m pip.
python3 -m pip install --no-build-isolation --no-deps -e . >"$WORK/build.log" 2>&1 || tail -30 "$WORK/build.log"
if ! python3 -c "import crnet.ops as o; print('native op:', o.AVAILABLE, o.MISSING)" 2>&1 | tee -a "$LOG"; then
  say "crnet does not import: stopping here"; exit 1
fi
MODEL=$WORK/${PRESET}_untrained.pt LATENCY=$WORK/latency SYNTHETIC=$WORK/synthetic

step "the test suite, the GPU and most cores to itself; meanwhile the data and the tiny FP16 accuracy"
pids=()
# -v: a line per test as it ends, so that a suite cut off at its deadline still says what passed. Alone:
# beside six compiling processes the suite got through 388 tests in 180 s on the H200 (2026-11-26), alone
# 425 in 160 s; on 2 CPU cores the whole of it takes 290 s. --durations names the slow ones. One thread per
# worker: 12 workers with torch's default of a thread per core had 16 cores oversubscribed 12 times.
(OMP_NUM_THREADS=1 within "$SUITE_CAP" python3 -m pytest -v -p no:cacheprovider "${PYTEST[@]}" -rfE "${TESTS[@]}" \
  >"$OUT/pytest.log" 2>&1
  say "pytest exit $? (t=$(($(date +%s) - START)) s)") &
pids+=($!)
(python3 -m crnet synth "$SYNTHETIC" "${SYNTH[@]}" >/dev/null &&
  within 160 python3 -m crnet bench checkpoints/tiny_fold0.pt --data "$SYNTHETIC" "${DEVICE[@]}" \
    --runtime "${TINY[0]}" --runtime "torch:$P+channels-last" --episodes "${TINY[1]}" --repeats 5 --warmup 2 \
    --json "$OUT/bench_tiny.json" --chart "$WORK/chart_tiny.png" --no-progress \
    >"$WORK/tiny.log" 2>&1
  say "tiny accuracy exit $? (t=$(($(date +%s) - START)) s)") &
pids+=($!)
python3 -m crnet synth "$LATENCY" --train-per-class 2 --val-per-class 10 >/dev/null &
pids+=($!)
python3 benchmarks/untrained_checkpoint.py --preset "$PRESET" --out "$MODEL" >/dev/null
wait "${pids[@]}"  # these jobs only: a bare `wait` would also wait on tee
cp "$OUT/pytest.log" /tmp/crnet_gpu_check_pytest.log  # for benchmarks/unreached_tests.py on the warm machine
# A suite killed at its deadline may leave a compile's output cut short in inductor's cache (the eighth run's):
# the rows below would load it.
python3 benchmarks/cut_short_objects.py | tee -a "$LOG"
say "tests: $(grep -c " PASSED" "$OUT/pytest.log") passed, $(grep -c " SKIPPED" "$OUT/pytest.log") skipped"
grep -E " (FAILED|ERROR) |node down|crashed|[0-9]+ passed" "$OUT/pytest.log" | sort -u | tail -20 | tee -a "$LOG"
grep -A12 "slowest .*durations" "$OUT/pytest.log" | tee -a "$LOG"
tail -12 "$WORK/tiny.log" | tee -a "$LOG"

step "in parallel: compiling every bench row and the ops bench's loop"
pids=()
(within 150 python3 -m crnet.commands.bench_ops --repeats 1 --warmup 0 >"$WORK/ops_warm.log" 2>&1
  say "compiled the ops bench's loops: exit $? (t=$(($(date +%s) - START)) s)") &
pids+=($!)
for batch in "${BATCHES[@]}"; do
  for spec in "${COMPILED[@]}"; do
    (within "$WARM_CAP" python3 benchmarks/gpu_profile.py "$MODEL" --spec "$spec" --batch "$batch" --calls 0 \
      "${DEVICE[@]}" >"$WORK/warm_${batch}_${spec//[:+]/_}.log" 2>&1
      code=$?
      echo $code >"$WORK/warm_${batch}_${spec//[:+]/_}.exit"
      say "compiled $spec, batch $batch: exit $code (t=$(($(date +%s) - START)) s)") &
    pids+=($!)
  done
done
wait "${pids[@]}"
python3 benchmarks/cut_short_objects.py | tee -a "$LOG"  # a warm-up stopped at its cap, mid-compile

# No bench row runs the native op; a failing op only skips its own bench.
NO_OP=0
if grep -qE "FAILED.*test_refine_loop.py.*(cuda|channels_last)" "$OUT/pytest.log"; then
  say "the native op failed on the GPU: no bench_ops"
  NO_OP=1
fi
bench() {  # bench NAME CAP BATCH ROW...: one `crnet bench` of these rows, side by side, into $OUT/NAME.json
  local name=$1 cap=$2 batch=$3 args=()
  shift 3
  for spec in "$@"; do args+=(--runtime "$spec"); done
  # 50 timed calls at batch 1, 20 at batch 64 (each a few tens of ms)
  within "$cap" python3 -m crnet bench "$MODEL" --data "$LATENCY" "${args[@]}" \
    "${DEVICE[@]}" --episodes 0 --batch-size "$batch" --warmup 5 --repeats $((batch > 8 ? 20 : 50)) \
    --json "$OUT/$name.json" --chart "$WORK/chart_$name.png" --no-progress >"$WORK/$name.log" 2>&1
  local code=$?
  grep -v Warning "$WORK/$name.log" | tail -14 | tee -a "$LOG"
  # Which shapes the Triton rows ran as our kernels, and which as the library's way (the JSON has each).
  python3 -c 'import json, sys
choices = json.load(open(sys.argv[1])).get("triton_choices", [])
ours = [c for c in choices if c["choice"] != "library"]
print(f"Triton shapes: {len(ours)} of {len(choices)} ran our kernel:", *(c["choice"] for c in ours))' \
    "$OUT/$name.json" 2>&1 | tail -1 | tee -a "$LOG"
  return $code
}
# A row whose compile-and-capture process failed stays out of the bench: a kernel that faults there would
# leave the CUDA context of the bench's process, and every row in it, broken. So does one that ran out of
# time: it would compile again inside the bench, past its cap (the third GPU run lost both batch-64 tables
# so; a bench stopped in its timed rounds now keeps the rounds done, one stopped before them has nothing).
# The deployed row and the anchor always run.
rows_that_warmed() {  # rows_that_warmed BATCH: the rows to bench at that batch size
  local batch=$1 code
  for spec in "${ROWS[@]}"; do
    code=$(cat "$WORK/warm_${batch}_${spec//[:+]/_}.exit" 2>/dev/null || echo 0)
    if ((code == 0)) || [[ $spec == "${ROWS[0]}" || $spec == *anchor ]]; then
      echo "$spec"
    else
      say "left out of the batch-$batch bench: $spec (its warm-up exited $code:" \
        "$(grep -v Warning "$WORK/warm_${batch}_${spec//[:+]/_}.log" | tail -1))" >&2
    fi
  done
}
for batch in "${BATCHES[@]}"; do
  step "$PRESET, 1-shot, T=5, batch $batch"
  mapfile -t BENCHED < <(rows_that_warmed "$batch")
  # Loading each compiled row and capturing its graphs takes 10 to 60 s: six rows at batch 64 took longer
  # than 110 s in the third GPU run; four took 86 s in the fifth. +cudnn-benchmark times cuDNN's algorithms
  # for every convolution at its capture: 200 s at batch 64 for the five rows.
  bench "bench_b$batch" $((batch > 8 ? 200 : 150)) "$batch" "${BENCHED[@]}"
done
LARGE=${BATCHES[-1]}
CANDIDATE=${ROWS[2]:-${ROWS[-1]}}

# The deployed row and every neck candidate (else the first candidate): about 17 s a row.
mapfile -t PROFILED < <(printf '%s\n' "${ROWS[@]:2}" | grep -- "-neck" || echo "$CANDIDATE")
step "where the GPU time goes at batch $LARGE: the deployed row and ${PROFILED[*]}"
within 80 python3 benchmarks/gpu_profile.py "$MODEL" --batch "$LARGE" --calls 3 --json "$OUT/profile.json" \
  "${DEVICE[@]}" "--spec=${ROWS[0]}" "${PROFILED[@]/#/--spec=}" >"$OUT/profile.txt" 2>&1
grep -E "^(==|episode|query|    )" "$OUT/profile.txt" | grep "batch $LARGE" -A12 | tee -a "$LOG"

# Where between 2 and 128 images the neck's layer3 half leaves cuDNN's sm90 kernels, and which form of the
# neck (fused, bare, split, the fused one on chunks of the batch) is the faster at each count: a deployed
# row that splits only where it pays needs the crossover (eager and captured; about 30 s).
step "the neck alone in each form, 2 to 128 images, with its convolution kernels"
within 60 python3 benchmarks/neck_shapes.py --preset "$PRESET" "${DEVICE[@]}" --no-compile --kernels \
  --repeats 20 --images 2 --images 8 --images 32 --images 64 --images 128 >"$WORK/necks.log" 2>&1
cat "$WORK/necks.log" >>"$OUT/profile.txt"
grep -E "^\|" "$WORK/necks.log" | tee -a "$LOG"

# What is left of the budget goes to the decisions that matter less.
# Batch 1 first: the sixth run named batch 64's owners and ran out of budget before batch 1's (its 204 kernels,
# their gaps under replay, the copies); the batch-64 profile above already sets the candidate beside the row.
step "which module and op launched each kernel (eager): the deployed row at batch 1, $CANDIDATE at batch $LARGE"
for owner in "${ROWS[0]} 1" "$CANDIDATE $LARGE"; do
  read -r spec batch <<<"$owner"
  within 45 python3 benchmarks/kernel_owners.py "$MODEL" --spec "$spec" --batch "$batch" --top 40 \
    "${DEVICE[@]}" >"$WORK/owners_$batch.log" 2>&1
  grep -A40 "^==" "$WORK/owners_$batch.log" >>"$OUT/profile.txt"
  grep -A15 "^==" "$WORK/owners_$batch.log" | tee -a "$LOG"
done
step "where the GPU time goes, batch 1: the deployed row and the Triton one (about 20 s a row)"
mapfile -t PROFILED < <(printf '%s\n' "${ROWS[@]}" | grep -- "+triton-head")
within 60 python3 benchmarks/gpu_profile.py "$MODEL" --batch 1 "${DEVICE[@]}" "--spec=${ROWS[0]}" \
  "${PROFILED[@]/#/--spec=}" >>"$OUT/profile.txt" 2>&1
grep -E "^(==|episode|query)" "$OUT/profile.txt" | grep "batch 1$" -A2 | tee -a "$LOG"
step "native op against the compiled PyTorch loop, GPU time under graph replay"
((NO_OP)) || within 70 python3 -m crnet.commands.bench_ops --repeats 5 --warmup 1 >"$OUT/ops.log" 2>&1
grep -E "^\||speed|replay" "$OUT/ops.log" | tee -a "$LOG"
step done

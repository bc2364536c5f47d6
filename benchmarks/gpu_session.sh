#!/usr/bin/env bash
# One GPU session for issue 23's figures, most important first; every part writes its JSON as it ends.
#
#   here, once:        benchmarks/gpu_trainer.sh wheels     (.whl/ 33 MB, .fa4libs/a 61 MiB, .fa4libs/b 28 MB)
#   device call 1:     carry [".fa4libs/a"],         bash benchmarks/gpu_session.sh stash           (seconds)
#   device call 2, at once (the machine stays warm 30 s after a call):
#                      carry [".whl", ".fa4libs/b"], SESSION_S=540 bash benchmarks/gpu_session.sh   (timeout_s 600)
#   on CPU (the logic, tiny, no install):  CPU=1 bash benchmarks/gpu_session.sh
#
# PART (default, in order): install shards attention reference train report determinism report drift report
#   install     the carried wheels (FA4 only if call 1 left its chunk: gpu_trainer.sh says which) and atoken
#   attention   FA4 and the other backends against SDPA (values, gradients: pytest -m gpu), then each timed;
#               the fastest is model.attention for the parts after it (gpu_trainer.py --attention measured)
#   reference   train_step.py, compiled, at 16384 tokens with the trainer's losses: reference_mfu, then one
#               profiled step: perceptual_fraction and the split (step_split.py)
#   train       atoken-train stage 1, so400m, 40 steps, a checkpoint every 20: trainer_mfu, checkpoint_stall_s
#   determinism two runs under deterministic=true side by side (4 steps of 4096 tokens): deterministic_identical
#   drift       the same pair in the default mode: the baseline for resume's differences
#   report      benchmarks/results/gpu_trainer_<device>.json from the parts done so far (rerun after each)
# also:  resume convert (gpu_trainer.py's), step budget check (gpu_trainer.sh kernels ...).
# Each part runs under its own limit and inside the call's deadline (SESSION_S, default 540 s); a part that
# fails or runs long leaves the rest, one without the time it needs is skipped and says so. After each part
# the logs, the parts' JSONs, the profile tables and benchmarks/results/ are packed into $OUT/session.tgz,
# with a line per part in $OUT/summary.txt (the device tool brings $OUT back, also from a call cut off).
set -uo pipefail
cd "$(dirname "$0")/.." || exit
OUT=${OUT:-/tmp/gpu_session}
WORK=${WORK:-/tmp/gpu_trainer}
END=$((SECONDS + ${SESSION_S:-540}))
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
GT=(bash benchmarks/gpu_trainer.sh)
RUN=(--work "$WORK" --steps 40 --checkpoint-every 20 --budgets 16384)
SCALE=1
if [ -n "${CPU:-}" ]; then  # every part at toy size, without installing: what tests/test_benchmarks.py runs
  GT=(bash benchmarks/gpu_trainer.sh cpu-phase)
  RUN=(--work "$WORK" --mode cpu --steps 4 --checkpoint-every 2 --budgets 128 --budget 128
       --out "$WORK/gpu_trainer_cpu.json")  # not into benchmarks/results
  SCALE=${CPU_LIMIT_SCALE:-10}  # the parts' limits are the GPU's; a shared CPU is slower at toy size
fi
reports=0

pack() {
  tar -czf "$OUT/session.tgz" "$OUT"/*.log "$OUT/summary.txt" "$WORK"/*.json "$WORK"/*.log "$WORK"/profile/*.txt \
    benchmarks/results 2>/dev/null
}

part() {  # NAME LIMIT_S CMD...: run CMD under LIMIT_S (less if the deadline is nearer), log to $OUT/NAME.log
  local name=$1 limit=$(($2 * SCALE)) left=$((END - SECONDS)) t0=$SECONDS rc
  shift 2
  if ((left < limit / 2)); then
    echo "$name: skipped, ${left} s left of the call, it needs up to ${limit} s" | tee -a "$OUT/summary.txt"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s)"
  # timeout signals its own process group: the part and what it started (trainers), nothing else
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log"
  pack
  return "$rc"
}

for p in "${@:-install shards attention reference train report determinism report drift report}"; do
  for name in $p; do
    case $name in
      stash)       "${GT[@]}" stash 2>&1 | tee -a "$OUT/summary.txt" ;;
      install)     [ -n "${CPU:-}" ] || { part install 120 "${GT[@]}" install && export ATOKEN_INSTALLED=1; } ;;
      shards)      part shards 60 "${GT[@]}" shards "${RUN[@]}" ;;
      attention)   part attention 150 "${GT[@]}" attention "${RUN[@]}" ;;
      reference)   part reference 180 "${GT[@]}" reference "${RUN[@]}" ;;
      train)       part train 200 "${GT[@]}" train "${RUN[@]}" ;;
      determinism) part determinism 150 "${GT[@]}" determinism "${RUN[@]}" ;;
      drift)       part drift 150 "${GT[@]}" drift "${RUN[@]}" ;;
      resume)      part resume 240 "${GT[@]}" resume "${RUN[@]}" ;;
      convert)     part convert 90 "${GT[@]}" convert "${RUN[@]}" ;;
      report)      part "report$((++reports))" 30 "${GT[@]}" report "${RUN[@]}" ;;
      check)       part check 150 "${GT[@]}" kernels check ;;
      step)        part step 240 "${GT[@]}" kernels step ;;
      budget)      part budget 200 "${GT[@]}" kernels budget ;;
      *) echo "unknown part: $name (see the header)"; exit 2 ;;
    esac
  done
done
cat "$OUT/summary.txt"

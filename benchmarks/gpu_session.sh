#!/usr/bin/env bash
# One device call for the GPU figures of issues 14 and 18, most important first.
#
#   device run, carry [".whl"]:  bash benchmarks/gpu_session.sh [PART ...]
#
# PART: install shards reference train convert report step check resume report budget (the default, in
# that order: what the first session, 2026-11-26, left unmeasured comes first after the trainer).
# Each part runs under its own limit and inside the call's deadline (SESSION_S, default 540 s), so a
# part that fails or runs long leaves the rest; one without the time it needs is skipped
# and says so. After each part the logs, the phases' JSONs and benchmarks/results/ are packed into
# $OUT/session.tgz, with a line per part in $OUT/summary.txt (the device tool brings $OUT back, also
# from a call cut off at its limit).
#
# The trainer run is shorter than gpu_trainer.py's default (60 steps, a checkpoint every 30) so that
# train, resume and convert fit one call beside the kernel checks. A so400m checkpoint with its ZeRO
# optimizer state and EMA is about 16 GB, so the straight run's go once converted (the disk is 64 GiB).
set -uo pipefail
cd "$(dirname "$0")/.." || exit
OUT=${OUT:-/tmp/gpu_session}
WORK=/tmp/gpu_trainer
END=$((SECONDS + ${SESSION_S:-540}))
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
GT=(bash benchmarks/gpu_trainer.sh)
RUN=(--work "$WORK" --steps 60 --checkpoint-every 30)

pack() {
  tar -czf "$OUT/session.tgz" "$OUT"/*.log "$WORK"/*.json "$WORK"/*.log benchmarks/results 2>/dev/null
}

part() {  # NAME LIMIT_S CMD...: run CMD under LIMIT_S (less if the deadline is nearer), log to $OUT/NAME.log
  local name=$1 limit=$2 left=$((END - SECONDS)) t0=$SECONDS rc
  shift 2
  if ((left < limit / 2)); then
    echo "$name: skipped, ${left} s left of the call, it needs up to ${limit} s" | tee -a "$OUT/summary.txt"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  pkill -9 -f 'atoken.training.train|train_step.py' 2>/dev/null  # what a timeout left behind
  echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log"
  pack
  return "$rc"
}

for p in "${@:-install shards reference train convert report step check resume report budget}"; do
  for name in $p; do
    case $name in
      install)   part install 180 "${GT[@]}" install && export ATOKEN_INSTALLED=1 ;;
      shards)    part shards 60 "${GT[@]}" shards "${RUN[@]}" ;;
      reference) part reference 150 "${GT[@]}" reference "${RUN[@]}" --budgets 16384 ;;
      train)     part train 240 "${GT[@]}" train "${RUN[@]}" ;;
      convert)   part convert 90 "${GT[@]}" convert "${RUN[@]}"; rm -rf "$WORK/run_straight/checkpoints" ;;
      report)    part report 30 "${GT[@]}" report "${RUN[@]}" ;;
      check)     part check 150 "${GT[@]}" kernels check ;;
      resume)    part resume 240 "${GT[@]}" resume "${RUN[@]}" ;;
      step)      part step 240 "${GT[@]}" kernels step ;;
      budget)    part budget 200 "${GT[@]}" kernels budget ;;
      *) echo "unknown part: $name (see the header)"; exit 2 ;;
    esac
  done
done
cat "$OUT/summary.txt"

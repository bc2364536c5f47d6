# shellcheck shell=bash
# Sourced by cluster/stage*.slurm, which call `atoken_launch STAGE "$@"`: environment, rendezvous, and the srun launch
# of one training process per GPU, with checkpoint-and-requeue on the scheduler's warning signal.
#
# Environment (all optional; nothing site-specific is hard-coded here):
#   ATOKEN_HOME        repository root                      (default: the sbatch submit directory)
#   ATOKEN_VENV        virtualenv to activate               (default: $ATOKEN_HOME/.venv, if present)
#   ATOKEN_RUN_DIR     run directory: checkpoints, logs     (default: $ATOKEN_HOME/runs/stage$STAGE)
#   ATOKEN_CONFIG      named config or YAML file            (default: stage$STAGE)
#   ATOKEN_INIT_FROM   run dir or checkpoint of the stage before (stages 2-4;
#                      default: $ATOKEN_HOME/runs/stage$((STAGE - 1)))
#   MASTER_PORT        rendezvous port on the first node    (default: 29500)
#   ATOKEN_MAX_HANG_REQUEUES  launches of one job a hung rank may requeue (default: 3)
#   NCCL_*, TORCH_NCCL_*  passed through; NCCL_SOCKET_IFNAME / NCCL_IB_HCA are the fabric's to set
# Arguments of the sbatch script are passed to atoken-train, e.g. `--set steps=1000 --set model=base`.

atoken_launch() {
  local STAGE="$1"
  shift
  local home="${ATOKEN_HOME:-${SLURM_SUBMIT_DIR:?run this script with sbatch, or set ATOKEN_HOME}}"
  cd "$home" || exit 1
  local venv="${ATOKEN_VENV:-$home/.venv}"
  if [[ -f "$venv/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
  fi

  # One rendezvous per job, hosted by the first node of the allocation.
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  export MASTER_ADDR
  export MASTER_PORT="${MASTER_PORT:-29500}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  # Fail a hung collective with an error (and let Slurm requeue) instead of hanging to the time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  local run_dir="${ATOKEN_RUN_DIR:-$home/runs/stage$STAGE}"
  mkdir -p "$run_dir/hangs"
  # NCCL flight recorder: each rank keeps its last collectives and, when one times out, dumps them to
  # the run directory, beside the stacks the trainer's watchdog writes there (training/watchdog.py).
  export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
  export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
  export TORCH_NCCL_DEBUG_INFO_TEMP_FILE="${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$run_dir/hangs/nccl_trace_rank_}"
  # megatron-core sequence parallelism relies on kernels being issued in program order.
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

  local args=(--config "${ATOKEN_CONFIG:-stage$STAGE}" --set "run_dir=$run_dir")
  if (( STAGE > 1 )); then
    args+=(--set "checkpoint.init_from=${ATOKEN_INIT_FROM:-$home/runs/stage$((STAGE - 1))}")
  fi
  args+=("$@")

  # Rank 0 runs on this (the batch) node and writes this file when it stopped for a requeue.
  export ATOKEN_REQUEUE_FILE="${TMPDIR:-/tmp}/atoken-requeue-${SLURM_JOB_ID}"
  rm -f "$ATOKEN_REQUEUE_FILE"

  echo "[atoken] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_JOB_NUM_NODES} node(s), ${SLURM_NTASKS} task(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
  srun --kill-on-bad-exit=1 --cpu-bind=none python -u -m atoken.training.train "${args[@]}" &
  local pid=$!
  # srun forwards the signals it gets to every task; the trainer finishes its step, checkpoints,
  # and on USR1 writes $ATOKEN_REQUEUE_FILE and exits 0; on TERM it exits 143 (stop).
  trap 'echo "[atoken] USR1: checkpoint and requeue"; kill -USR1 "$pid"' USR1
  trap 'echo "[atoken] TERM: checkpoint and stop"; kill -TERM "$pid"' TERM
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || true  # returns early when a trapped signal arrives; keep waiting for srun
  done
  local rc=0
  wait "$pid" || rc=$?
  trap - USR1 TERM
  if (( rc == 0 )) && [[ -f "$ATOKEN_REQUEUE_FILE" ]]; then
    rm -f "$ATOKEN_REQUEUE_FILE"
    echo "[atoken] checkpoint written; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  # A rank's watchdog found no progress (exit 124, stacks in hangs/rank_R.JOB.RESTART.txt; srun may
  # report another rank's code, killed after it): requeue, the job resumes from `latest`.
  local attempt="${SLURM_JOB_ID}.${SLURM_RESTART_COUNT:-0}"
  if (( rc == 124 )) || compgen -G "$run_dir/hangs/rank_*.${attempt}.txt" >/dev/null; then
    local hung  # launches of this job with a hang: distinct RESTART numbers
    hung="$(find "$run_dir/hangs" -name "rank_*.${SLURM_JOB_ID}.*.txt" | sed 's/.*\.\([0-9]*\)\.txt$/\1/' \
      | sort -u | wc -l)"
    if (( hung <= ${ATOKEN_MAX_HANG_REQUEUES:-3} )); then
      echo "[atoken] a rank hung (exit ${rc}; stacks in $run_dir/hangs/); requeueing job ${SLURM_JOB_ID}"
      scontrol requeue "$SLURM_JOB_ID"
      exit 0
    fi
    echo "[atoken] ranks hung in ${hung} launches of job ${SLURM_JOB_ID}: not requeued again"
  fi
  echo "[atoken] training exited with ${rc}"
  exit "$rc"
}

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
  # megatron-core sequence parallelism relies on kernels being issued in program order.
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

  local args=(--config "${ATOKEN_CONFIG:-stage$STAGE}" --set "run_dir=${ATOKEN_RUN_DIR:-$home/runs/stage$STAGE}")
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
  echo "[atoken] training exited with ${rc}"
  exit "$rc"
}

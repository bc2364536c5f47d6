"""Each rank's watchdog, counting micro-batches, and progress lines inside long steps.
docs/fault_tolerance.md.

A step of stage 3 on one CPU rank holds 1792 micro-batches, so progress is counted per micro-batch:
``beat()`` after each. A thread checks that the last beat is younger than the limit
(``WatchdogConfig``: a fixed ``timeout``, or ``factor`` x the median micro-batch time, at least
``min_timeout``; ``first_timeout`` until a micro-batch time is known). Past it, the rank writes every
thread's Python stack to ``run_dir/hangs/rank_RRRRR.ATTEMPT.txt`` (ATTEMPT: Slurm job.restart), keeps
the NCCL flight recorder's trace beside it (NCCL runs, where cluster/common.sh enables the recorder),
and exits ``HUNG_EXIT_CODE``: the Slurm scripts requeue the job, which resumes from ``latest``.
Evaluation and checkpoint writes run ``paused()``. The thread only reads clocks and never takes a lock
the main thread may hold; a rank stuck in a collective releases the GIL, one stuck in Python code
gives it up between bytecodes.
"""
from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import statistics
import threading
import time
from collections import deque
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger(__name__)

HUNG_EXIT_CODE = 124  # as timeout(1): no micro-batch completed within the limit; requeue me
SLURM_WARNING_S = 300  # cluster/stage*.slurm: #SBATCH --signal=B:USR1@300


def attempt() -> str:
    """This launch: ``JOB.RESTART`` under Slurm, ``local`` otherwise."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else "local"


class Watchdog:
    def __init__(self, cfg, run_dir: Path, rank: int, per_step: int, rounds: int, on_hang=None):
        self.cfg, self.dir, self.rank, self.per_step, self.rounds = cfg, Path(run_dir) / "hangs", rank, per_step, rounds
        self.on_hang = on_hang  # rank 0: records the hang in events.jsonl
        self.times: deque[float] = deque(maxlen=256)  # recent micro-batch seconds
        self.step, self.done, self.tokens = 0, 0, 0
        self.last = self.step_start = self.reported = time.monotonic()
        self.paused_since: float | None = None
        self.estimated = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="atoken-watchdog", daemon=True)
        self._thread.start()

    def limit(self) -> float:
        if self.cfg.timeout > 0:
            return self.cfg.timeout
        if len(self.times) < 2:
            return self.cfg.first_timeout
        return max(self.cfg.min_timeout, self.cfg.factor * statistics.median(self.times))

    def start_step(self, step: int) -> None:
        self.step, self.done, self.tokens = step, 0, 0
        self.step_start = self.reported = self.last = time.monotonic()

    def beat(self, tokens: int) -> None:
        """One micro-batch completed: the watchdog's progress, and a progress line every
        ``progress_every`` seconds when a step holds many micro-batches."""
        now = time.monotonic()
        self.times.append(now - self.last)
        self.last, self.done, self.tokens = now, self.done + 1, self.tokens + tokens
        if not self.estimated and (self.done >= min(3, self.per_step)):
            self.estimated = True
            self._estimate()
        if self.per_step > 1 and now - self.reported >= self.cfg.progress_every:
            self.reported = now
            spent = now - self.step_start
            eta = (self.per_step - self.done) * spent / self.done
            log.info("step %d: %d/%d micro-batches, %.0f tokens/s, step ETA %.0f s", self.step, self.done,
                     self.per_step, self.tokens / max(spent, 1e-9), eta)

    def _estimate(self) -> None:
        """Once, at start: how long a step takes against Slurm's warning, and what to set if too long."""
        per_micro = statistics.median(self.times)
        step_s = per_micro * self.per_step
        log.info("a step holds %d micro-batch(es) at ~%.2f s each: ~%.0f s per step; a stop signal is answered "
                 "after the current step and a checkpoint (Slurm warns %d s ahead)", self.per_step, per_micro,
                 step_s, SLURM_WARNING_S)
        budget = SLURM_WARNING_S * 2 / 3  # a third left for the checkpoint write
        if step_s > budget:
            per_round = self.per_step // max(self.rounds, 1)
            fit = max(1, int(budget // max(per_micro * per_round, 1e-9)))
            log.warning("a step (~%.0f s) cannot finish within Slurm's %d s warning: set mix_rounds=%d (now %d) "
                        "or lower the streams' token_budget, use more GPUs, or warn earlier "
                        "(#SBATCH --signal=B:USR1@%d)", step_s, SLURM_WARNING_S, fit, self.rounds,
                        int(step_s * 1.5) + 60)

    @contextlib.contextmanager
    def paused(self):
        """Evaluation, checkpoint writes: not counted as a hang."""
        self.paused_since = time.monotonic()
        try:
            yield
        finally:
            self.paused_since = None
            self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, max(0.2, self.limit() / 20))):
            if self.paused_since is not None:
                continue
            idle = time.monotonic() - self.last
            if idle > self.limit():
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank_{self.rank:05d}.{attempt()}.txt"
        with open(path, "w") as f:
            f.write(f"rank {self.rank} host {os.uname().nodename}: no micro-batch completed for {idle:.0f} s "
                    f"(limit {self.limit():.0f} s) in step {self.step}, after {self.done} of its {self.per_step} "
                    "micro-batches\n\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        self._nccl_trace()
        log.error("watchdog: rank %d made no progress for %.0f s in step %d (micro-batch %d/%d): stacks in %s; "
                  "exiting %d for a requeue", self.rank, idle, self.step, self.done, self.per_step, path,
                  HUNG_EXIT_CODE)
        if self.on_hang is not None:
            with contextlib.suppress(Exception):
                self.on_hang(rank=self.rank, step=self.step, micro_batch=self.done, idle_s=idle, stacks=str(path))
        os._exit(HUNG_EXIT_CODE)  # the main thread is stuck: no clean shutdown is possible

    def _nccl_trace(self) -> None:
        """NCCL runs with the flight recorder on (TORCH_NCCL_TRACE_BUFFER_SIZE > 0, cluster/common.sh):
        write its trace of this rank's collectives beside the stacks. Its own dump on a collective's
        timeout (TORCH_NCCL_DUMP_ON_TIMEOUT) stays where TORCH_NCCL_DEBUG_INFO_TEMP_FILE points."""
        if not (dist.is_initialized() and dist.get_backend() == "nccl"
                and int(os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE", "0") or 0) > 0):
            return
        try:  # NOTE: a private torch API (the one torchtitan's flight-recorder dump uses); best effort
            from torch._C._distributed_c10d import _dump_nccl_trace  # noqa: PLC0415 - private, NCCL builds only

            (self.dir / f"nccl_trace_rank_{self.rank:05d}.{attempt()}.pkl").write_bytes(_dump_nccl_trace())
        except Exception as e:  # noqa: BLE001 - the stacks are written already
            log.warning("watchdog: no NCCL flight-recorder trace (%s: %s)", type(e).__name__, e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

"""Stop cleanly when the scheduler asks: finish the step, checkpoint, exit with a code that says why.

Slurm sends ``SIGUSR1`` ahead of a time limit or preemption (``#SBATCH --signal=B:USR1@300``; the
batch script forwards it to every task through srun). The trainer then finishes its current step,
writes a checkpoint and asks for a requeue: under the batch script (``ATOKEN_REQUEUE_FILE`` set),
rank 0 writes that file and every rank exits 0, so srun's ``--kill-on-bad-exit`` cannot kill a
rank still finishing (one rank's early non-zero exit would); the script sees the file and requeues
the job, which resumes from that checkpoint. Without the variable the exit code says it:
``REQUEUE_EXIT_CODE``. ``SIGTERM`` (``scancel``, or the kill at the end of the grace time) gets the
same checkpoint but exits with ``STOPPED_EXIT_CODE``: nobody asked for the job to come back.

Ranks receive the signal at different moments, possibly in different steps, so they agree once per
step: each rank's flag is max-reduced over a gloo (CPU) group, which never waits on the GPU stream.
"""
from __future__ import annotations

import logging
import os
import signal
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on SIGUSR1, run me again
STOPPED_EXIT_CODE = 143  # 128 + SIGTERM: checkpointed on SIGTERM, do not requeue

_REQUEUE, _STOP = 1, 2


class StopSignals:
    """Installs handlers for SIGUSR1 / SIGTERM; ``poll()`` (collective, once per step) tells every
    rank whether to stop after this step and whether to ask for a requeue."""

    def __init__(self):
        self._flag = 0
        self._group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo", timeout=timedelta(minutes=10)) \
                if dist.get_backend() != "gloo" else dist.group.WORLD
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGUSR1, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        kind = _REQUEUE if signum == signal.SIGUSR1 else _STOP
        if kind > self._flag:
            self._flag = kind
            # A signal handler may only do async-safe work; logging here is fine in CPython (the
            # handler runs between bytecodes of the main thread).
            log.warning("received %s: will checkpoint after this step and %s", signal.Signals(signum).name,
                        "exit for requeue" if kind == _REQUEUE else "stop")

    def poll(self) -> int:
        """0: go on; ``_REQUEUE`` or ``_STOP``: the same answer on every rank."""
        if self._group is None:
            return self._flag
        flag = torch.tensor([self._flag], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())

    @staticmethod
    def exit_code(flag: int) -> int:
        """Request the requeue (rank 0 writes ``ATOKEN_REQUEUE_FILE`` if set) and return the exit code."""
        if flag != _REQUEUE:
            return STOPPED_EXIT_CODE
        marker = os.environ.get("ATOKEN_REQUEUE_FILE")
        if not marker:
            return REQUEUE_EXIT_CODE
        if not dist.is_initialized() or dist.get_rank() == 0:
            Path(marker).write_text("requeue\n")
        return 0

    @staticmethod
    def describe(flag: int) -> str:
        return "requeue" if flag == _REQUEUE else "stop"

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

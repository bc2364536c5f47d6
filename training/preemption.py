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
step, on the step's one small exchange (``exchange.py``, over a gloo group that never waits on the GPU
stream), held before the last micro-batch's backward. A signal is answered by the checkpoint after the
step whose exchange saw it: at most one step, one micro-batch and the checkpoint write after it
arrives (the trainer logs at start how that compares with Slurm's 300 s warning).
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on SIGUSR1, run me again
STOPPED_EXIT_CODE = 143  # 128 + SIGTERM: checkpointed on SIGTERM, do not requeue

_REQUEUE, _STOP = 1, 2


class StopSignals:
    """Installs handlers for SIGUSR1 / SIGTERM; ``flag`` is this rank's (0, ``_REQUEUE`` or ``_STOP``),
    which the step's exchange max-reduces so that every rank stops after the same step."""

    def __init__(self):
        self._flag = 0
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGUSR1, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        kind = _REQUEUE if signum == signal.SIGUSR1 else _STOP
        if kind > self._flag:
            self._flag = kind
            # A signal handler may only do async-safe work; logging here is fine in CPython (the
            # handler runs between bytecodes of the main thread).
            log.warning("received %s: will checkpoint after this step and %s", signal.Signals(signum).name,
                        "exit for requeue" if kind == _REQUEUE else "stop")

    @property
    def flag(self) -> int:
        """This rank's: 0 (go on), ``_REQUEUE`` or ``_STOP``."""
        return self._flag

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

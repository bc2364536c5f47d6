"""Stop cleanly when the scheduler asks: finish the step, checkpoint, exit with a code that says why.

Slurm sends ``SIGUSR1`` ahead of a time limit or preemption (``#SBATCH --signal=B:USR1@180``; the
batch script forwards it to every task through srun). The trainer then finishes its current step,
writes a checkpoint and exits with ``REQUEUE_EXIT_CODE``; the batch script sees that code and
requeues the job, which resumes from that checkpoint. ``SIGTERM`` (``scancel``, or the kill at the
end of the grace time) gets the same checkpoint but exits with ``STOPPED_EXIT_CODE``: nobody asked
for the job to come back.

Ranks receive the signal at different moments, possibly in different steps, so they agree once per
step: each rank's flag is max-reduced over a gloo (CPU) group, which never waits on the GPU stream.
"""
from __future__ import annotations

import logging
import signal
from datetime import timedelta

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
        return REQUEUE_EXIT_CODE if flag == _REQUEUE else STOPPED_EXIT_CODE

    @staticmethod
    def describe(flag: int) -> str:
        return "requeue" if flag == _REQUEUE else "stop"

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

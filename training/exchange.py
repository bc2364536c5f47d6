"""The step's one small collective: every rank's stop signal, non-finite count and per-stream loss,
and every ``straggler_every`` steps each rank's step time and data wait. docs/fault_tolerance.md.

Held once per step, after the last micro-batch's forward and before its backward (the guards decide
there whether the update is applied), as one SUM all-reduce of a few floats over a gloo (CPU) group
that never waits on the GPU stream. Its vector: [requeue, stop, non-finite micro-batches,
loss sum per stream (S), then on report steps: mean step time per rank (W), mean data wait per rank (W)]
(rank r fills its own slots of the last two: the sum is a gather).

"Step time" is a rank's wall time from the start of the step to its arrival here, data wait included.
Ranks that wait for a slower one inside the step (ZeRO-2/3's per-micro-batch gradient reduction, the
understanding streams' gathered batches) carry part of its delay: the slowest rank is still named,
its ratio to the median is then an underestimate.
"""
from __future__ import annotations

import logging
import socket
import statistics
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class Agreement:
    stop: int  # 0, preemption._REQUEUE or preemption._STOP: the same on every rank
    nonfinite: int  # micro-batches with a non-finite loss, over all ranks
    stream_losses: dict[str, float]  # per stream, its task's loss averaged over the ranks
    stragglers: dict | None  # on report steps: the slowest rank, its host, its ratio to the median


class StepExchange:
    def __init__(self, streams: list[str], every: int):
        self.streams, self.every = list(streams), every
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.group = None
        self.hosts = [socket.gethostname()]
        if self.world > 1:
            self.group = dist.new_group(backend="gloo", timeout=timedelta(minutes=30)) \
                if dist.get_backend() != "gloo" else dist.group.WORLD
            self.hosts = [None] * self.world
            dist.all_gather_object(self.hosts, socket.gethostname(), group=self.group)
        self._times: list[tuple[float, float]] = []  # (step time, data wait) since the last report
        self._first = None  # first step of the report window

    def agree(self, step: int, stop: int, nonfinite: int, stream_losses: dict[str, float], step_time: float,
              data_wait: float) -> Agreement:
        """Collective: every rank calls it once per step, at the same point."""
        if self._first is None:
            self._first = step
        self._times.append((step_time, data_wait))
        report = self.every > 0 and step % self.every == 0
        s, w = len(self.streams), self.world
        vec = torch.zeros(3 + s + (2 * w if report else 0), dtype=torch.float64)
        vec[0], vec[1], vec[2] = float(stop == 1), float(stop == 2), float(nonfinite)
        for i, name in enumerate(self.streams):
            vec[3 + i] = stream_losses.get(name, 0.0)
        if report:
            vec[3 + s + self.rank] = statistics.fmean(t for t, _ in self._times)
            vec[3 + s + w + self.rank] = statistics.fmean(d for _, d in self._times)
        if self.group is not None:
            dist.all_reduce(vec, group=self.group)
        out = vec.tolist()
        stragglers = None
        if report:
            stragglers = self._stragglers(out[3 + s:3 + s + w], out[3 + s + w:], self._first, step)
            self._times, self._first = [], None
        return Agreement(stop=2 if out[1] else (1 if out[0] else 0), nonfinite=int(out[2]),
                         stream_losses={n: out[3 + i] / w for i, n in enumerate(self.streams)},
                         stragglers=stragglers)

    def _stragglers(self, times: list[float], waits: list[float], first: int, last: int) -> dict:
        slowest = max(range(len(times)), key=times.__getitem__)
        median = statistics.median(times)
        ratio = times[slowest] / median if median > 0 else 1.0
        report = {"steps": [first, last], "slowest_rank": slowest, "host": self.hosts[slowest],
                  "step_time": times[slowest], "median_step_time": median, "ratio": ratio,
                  "data_wait": waits[slowest], "median_data_wait": statistics.median(waits)}
        log.info("steps %d-%d: slowest rank %d on %s, %.2fx the median step time (%.2f s vs %.2f s; data wait "
                 "%.2f s vs median %.2f s)", first, last, slowest, report["host"], ratio, times[slowest], median,
                 report["data_wait"], report["median_data_wait"])
        return report

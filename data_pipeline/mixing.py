"""Round-robin task mixing: every optimizer step runs the same interleaved sequence of micro-batches.

The mix is the streams' ``micro_batches`` (stage 2: image rec 2, video und 1, video rec 6).
``mix_order`` (config.py) spreads each stream evenly over one round: the k-th of a stream's n
micro-batches sits at (k + 1/2) / n of the round, and ties go to the stream listed first. For
image_rec 2, video_und 1, video_rec 6 that is::

    video_rec, image_rec, video_rec, video_rec, video_und, video_rec, image_rec, video_rec, video_rec

An optimizer step is ``mix_rounds`` rounds (``DataConfig.step_order``, whose length DeepSpeed
accumulates). Every rank follows the same order, so all data-parallel ranks run the same task in the
same micro-batch (and so build the same graph).

To the device, one micro-batch ahead: when the trainer takes micro-batch k, the copy of k + 1 (its
uint8 values from pinned memory, non-blocking) and the building of its float [N, 3072] features
are already queued on a side CUDA stream, where they overlap k's compute; the compute stream waits
for that copy only when it takes k + 1. The checkpointed state is the one of the micro-batches
handed out, not of the one made ahead.

``MixedLoader.state_dict`` is collective over the data-parallel group: it gathers every rank's
position in every stream, so the checkpoint holds the whole data state and each rank resumes exactly
its own. At another data-parallel size the positions do not carry over (each rank's slice of an
epoch changes): every stream restarts at the start of the oldest epoch any rank was in, repeating
what was read of it since (logged with its count) and losing nothing.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from .config import DataConfig
from .loader import StreamLoader, stream_stats
from .packing import MicroBatch

log = logging.getLogger(__name__)


class MixedLoader:
    """``next(mixed)`` is the next ``MicroBatch`` of the step's order (``mixed.order``, one entry per
    micro-batch of an optimizer step), on ``device`` (float features [N, 3072], int64 coords);
    ``.stream`` says which stream, task and modality it holds.

    ``rank``/``world``/``group``: this rank among the data-parallel ranks, and their process group
    (the tensor-parallel ranks of a group pass the same rank and read the same samples).
    """

    def __init__(self, data: DataConfig, mix_rounds: int = 1, rank: int = 0, world: int = 1, group=None,
                 device: torch.device | str = "cpu"):
        data.check()
        if mix_rounds < 1:
            raise ValueError(f"mix_rounds must be >= 1, got {mix_rounds}")
        self.data, self.rank, self.world, self.group = data, rank, world, group
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.loaders = {name: StreamLoader(s, data, rank, world, pin_memory=cuda) for name, s in data.streams.items()}
        self.order = data.step_order(mix_rounds)
        self.slot = 0  # index into order of the next micro-batch handed out
        self._states = {name: loader.state_dict() for name, loader in self.loaders.items()}  # as handed out
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._ahead = None  # (micro-batch on its way to the device, its copy's CUDA event), slot after it

    @property
    def micro_batches_per_step(self) -> int:
        return len(self.order)

    def __iter__(self) -> MixedLoader:
        return self

    def __next__(self) -> MicroBatch:
        if self._ahead is None:
            self._ahead = self._send(self.slot)
        micro, event, slot = self._ahead
        self._ahead = self._send(slot)  # k + 1's copy is queued before k's compute
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in (micro.batch.features, micro.batch.coords, micro.batch.cu_seqlens):
                t.record_stream(current)  # allocated on the side stream, used on this one
        self._states[micro.stream.name] = micro.state
        self.slot = slot
        return micro

    def _send(self, slot: int):
        """The micro-batch of ``slot`` from its stream, its copy to the device started; and the slot
        after it."""
        micro = next(self.loaders[self.order[slot]])
        event = None
        if self._copy_stream is None:
            micro.batch = micro.batch.to(self.device)
        else:
            with torch.cuda.stream(self._copy_stream):
                micro.batch = micro.batch.to(self.device)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
        return micro, event, (slot + 1) % len(self.order)

    def state_dict(self) -> dict[str, Any]:
        """Every data-parallel rank's position in every stream. Collective: all ranks call it."""
        local = {name: dict(state) for name, state in self._states.items()}
        if self.world > 1:
            ranks: list[Any] = [None] * self.world
            dist.all_gather_object(ranks, local, group=self.group)
        else:
            ranks = [local]
        return {"world": self.world, "order": self.order, "slot": self.slot,
                "streams": {name: [r[name] for r in ranks] for name in self.loaders}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict`` (of any data-parallel size; see the module docstring)."""
        self._ahead = None
        self.slot = state["slot"] if state["order"] == self.order else 0
        if state["order"] != self.order:
            log.warning("the task mix changed since the checkpoint (%s -> %s): the step's order starts over",
                        state["order"], self.order)
        for name in sorted(set(state["streams"]) - set(self.loaders)):
            log.warning("stream %r of the checkpoint is not configured any more: its position is dropped", name)
        for name, loader in self.loaders.items():
            ranks = state["streams"].get(name)
            if ranks is None:
                log.info("stream %r is new: it starts at its beginning", name)
            elif state["world"] == self.world:
                loader.load_state_dict(ranks[self.rank])
            else:
                loader.load_state_dict(_restart_oldest_epoch(name, ranks, self.rank, self.world))
            self._states[name] = loader.state_dict()

    def stats(self) -> dict[str, dict[str, float]]:
        """Per stream: the loader's counters (``StreamLoader.stats``)."""
        return {name: stream_stats(self._states[name], loader.stream) for name, loader in self.loaders.items()}

    @property
    def samples_bad(self) -> int:
        return sum(state["samples_bad"] for state in self._states.values())

    def close(self) -> None:
        self._ahead = None
        for loader in self.loaders.values():
            loader.close()


def _restart_oldest_epoch(name: str, ranks: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
    """A state for ``rank`` of ``world`` from states saved at another data-parallel size: the start of
    the oldest epoch in progress, with the counters of the old rank of the same index (if any)."""
    oldest = min(r["epoch"] for r in ranks)
    repeated = sum(r["pos"] for r in ranks if r["epoch"] == oldest)
    log.warning("stream %r: checkpoint of %d data-parallel ranks resumed on %d: restarting epoch %d, "
                "%d+ samples of it (and any the faster ranks read of later epochs) are read again",
                name, len(ranks), world, oldest, repeated)
    base = ranks[rank] if rank < len(ranks) else dict.fromkeys(("samples_seen", "samples_bad", "tokens", "batches"), 0)
    return {**base, "epoch": oldest, "pos": 0, "rank": rank, "world": world}

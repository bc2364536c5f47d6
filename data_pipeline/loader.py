"""One stream's loader: an endless, exactly resumable iterator of packed micro-batches, made ahead of
the trainer.

Samples come from ``StreamDataset`` in this rank's epoch order (``dataset.epoch_order``), epoch after
epoch, through one torch DataLoader (one sample per item, decoded in ``data.workers_per_stream``
processes; a map-style dataset, so the order does not depend on the number of workers). A packer
thread packs them greedily in arrival order (``packing.GreedyPacker``) into transport-form
micro-batches (uint8 values, pinned on a GPU machine) and keeps ``data.prefetch`` of them ready, so
neither decoding nor packing runs on the training thread. A batch may span two epochs.

Resume: the position is (epoch, samples of this rank's epoch sequence consumed by the batches
yielded so far: bad samples included, the sample held back for the next batch excluded). Each
batch carries the position and counters after it (``MicroBatch.state``); the loader's state is the
one of the last batch it yielded, whatever the packer has made ahead. A fresh loader given that
state yields the same batches as an uninterrupted run: same order (``epoch_order``), same tensors
(seeded per sample), same packing (greedy). Ranks are independent: each keeps its own position;
``mixing.MixedLoader`` gathers them into the checkpoint.

Bad samples: the packer counts them and applies ``max_bad_fraction`` as it meets them; their
warnings, and the error when there are too many, are given out with the batch they belong to, so
logs and counters agree with what the trainer has consumed.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from atoken.model.errors import UserError

from .config import DataConfig, StreamConfig
from .dataset import PositionedSamples, StreamDataset, epoch_order, is_bad
from .packing import GreedyPacker, MicroBatch, check_budget
from .workers import worker_context, worker_init

log = logging.getLogger(__name__)

# This many undecodable samples and nothing else since the start: the data (a wrong column, a
# broken writer), not a stray file, is at fault; fail before bad_check_min_samples are seen.
ALL_BAD_MIN = 8
_COUNTERS = ("samples_seen", "samples_bad", "tokens", "batches")
_JOIN_S = 60.0  # close(): how long to wait for the packer to finish the sample it is reading


def _unwrap(batch: list) -> Any:
    return batch[0]  # batch_size=1: no collation, samples differ in length


@dataclass
class _Made:
    """What the packer hands over: a micro-batch, or the error that ended packing; and the bad
    samples met since the previous one (to be logged when it is given out)."""
    micro: MicroBatch | None
    bad: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None


class _Positions(Sampler):
    """Keys (epoch, position, sample index) of this rank's samples from ``state``'s position on,
    epoch after epoch, forever."""

    def __init__(self, loader: StreamLoader, epoch: int, pos: int):
        self.loader, self.epoch, self.pos = loader, epoch, pos

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch, start, empty = self.epoch, self.pos, 0
        while True:
            ids = self.loader.epoch_ids(epoch)
            for p in range(start, len(ids)):
                yield epoch, p, int(ids[p])
            empty = 0 if start < len(ids) else empty + 1
            if empty > 1:  # one is normal: resumed exactly at an epoch's end
                raise RuntimeError(f"stream {self.loader.stream.name!r} ({self.loader.stream.remote}) "
                                   "yields no samples")
            epoch, start = epoch + 1, 0


class StreamLoader:
    """Iterate forever: ``next(loader)`` gives a ``packing.MicroBatch`` of <= token_budget tokens, in
    transport form (``model.packed``; pinned when ``pin_memory``).

    ``rank``/``world``: this rank's place among the data-parallel ranks (the ranks of one
    tensor-parallel group pass the same ``rank`` and read the same samples).
    Counters for the log (consistent with the batches yielded so far): ``samples_seen`` (good and
    bad samples consumed), ``samples_bad``, ``tokens``, ``batches``; ``last_bad`` the last marker.
    """

    def __init__(self, stream: StreamConfig, data: DataConfig, rank: int = 0, world: int = 1,
                 pin_memory: bool = False):
        check_budget(stream)
        self.stream, self.data, self.rank, self.world, self.pin_memory = stream, data, rank, world, pin_memory
        self.dataset = StreamDataset(stream, data)
        self._state = {"epoch": 0, "pos": 0, "rank": rank, "world": world, **dict.fromkeys(_COUNTERS, 0)}
        self.last_bad: dict[str, Any] | None = None
        self._queue: queue.Queue | None = None  # started by the first next()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __getattr__(self, name: str):  # epoch, pos and the counters: of the last batch yielded
        if name in ("epoch", "pos", *_COUNTERS):
            return self.__dict__["_state"][name]
        raise AttributeError(name)

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> MicroBatch:
        if self._thread is None:
            self._start()
        made = self._queue.get()
        for marker in made.bad:
            self._log_bad(marker)
        if made.error is not None:
            self.close()
            raise made.error
        self._state = made.micro.state
        return made.micro

    def epoch_ids(self, epoch: int) -> np.ndarray:
        """This rank's sample indices of ``epoch``, in reading order."""
        return epoch_order(self.dataset.samples_per_shard, self.data.seed, epoch, self.rank, self.world,
                           self.data.shuffle, self.data.shuffle_block)

    # ---------------------------------------------------------------- the packer thread

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(maxsize=self.data.prefetch), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(dict(self._state), self._queue, self._stop),
                                        name=f"atoken-pack-{self.stream.name}", daemon=True)
        self._thread.start()

    def _run(self, state: dict[str, Any], out: queue.Queue, stop: threading.Event) -> None:
        def put(made: _Made) -> bool:
            while not stop.is_set():
                try:
                    out.put(made, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        workers = self.data.workers_per_stream
        # NOTE: a generator of its own: the DataLoader would otherwise draw its base seed from the
        # global torch RNG, on this thread, at a time the training thread does not control.
        loader = DataLoader(PositionedSamples(self.dataset), batch_size=1, collate_fn=_unwrap, num_workers=workers,
                            sampler=_Positions(self, state["epoch"], state["pos"]),
                            prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(0),
                            # not fork: this process runs threads (workers.py)
                            multiprocessing_context=worker_context() if workers else None,
                            worker_init_fn=worker_init() if workers else None)
        samples = iter(loader)
        try:
            for made in self._pack(samples, state):
                if not put(made) or made.error is not None:
                    return
        except BaseException as e:  # noqa: BLE001 - a failed read: the trainer raises it in order
            put(_Made(None, error=e))
        finally:
            del samples  # stops the DataLoader's worker processes

    def _pack(self, samples: Iterator, state: dict[str, Any]) -> Iterator[_Made]:
        """Greedy packing of ``samples`` ((epoch, position, sample) in reading order) from ``state``."""
        packer, state, bad = GreedyPacker(self.stream), dict(state), []
        for epoch, pos, sample in samples:
            if is_bad(sample):
                state["samples_seen"] += 1
                state["samples_bad"] += 1
                state["epoch"], state["pos"] = epoch, pos + 1
                bad.append(sample)
                error = self._too_many_bad(state, in_batch=len(packer), sample=sample)
                if error is not None:
                    yield _Made(None, bad, error)
                    return
                continue
            if not packer.fits(sample):
                micro = packer.pop_batch(pin=self.pin_memory)
                state["samples_seen"] += micro.batch.num_samples
                state["tokens"] += micro.batch.num_tokens
                state["batches"] += 1
                micro.state = dict(state)
                yield _Made(micro, bad)
                bad = []
            packer.add(sample)
            state["epoch"], state["pos"] = epoch, pos + 1

    def _too_many_bad(self, state: dict[str, Any], in_batch: int, sample: dict[str, Any]) -> UserError | None:
        seen = state["samples_seen"] + in_batch  # good samples of the batch being filled count too
        frac = state["samples_bad"] / seen
        if frac > self.data.max_bad_fraction and (
                seen >= self.data.bad_check_min_samples or (state["samples_bad"] == seen >= ALL_BAD_MIN)):
            return UserError(  # bad data, not a bug of ours: one line, no traceback
                f"stream {self.stream.name!r}: {state['samples_bad']} of {seen} samples seen were undecodable "
                f"({frac:.1%} > max_bad_fraction {self.data.max_bad_fraction:.1%}) in {self.stream.remote}; "
                f"last: {self._where(sample)}: {sample['error']}; rewrite the shards (the writers reject such files) "
                "or raise data.max_bad_fraction")
        return None

    def _where(self, sample: dict[str, Any]) -> str:
        return (f"{sample['name']!r} (stream {self.stream.name}, shard {sample['shard']}, "
                f"index {sample['index_in_shard']}, sample {sample['idx']})")

    def _log_bad(self, sample: dict[str, Any]) -> None:
        self.last_bad = sample
        log.warning("skipping undecodable sample %s: %s", self._where(sample), sample["error"])

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """This rank's position and counters, as of the last batch yielded."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (this rank's own); the next batch is the one that followed it."""
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise ValueError(f"stream {self.stream.name!r}: state of rank {state['rank']} of {state['world']} "
                             f"given to rank {self.rank} of {self.world}")
        self.close()
        self._state = {k: state[k] for k in ("epoch", "pos", "rank", "world", *_COUNTERS)}

    def stats(self) -> dict[str, float]:
        """Counters for the trainer's log; ``fill`` is the mean fraction of the token budget used."""
        return stream_stats(self._state, self.stream)

    def close(self) -> None:
        """Stop the packer thread (it finishes the sample it is reading) and its worker processes."""
        if self._thread is None:
            return
        self._stop.set()
        while True:  # free a packer blocked on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(_JOIN_S)
        if self._thread.is_alive():
            log.warning("stream %r: the packer thread did not stop within %.0f s", self.stream.name, _JOIN_S)
        self._thread = self._queue = None


def stream_stats(state: dict[str, Any], stream: StreamConfig) -> dict[str, float]:
    """A stream state's counters, ``fill`` (mean fraction of the token budget used) and ``epoch``."""
    fill = state["tokens"] / (state["batches"] * stream.token_budget) if state["batches"] else 0.0
    return {**{k: state[k] for k in _COUNTERS}, "fill": fill, "epoch": state["epoch"]}

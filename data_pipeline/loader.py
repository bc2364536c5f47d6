"""One stream's loader: an endless, exactly resumable iterator of packed micro-batches.

Samples come from ``StreamDataset`` in this rank's epoch order (``dataset.epoch_order``) through a
torch DataLoader (one sample per item, decoded in ``num_workers`` processes; a map-style dataset, so
the order does not depend on the number of workers) and are packed greedily in arrival order
(``packing.GreedyPacker``). Epochs roll over forever; a batch may span two epochs.

Resume: the position is (epoch, samples of this rank's epoch sequence consumed by the batches
yielded so far: bad samples included, the sample held back for the next batch excluded). A fresh
loader given that state yields the same batches as an uninterrupted run: same order
(``epoch_order``), same tensors (seeded per sample), same packing (greedy). Ranks are independent:
each keeps its own position; ``mixing.MixedLoader`` gathers them into the checkpoint.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from ..model.errors import UserError
from .config import DataConfig, StreamConfig
from .dataset import EpochSamples, StreamDataset, epoch_order, is_bad
from .packing import GreedyPacker, MicroBatch, check_budget

log = logging.getLogger(__name__)

# This many undecodable samples and nothing else since the start: the data (a wrong column, a
# broken writer), not a stray file, is at fault; fail before bad_check_min_samples are seen.
ALL_BAD_MIN = 8
_COUNTERS = ("samples_seen", "samples_bad", "tokens", "batches")


def _unwrap(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]  # batch_size=1: no collation, samples differ in length


class StreamLoader:
    """Iterate forever: ``next(loader)`` gives a ``packing.MicroBatch`` of <= token_budget tokens.

    ``rank``/``world``: this rank's place among the data-parallel ranks (the ranks of one
    tensor-parallel group pass the same ``rank`` and read the same samples).
    Counters for the log (consistent with the batches yielded so far): ``samples_seen`` (good and
    bad samples consumed), ``samples_bad``, ``tokens``, ``batches``; ``last_bad`` the last marker.
    """

    def __init__(self, stream: StreamConfig, data: DataConfig, rank: int = 0, world: int = 1):
        check_budget(stream)
        self.stream, self.data, self.rank, self.world = stream, data, rank, world
        self.dataset = StreamDataset(stream, data)
        self._packer = GreedyPacker(stream)
        self.epoch, self.pos = 0, 0  # position: samples of `epoch`'s sequence consumed
        self._it = None  # DataLoader iterator over the rest of the current epoch
        self._pulled = 0  # samples pulled from _it (the current epoch, from where _it started)
        self._pending: dict[str, Any] | None = None  # pulled, did not fit, starts the next batch
        self._empty_epochs = 0
        self.samples_seen = self.samples_bad = self.tokens = self.batches = 0
        self.last_bad: dict[str, Any] | None = None

    def __iter__(self) -> "StreamLoader":
        return self

    def __next__(self) -> MicroBatch:
        packer = self._packer
        while True:
            sample, self._pending = self._pending, None
            if sample is None:
                sample = self._pull()
            if is_bad(sample):
                self.pos += 1
                self._on_bad(sample, in_batch=len(packer))
                continue
            if not packer.fits(sample):
                self._pending = sample
                break
            packer.add(sample)
            self.pos += 1
        micro = packer.pop_batch()
        self.samples_seen += micro.batch.num_samples
        self.tokens += micro.batch.num_tokens
        self.batches += 1
        return micro

    def epoch_ids(self, epoch: int) -> np.ndarray:
        """This rank's sample indices of ``epoch``, in reading order."""
        return epoch_order(self.dataset.samples_per_shard, self.data.seed, epoch, self.rank, self.world,
                           self.data.shuffle, self.data.shuffle_block)

    def _pull(self) -> dict[str, Any]:
        """The next sample of this rank's sequence, starting the next epoch when this one is done."""
        while True:
            if self._it is None:
                ids = self.epoch_ids(self.epoch)[self.pos:]
                self._it = iter(DataLoader(EpochSamples(self.dataset, ids, self.epoch), batch_size=1,
                                           shuffle=False, collate_fn=_unwrap, num_workers=self.data.num_workers))
                self._pulled = 0
            try:
                sample = next(self._it)
                self._pulled += 1
                return sample
            except StopIteration:
                # Every sample pulled was consumed (a pending one is taken before pulling again).
                self._it = None
                self._empty_epochs = 0 if self._pulled else self._empty_epochs + 1
                if self._empty_epochs > 1:  # one is normal: resumed exactly at an epoch's end
                    raise RuntimeError(f"stream {self.stream.name!r} ({self.stream.remote}) yields no samples")
                self.epoch, self.pos = self.epoch + 1, 0

    def _on_bad(self, sample: dict[str, Any], in_batch: int) -> None:
        self.samples_seen += 1
        self.samples_bad += 1
        self.last_bad = sample
        where = (f"{sample['name']!r} (stream {self.stream.name}, shard {sample['shard']}, "
                 f"index {sample['index_in_shard']}, sample {sample['idx']})")
        log.warning("skipping undecodable sample %s: %s", where, sample["error"])
        seen = self.samples_seen + in_batch  # good samples of the batch being filled count too
        frac = self.samples_bad / seen
        if frac > self.data.max_bad_fraction and (
                seen >= self.data.bad_check_min_samples or (self.samples_bad == seen >= ALL_BAD_MIN)):
            raise UserError(  # bad data, not a bug of ours: one line, no traceback
                f"stream {self.stream.name!r}: {self.samples_bad} of {seen} samples seen were undecodable "
                f"({frac:.1%} > max_bad_fraction {self.data.max_bad_fraction:.1%}) in {self.stream.remote}; "
                f"last: {where}: {sample['error']}; rewrite the shards (the writers reject such files) or "
                "raise data.max_bad_fraction")

    def state_dict(self) -> dict[str, Any]:
        """This rank's position and counters, as of the last batch yielded."""
        return {"epoch": self.epoch, "pos": self.pos, "rank": self.rank, "world": self.world,
                **{k: getattr(self, k) for k in _COUNTERS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (this rank's own); the next batch is the one that followed it."""
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise ValueError(f"stream {self.stream.name!r}: state of rank {state['rank']} of {state['world']} "
                             f"given to rank {self.rank} of {self.world}")
        self.close()
        self._packer = GreedyPacker(self.stream)
        self._pending, self._empty_epochs = None, 0
        self.epoch, self.pos = state["epoch"], state["pos"]
        for k in _COUNTERS:
            setattr(self, k, state[k])

    def stats(self) -> dict[str, float]:
        """Counters for the trainer's log; ``fill`` is the mean fraction of the token budget used."""
        fill = self.tokens / (self.batches * self.stream.token_budget) if self.batches else 0.0
        return {**{k: getattr(self, k) for k in _COUNTERS}, "fill": fill, "epoch": self.epoch}

    def close(self) -> None:
        """Stop the current epoch's DataLoader workers."""
        self._it = None  # the DataLoader iterator shuts its workers down when dropped

"""The image loader: an endless, exactly resumable iterator of packed micro-batches.

Samples come from ``ImageDataset`` through a torch DataLoader (one sample per item, decoded in
``num_workers`` processes) and are packed greedily in arrival order (``packing.GreedyPacker``);
epochs roll over forever, and a batch may span the end of one epoch and the start of the next.

Resume: the position is the number of samples of the current epoch consumed by the batches yielded
so far (bad samples included, the sample held back for the next batch excluded), handed to
``StreamingDataset.state_dict(num_samples, from_beginning=False)``; streaming adds the offset of the
resume point, if any. All samples of earlier epochs are consumed by then, so the position always lies
in the epoch streaming started last. A fresh loader given that state yields the same batches as an
uninterrupted run: same order (streaming), same sizes (``dataset.py``), same packing (greedy).

NOTE multi-rank (not built): streaming's position is global, ``sample_in_epoch`` samples of ONE
interleaved order shared by all ranks, assuming every rank consumed the same number. With packing,
ranks consume different numbers (and each may hold a sample back). Resuming exactly will need each
rank's consumed count gathered into the checkpoint, resuming streaming at world_size * min(count),
and each rank then discarding its first (count_r - min) samples (cheaply, without decoding).
"""
from __future__ import annotations

import logging
from typing import Any

from torch.utils.data import DataLoader

from ..model.packed import PackedBatch
from .config import DataConfig
from .dataset import ImageDataset, is_bad
from .packing import GreedyPacker, check_budget

log = logging.getLogger(__name__)

# This many undecodable samples and nothing else since the start: the data (a wrong column, a
# broken writer), not a stray file, is at fault; fail before bad_check_min_samples are seen.
ALL_BAD_MIN = 8
_COUNTERS = ("samples_seen", "samples_bad", "tokens", "batches")


def _unwrap(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]  # batch_size=1: no collation, samples differ in length


class PackedImageLoader:
    """Iterate forever: ``for batch in loader`` gives ``PackedBatch``es of <= token_budget tokens.

    Counters for the log (consistent with the batches yielded so far): ``samples_seen`` (good and
    bad samples consumed), ``samples_bad``, ``tokens``, ``batches``.
    """

    def __init__(self, cfg: DataConfig, dataset: ImageDataset | None = None):
        check_budget(cfg.token_budget, cfg.max_res)
        self.cfg = cfg
        self.dataset = dataset if dataset is not None else ImageDataset(cfg)
        self._dataloader = DataLoader(self.dataset, batch_size=1, collate_fn=_unwrap,
                                      num_workers=cfg.num_workers)
        self._packer = GreedyPacker(cfg.token_budget)
        self._it = None  # DataLoader iterator of the current epoch
        self._pending: dict[str, Any] | None = None  # pulled, did not fit, starts the next batch
        self._epoch_consumed = 0  # samples of this epoch (since its resume point) consumed
        self._epoch_pulled = 0  # samples of this epoch pulled from the DataLoader
        self._empty_epochs = 0  # consecutive epochs that gave no sample at all
        self.samples_seen = self.samples_bad = self.tokens = self.batches = 0
        self.last_bad: dict[str, Any] | None = None

    def __iter__(self) -> "PackedImageLoader":
        return self

    def __next__(self) -> PackedBatch:
        packer = self._packer
        while True:
            sample, self._pending = self._pending, None
            if sample is None:
                sample = self._pull()
            if is_bad(sample):
                self._epoch_consumed += 1
                self._on_bad(sample, in_batch=len(packer))
                continue
            if not packer.fits(sample):
                self._pending = sample
                break
            packer.add(sample)
            self._epoch_consumed += 1
        batch = packer.pop_batch()
        self.samples_seen += batch.num_samples
        self.tokens += batch.num_tokens
        self.batches += 1
        return batch

    def _pull(self) -> dict[str, Any]:
        """The next sample, starting the next epoch when this one is done."""
        while True:
            if self._it is None:
                self._it = iter(self._dataloader)  # streaming starts (or resumes) the next epoch here
                self._epoch_consumed = self._epoch_pulled = 0
            try:
                sample = next(self._it)
                self._epoch_pulled += 1
                return sample
            except StopIteration:
                self._it = None
                # One empty epoch is normal (resumed exactly at an epoch's end); two in a row is not.
                self._empty_epochs = 0 if self._epoch_pulled else self._empty_epochs + 1
                if self._empty_epochs > 1:
                    raise RuntimeError(f"the dataset at {self.cfg.remote} yields no samples") from None

    def _on_bad(self, sample: dict[str, Any], in_batch: int) -> None:
        self.samples_seen += 1
        self.samples_bad += 1
        self.last_bad = sample
        where = f"{sample['name']!r} (shard {sample['shard']}, index {sample['index_in_shard']}, sample {sample['idx']})"
        log.warning("skipping undecodable sample %s: %s", where, sample["error"])
        seen = self.samples_seen + in_batch  # good samples of the batch being filled count too
        frac = self.samples_bad / seen
        if frac > self.cfg.max_bad_fraction and (
                seen >= self.cfg.bad_check_min_samples or (self.samples_bad == seen >= ALL_BAD_MIN)):
            raise RuntimeError(
                f"{self.samples_bad} of {seen} samples seen were undecodable ({frac:.1%} > max_bad_fraction "
                f"{self.cfg.max_bad_fraction:.1%}) in {self.cfg.remote}; last: {where}: {sample['error']}")

    def state_dict(self) -> dict[str, Any]:
        """The data position and counters, as of the last batch yielded."""
        return {"dataset": self.dataset.state_dict(self._epoch_consumed, from_beginning=False),
                **{k: getattr(self, k) for k in _COUNTERS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the next batch is the one that followed it. Call before iterating."""
        self.close()
        self._packer = GreedyPacker(self.cfg.token_budget)
        self._pending, self._epoch_consumed, self._epoch_pulled, self._empty_epochs = None, 0, 0, 0
        self.dataset.load_state_dict(state["dataset"])
        # Streaming ignores a resume state older than the epoch it believes comes next; make it
        # current (a no-op on a fresh dataset, whose next epoch is 0).
        self.dataset.next_epoch = max(0, state["dataset"]["epoch"])
        for k in _COUNTERS:
            setattr(self, k, state[k])

    def stats(self) -> dict[str, float]:
        """Counters for the trainer's log; ``fill`` is the mean fraction of the token budget used."""
        fill = self.tokens / (self.batches * self.cfg.token_budget) if self.batches else 0.0
        return {**{k: getattr(self, k) for k in _COUNTERS}, "fill": fill}

    def close(self) -> None:
        """Stop the current epoch's workers (and streaming's download threads when in-process)."""
        self._it = None  # the DataLoader iterator shuts its workers down when dropped
        it = getattr(self.dataset, "_iterator", None)  # in-process streaming epoch (num_workers=0)
        if it is not None:
            it.non_blocking_exit()


def build_image_loader(cfg: DataConfig, replication: int = 1) -> PackedImageLoader:
    """``replication``: consecutive ranks that must see the same samples (the tensor-parallel group)."""
    return PackedImageLoader(cfg, ImageDataset(cfg, replication=replication if replication > 1 else None))

"""One stream's samples: MDS shards read by index (streaming), decoded by the stream's decode function,
in an epoch order each data-parallel rank computes for itself.

Epoch order (``epoch_order``): shards are shuffled (seed, epoch), their samples laid end to end, and
the samples shuffled within consecutive windows of ``shuffle_block``; rank r of D reads the r-th of D
contiguous slices of that sequence. The sequence does not depend on D, each rank's slice touches only
~1/D of the shards (locality for the shard cache), and a rank's position is one number: resume is
exact per rank with nothing exchanged, and at another D the consumed samples can be worked out.

NOTE: why not ``StreamingDataset.__iter__``: it starts every epoch with a barrier across all local
ranks (shared memory + file lock), and under packing ranks reach an epoch's end at different
optimizer steps; the first rank there would wait at the barrier while the others wait for it in the
gradient all-reduce. Its resume position is also one global count that assumes equal consumption.
We use streaming for what it is good at: the index, shard download and cache, and reading samples.

Each sample's random choices come from (seed, epoch, sample index), so a resumed run, or any number
of DataLoader workers, decodes identical tensors. An undecodable sample does not raise: it becomes a
marker (``is_bad``) carrying the error, shard and index, so the main process counts and logs it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch.utils.data
from streaming import StreamingDataset

from .config import DataConfig, StreamConfig
from .samples import decoder_for
from .storage import RetryingStream, resolve_location

__all__ = ["PositionedSamples", "StreamDataset", "epoch_order", "is_bad", "resolve_location"]


def is_bad(sample: dict[str, Any]) -> bool:
    return "error" in sample


def epoch_order(samples_per_shard: np.ndarray, seed: int, epoch: int, rank: int, world: int, shuffle: bool = True,
                block: int = 1 << 16) -> np.ndarray:
    """Global sample indices rank ``rank`` of ``world`` reads in ``epoch``, in order: [~N / world] int64.

    Rank r reads positions [r * N // world, (r + 1) * N // world) of the epoch's sequence (module
    docstring); only the shuffle windows that overlap them are computed.
    """
    counts = np.asarray(samples_per_shard, dtype=np.int64)
    n = int(counts.sum())
    if not 0 <= rank < world or n < world:
        raise ValueError(f"cannot split {n} samples over {world} data-parallel ranks (rank {rank})")
    lo, hi = rank * n // world, (rank + 1) * n // world
    if not shuffle:
        return np.arange(lo, hi, dtype=np.int64)
    shard_order = np.random.default_rng([seed, epoch]).permutation(len(counts))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[shard_order]  # first sample of each, in order
    ends = np.cumsum(counts[shard_order])  # position after each shard in the sequence
    out = []
    for w in range(lo // block, (hi - 1) // block + 1):
        pos = w * block + np.random.default_rng([seed, epoch, w]).permutation(min(block, n - w * block))
        shard = np.searchsorted(ends, pos, side="right")  # which shard (in shuffled order) holds each
        ids = starts[shard] + pos - (ends[shard] - counts[shard_order][shard])
        out.append(ids[max(lo - w * block, 0): hi - w * block])
    return np.concatenate(out)


class StreamDataset(StreamingDataset):
    """The MDS shards of one stream. ``sample(idx, epoch)`` is sample ``idx`` decoded by the stream's
    decode function (``samples.py``) plus ``"idx"``, or a marker for an undecodable one:
      {"error": str, "name": str, "idx": int, "shard": shard file name, "index_in_shard": int}.
    """

    def __init__(self, stream: StreamConfig, data: DataConfig):
        remote, local = resolve_location(stream.remote, stream.local)
        source = RetryingStream(remote=remote, local=local, retry=data.retry, stream_name=stream.name)
        # batch_size only matters to streaming's own iteration, which we do not use (module NOTE).
        super().__init__(streams=[source], shuffle=False, batch_size=1)
        self.stream, self.seed = stream, data.seed
        self.decode = decoder_for(stream.modality)

    def locate(self, idx: int) -> tuple[str, int]:
        """Global sample index -> (shard file name, index within that shard)."""
        shard_id, in_shard = self.spanner[idx]
        raw = getattr(self.shards[shard_id], "raw_data", None)
        return (raw.basename if raw is not None else f"shard {shard_id}"), int(in_shard)

    def sample(self, idx: int, epoch: int) -> dict[str, Any]:
        # Errors reading the shard itself (missing file, failed download) raise: those are
        # infrastructure failures, not a bad sample.
        raw = self.get_item(idx)
        name = str(raw.get("name", idx))
        try:
            out = self.decode(raw, np.random.default_rng([self.seed, epoch, idx]), self.stream)
        except Exception as e:  # noqa: BLE001 - any decode failure marks the sample bad
            shard, in_shard = self.locate(idx)
            return {"error": f"{type(e).__name__}: {e}", "name": name, "idx": idx, "shard": shard,
                    "index_in_shard": in_shard}
        return {**out, "idx": idx}


class PositionedSamples(torch.utils.data.Dataset):
    """Map-style view of a stream for a torch DataLoader: the item at key (epoch, position, sample
    index) is (epoch, position, ``dataset.sample(index, epoch)``), so the reader can track where it is."""

    def __init__(self, dataset: StreamDataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[int, int, dict[str, Any]]:
        epoch, pos, idx = key
        return epoch, pos, self.dataset.sample(idx, epoch)

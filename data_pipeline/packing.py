"""Greedy packing of variable-length samples into micro-batches of at most ``token_budget`` tokens.

Samples are taken in arrival order; one that does not fit closes the batch and starts the next, so
there is no padding and no reordering (which keeps the data position a plain sample count).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..model.config import PATCH_HW, PATCH_T
from ..model.packed import PackedBatch
from .config import StreamConfig

# Sample keys the packed token stream holds; any other key but "idx" travels in ``extras``.
PACKED_KEYS = {"features", "coords", "grid", "frames", "modality", "name", "idx"}


@dataclass
class MicroBatch:
    """One packed micro-batch of one stream, and what the losses need beyond its tokens."""
    stream: StreamConfig  # its task and modality pick the losses
    batch: PackedBatch  # features [N, 3072], coords [N, 4], cu_seqlens [B + 1]
    extras: list[dict[str, Any]]  # per sample: "caption", "views", "cameras", ... when it has them


def worst_case_tokens(stream: StreamConfig) -> int | None:
    """Tokens of the largest sample a stream can produce, where the config bounds it (3D: the number
    of occupied voxels depends on the asset, so None)."""
    side = (stream.max_res // PATCH_HW) ** 2
    if stream.modality == "image":
        return side
    if stream.modality == "video":
        frames = stream.clip_frames[1] if stream.task == "rec" else stream.und_max_frames
        return -(-frames // PATCH_T) * side
    return None


def check_budget(stream: StreamConfig) -> None:
    """Raise unless the largest sample of the stream fits in one micro-batch."""
    worst = worst_case_tokens(stream)
    if worst is not None and worst > stream.token_budget:
        raise ValueError(f"stream {stream.name!r}: token_budget={stream.token_budget} cannot hold its largest "
                         f"sample ({stream.modality} at max_res={stream.max_res}: {worst} tokens of "
                         f"{PATCH_HW}x{PATCH_HW}); raise token_budget or lower max_res")


class GreedyPacker:
    """Holds the samples of the micro-batch being filled (dicts from ``StreamDataset.sample``)."""

    def __init__(self, stream: StreamConfig):
        self.stream, self.budget = stream, stream.token_budget
        self.samples: list[dict[str, Any]] = []
        self.tokens = 0

    def __len__(self) -> int:
        return len(self.samples)

    def fits(self, sample: dict[str, Any]) -> bool:
        return self.tokens + sample["features"].shape[0] <= self.budget

    def add(self, sample: dict[str, Any]) -> None:
        n = sample["features"].shape[0]
        if n > self.budget:  # a sample larger than check_budget allows (3D), or a bad decoder
            raise ValueError(f"stream {self.stream.name!r}: sample {sample['name']!r} has {n} tokens, over the "
                             f"token_budget of {self.budget}")
        if not self.fits(sample):
            raise ValueError("sample does not fit; close the batch first")
        self.samples.append(sample)
        self.tokens += n

    def pop_batch(self) -> MicroBatch:
        """The packed micro-batch of the samples added, in order; the packer is empty again."""
        s = self.samples
        batch = PackedBatch.cat([(x["features"], x["coords"], x["grid"], x["modality"], x["frames"]) for x in s],
                                names=[x["name"] for x in s])
        extras = [{k: v for k, v in x.items() if k not in PACKED_KEYS} for x in s]
        self.samples, self.tokens = [], 0
        return MicroBatch(self.stream, batch, extras)

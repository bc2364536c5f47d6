"""Greedy packing of variable-length samples into micro-batches of at most ``token_budget`` tokens.

Samples are taken in arrival order; one that does not fit closes the batch and starts the next, so
there is no padding and no reordering (which keeps the data position a plain sample count).

A micro-batch is packed in transport form (``model.packed``): uint8 values [N, 768 or 3072] and int16
coords [N, 4] (776 or 3080 bytes a token instead of fp32 features and int64 coords' 12,320), in
pinned memory when ``pin`` (a GPU run), so the copy to the device can be asynchronous.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from atoken.model.config import PATCH_HW, PATCH_T
from atoken.model.packed import PackedBatch

from .config import StreamConfig

# Sample keys the packed token stream holds; any other key but "idx" travels in ``extras``.
PACKED_KEYS = {"values", "coords", "grid", "frames", "modality", "name", "idx"}
COORD_MAX = torch.iinfo(torch.int16).max  # coords travel as int16 (a 2048 px side is 128 patches)


@dataclass
class MicroBatch:
    """One packed micro-batch of one stream, and what the losses need beyond its tokens."""
    stream: StreamConfig  # its task and modality pick the losses
    # Host: transport form (values uint8 [N, V], coords int16 [N, 4]); after ``MixedLoader``: on the
    # device, features float [N, 3072], coords int64 [N, 4]; cu_seqlens [B + 1] int32.
    batch: PackedBatch
    extras: list[dict[str, Any]]  # per sample: "caption", "views", "cameras", ... when it has them
    state: dict[str, Any] = None  # the stream's position and counters once this batch is consumed
    indices: list[int] = None  # each sample's global index in its stream (shard and row: StreamDataset.locate)


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
        return self.tokens + sample["values"].shape[0] <= self.budget

    def add(self, sample: dict[str, Any]) -> None:
        n = sample["values"].shape[0]
        if n > self.budget:  # a sample larger than check_budget allows (3D), or a bad decoder
            raise ValueError(f"stream {self.stream.name!r}: sample {sample['name']!r} has {n} tokens, over the "
                             f"token_budget of {self.budget}")
        if not self.fits(sample):
            raise ValueError("sample does not fit; close the batch first")
        self.samples.append(sample)
        self.tokens += n

    def pop_batch(self, pin: bool = False) -> MicroBatch:
        """The packed micro-batch of the samples added, in order, in transport form (pinned memory
        when ``pin``); the packer is empty again."""
        s = self.samples
        coords = [x["coords"] for x in s]
        if any(int(c.max()) > COORD_MAX for c in coords if len(c)):
            raise ValueError(f"stream {self.stream.name!r}: a coordinate over {COORD_MAX} in {[x['name'] for x in s]}")
        lens = torch.tensor([x["values"].shape[0] for x in s], dtype=torch.int32)
        cu = torch.zeros(len(s) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        batch = PackedBatch(features=_cat([x["values"] for x in s], torch.uint8, pin),
                            coords=_cat(coords, torch.int16, pin), cu_seqlens=cu.pin_memory() if pin else cu,
                            grids=[x["grid"] for x in s], modalities=[x["modality"] for x in s],
                            frames=[x["frames"] for x in s], names=[x["name"] for x in s])
        extras = [{k: v for k, v in x.items() if k not in PACKED_KEYS} for x in s]
        self.samples, self.tokens = [], 0
        return MicroBatch(self.stream, batch, extras, indices=[x["idx"] for x in s])


def _cat(parts: list[torch.Tensor], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """Rows of ``parts`` [n_i, d] stacked into one [sum n_i, d] tensor of ``dtype`` (pinned if asked)."""
    out = torch.empty(sum(len(p) for p in parts), parts[0].shape[1], dtype=dtype, pin_memory=pin)
    return torch.cat([p.to(dtype) for p in parts], out=out)

"""Greedy packing of variable-length samples into micro-batches of at most ``token_budget`` tokens.

Samples are taken in arrival order; one that does not fit closes the batch and starts the next, so
there is no padding and no reordering (which keeps the data position a plain sample count).
"""
from __future__ import annotations

from typing import Any

from ..model.config import PATCH_HW
from ..model.packed import PackedBatch


def check_budget(token_budget: int, max_res: int) -> None:
    """Raise unless one max_res x max_res image (the largest sample) fits in a micro-batch."""
    worst = (max_res // PATCH_HW) ** 2
    if worst > token_budget:
        raise ValueError(f"token_budget={token_budget} cannot hold one {max_res}x{max_res} image "
                         f"({worst} tokens of {PATCH_HW}x{PATCH_HW}); raise token_budget or lower max_res")


class GreedyPacker:
    """Holds the samples of the micro-batch being filled (dicts from ``ImageDataset``)."""

    def __init__(self, token_budget: int):
        self.budget = token_budget
        self.samples: list[dict[str, Any]] = []
        self.tokens = 0

    def __len__(self) -> int:
        return len(self.samples)

    def fits(self, sample: dict[str, Any]) -> bool:
        return self.tokens + sample["features"].shape[0] <= self.budget

    def add(self, sample: dict[str, Any]) -> None:
        n = sample["features"].shape[0]
        if n > self.budget:  # cannot happen after check_budget; guards other sample sources
            raise ValueError(f"sample {sample['name']!r} has {n} tokens, over the budget of {self.budget}")
        if not self.fits(sample):
            raise ValueError("sample does not fit; close the batch first")
        self.samples.append(sample)
        self.tokens += n

    def pop_batch(self) -> PackedBatch:
        """The packed micro-batch: features [N, 3072], coords [N, 4], cu_seqlens [B + 1]."""
        s = self.samples
        batch = PackedBatch.cat([(x["features"], x["coords"], x["grid"], x["modality"], x["frames"]) for x in s],
                                names=[x["name"] for x in s])
        self.samples, self.tokens = [], 0
        return batch

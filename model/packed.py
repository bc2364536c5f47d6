"""The packed sparse batch: samples of different lengths in one token stream, never padded.

A sample is a set of (feature, 4D coordinate) pairs. ``N`` below is the total number of tokens of
all samples; sample ``i`` owns rows ``cu_seqlens[i]:cu_seqlens[i + 1]``.

A training batch is packed on the host in its transport form (``data_pipeline.packing``): uint8
values [N, 768 or 3072] (each token's real frames, ``patches.patchify_values``) and int16 coords,
in pinned memory on a GPU machine; ``to(device)`` builds the float [N, 3072] tokens there.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch

from .config import PATCH_DIM, PATCH_T
from .patches import features_from_values

IMAGE, VIDEO, ASSET3D = "image", "video", "3d"
# Attention runs over chunks of 4 latent frames (16 video frames), as the release does
# (``num_sample_frames_batch_size``): a longer video is cut into independent chunks, each with t
# counted from 0. Images and 3D assets are one chunk.
CHUNK_FRAMES = 4


@dataclass
class AttentionLayout:
    """What attention sees of a batch: its chunks as the segments of a packed stream.

    Every sample's tokens are cut where its (t - t_min) crosses a multiple of ``CHUNK_FRAMES``.
    ``coords`` are the batch's with t made chunk-relative (what RoPE reads); ``table_hw`` is each
    chunk's (max x + 1, max y + 1), the size the learned position table is resized to.
    """
    cu_seqlens: torch.Tensor  # [S + 1] int32, over chunks
    max_seqlen: int
    coords: torch.Tensor  # [N, 4] int64
    table_hw: list[tuple[int, int]]  # per chunk
    chunk_ids: torch.Tensor  # [N] int64: which chunk each token belongs to


@dataclass
class PackedBatch:
    # [N, 3072] float, patch values in (t, h, w, c) order, in [-1, 1]; or, in transport form on the
    # host, uint8 [N, 768 or 3072]: the tokens' real values (module docstring).
    features: torch.Tensor
    # [N, 4] int64 patch-grid coordinates (t, x, y, z): x is the patch row (height axis), y the
    # patch column (width axis), i.e. the released RoPE's (t, h, w, z) order. int16 in transport form.
    coords: torch.Tensor
    cu_seqlens: torch.Tensor  # [B + 1] int32, cumulative token counts, cu_seqlens[0] == 0
    grids: list[tuple[int, int, int, int]]  # per sample (T, H, W, Z) patch-grid shape
    modalities: list[str]  # per sample: IMAGE, VIDEO or ASSET3D
    # Per sample: how many of the PATCH_T frames of the token are real (images: 1, zero-padded to 4).
    frames: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # per sample: source name, for logs and errors
    # Per sample: its attention chunks as (t_min, tokens, table (h, w)) each; derived from coords.
    chunks: list[list[tuple[int, int, tuple[int, int]]]] = field(default_factory=list)

    def __post_init__(self):
        n, b = self.features.shape[0], len(self.grids)
        widths = (PATCH_DIM // PATCH_T, PATCH_DIM) if self.features.dtype == torch.uint8 else (PATCH_DIM,)
        if self.features.ndim != 2 or self.features.shape[1] not in widths:
            raise ValueError(f"features must be [N, {PATCH_DIM}] (or uint8 values [N, {PATCH_DIM // PATCH_T} or "
                             f"{PATCH_DIM}]), got {self.features.dtype} {tuple(self.features.shape)}")
        if self.coords.shape != (n, 4):
            raise ValueError(f"coords must be [{n}, 4], got {tuple(self.coords.shape)}")
        # The lengths on the host, read once here (batches are built on the CPU) and carried by
        # ``to()``: the forward pass then needs no device -> host copy (a sync) for max_seqlen.
        cu = self.cu_seqlens.tolist()
        if len(cu) != b + 1 or cu[0] != 0 or cu[-1] != n:
            raise ValueError(f"cu_seqlens {cu} does not cover {n} tokens of {b} samples")
        self._lengths = [e - s for s, e in itertools.pairwise(cu)]
        if len(self.modalities) != b:
            raise ValueError(f"{len(self.modalities)} modalities for {b} samples")
        if not self.frames:
            self.frames = [1 if m == IMAGE else 4 for m in self.modalities]
        if not self.chunks:  # read on the host once, like the lengths (carried by ``to`` and ``select``)
            self.chunks = _chunks(self.coords.cpu().long(), self._lengths, self.names)

    @property
    def num_samples(self) -> int:
        return len(self.grids)

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    @property
    def seqlens(self) -> list[int]:
        return list(self._lengths)

    def spans(self) -> list[tuple[int, int]]:
        """Per sample, its (start, end) rows in the token stream."""
        ends = list(itertools.accumulate(self._lengths))
        return list(zip([0, *ends[:-1]], ends, strict=True))

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens)

    def sample_ids(self) -> torch.Tensor:
        """[N] int64: which sample each token belongs to."""
        lens = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        # output_size from the host lengths: without it repeat_interleave syncs to size its output.
        return torch.repeat_interleave(torch.arange(self.num_samples, device=lens.device), lens.long(),
                                       output_size=self.num_tokens)

    def attention_layout(self) -> AttentionLayout:
        """The chunked view attention, RoPE and the position tables read (see ``AttentionLayout``).
        Built from host-side lists: no device -> host sync."""
        flat = [c for sample in self.chunks for c in sample]
        lens = [n for _, n, _ in flat]
        cu = torch.zeros(len(flat) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
        device = self.coords.device
        chunk_ids = torch.repeat_interleave(torch.arange(len(flat)), torch.tensor(lens), output_size=self.num_tokens)
        t0 = torch.tensor([t for t, _, _ in flat])[chunk_ids].to(device, non_blocking=True)  # [N]
        coords = self.coords.clone()
        coords[:, 0] -= t0
        return AttentionLayout(cu.to(device, non_blocking=True), max(lens), coords, [hw for _, _, hw in flat],
                               chunk_ids.to(device, non_blocking=True))

    def to(self, device, dtype: torch.dtype | None = None) -> PackedBatch:
        """The same batch on ``device``; no validation again, so no device -> host sync. A batch in
        transport form gets its float [N, 3072] features (``dtype``, default float32) and int64
        coords built on ``device``; copies from pinned memory are asynchronous (non_blocking)."""
        def move(x: torch.Tensor) -> torch.Tensor:
            return x.to(device, non_blocking=x.is_pinned())

        out = copy.copy(self)
        if self.features.dtype == torch.uint8:
            out.features = features_from_values(move(self.features), dtype or torch.float32)
        else:
            out.features = self.features.to(device=device, dtype=dtype or self.features.dtype)
        out.coords = move(self.coords).long()
        out.cu_seqlens = move(self.cu_seqlens)
        return out

    def select(self, samples: list[int]) -> tuple[PackedBatch, torch.Tensor]:
        """The sub-batch of the given samples (in that order) and its rows in this batch: [n] int64."""
        spans = self.spans()
        rows = torch.cat([torch.arange(*spans[i]) for i in samples]) if samples else torch.zeros(0, dtype=torch.long)
        rows = rows.to(self.features.device)
        lens = torch.tensor([spans[i][1] - spans[i][0] for i in samples], dtype=torch.int32)
        cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        pick = lambda xs: [xs[i] for i in samples] if xs else []  # noqa: E731 - a one-line local helper
        return PackedBatch(features=self.features[rows], coords=self.coords[rows],
                           cu_seqlens=cu.to(self.cu_seqlens.device), grids=pick(self.grids),
                           modalities=pick(self.modalities), frames=pick(self.frames), names=pick(self.names),
                           chunks=pick(self.chunks)), rows

    @staticmethod
    def cat(parts: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int], str, int]],
            names: list[str] | None = None) -> PackedBatch:
        """Pack samples given as (features [n_i, 3072], coords [n_i, 4], grid, modality, frames)."""
        lens = torch.tensor([p[0].shape[0] for p in parts], dtype=torch.int32)
        cu = torch.zeros(len(parts) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        return PackedBatch(
            features=torch.cat([p[0] for p in parts]),
            coords=torch.cat([p[1] for p in parts]),
            cu_seqlens=cu,
            grids=[p[2] for p in parts],
            modalities=[p[3] for p in parts],
            frames=[p[4] for p in parts],
            names=list(names or []),
        )


def _chunks(coords: torch.Tensor, lengths: list[int], names: list[str]) -> list[list[tuple[int, int, tuple[int, int]]]]:
    """Per sample, its attention chunks (first t, tokens, table (h, w)) from host coords [N, 4].

    A sample's tokens must come in non-decreasing t (patchify's order), so that each chunk is a
    contiguous run of rows. NOTE: t counts from the sample's own first t (the release counts from
    the whole batch's; the same for every batch it builds, where samples start at one t).
    """
    out, start = [], 0
    for i, n in enumerate(lengths):
        c = coords[start:start + n]
        start += n
        if n == 0:
            out.append([])
            continue
        t = c[:, 0]
        if bool((t[1:] < t[:-1]).any()):
            raise ValueError(f"sample {names[i] if i < len(names) else i}: tokens must be in non-decreasing t")
        t_min = int(t[0])
        cid = (t - t_min) // CHUNK_FRAMES
        counts = torch.bincount(cid).tolist()
        chunks, row = [], 0
        for k, m in enumerate(counts):
            if m == 0:  # a gap in time: no tokens in this chunk
                continue
            part = c[row:row + m]
            row += m
            hw = (int(part[:, 1].max()) + 1, int(part[:, 2].max()) + 1)
            chunks.append((t_min + k * CHUNK_FRAMES, m, hw))
        out.append(chunks)
    return out

"""Decoding a video chunk by chunk with the release's key/value cache (inference only).

Without a cache every chunk of 4 latent frames is decoded alone, as in training. With one
(``kv_cache_size`` in the release, ``cache_frames`` here), each decoder block of chunk j also
attends to the keys and values of the last ``frames`` latent frames of what chunk j - 1 attended
to, stored after QK-norm and before RoPE:

    chunk 0:  queries t = 0 .. s-1                    keys t = 0 .. s-1
    chunk j:  queries t = f .. f+s-1 (shifted by f)   keys t = 0 .. f-1 (cached), f .. f+s-1

where s is the chunk's latent frames and f = ``frames``. After each chunk the keys' last f
timesteps (t >= t_max - f + 1) are kept, their t moved down by t_max - f + 1, and RoPE is applied
to cached and new keys at those positions. One sample (one video) at a time.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .packed import AttentionLayout
from .rope import apply_rope

Angles = tuple[torch.Tensor, torch.Tensor]


class KVCache:
    def __init__(self, frames: int):
        if frames < 0:
            raise ValueError(f"cache frames must be >= 0, got {frames}")
        self.frames = frames  # latent frames kept
        self.blocks: list[BlockCache] = []
        self.past_coords: torch.Tensor | None = None  # [M, 4] coords of the cached keys
        self.key_layout: AttentionLayout | None = None  # this chunk's keys: cached, then new
        self.key_angles: Angles | None = None
        self._keep: torch.Tensor | None = None  # [M + N] bool: keys kept for the next chunk
        self._next_coords: torch.Tensor | None = None

    def begin(self, layout: AttentionLayout) -> AttentionLayout:
        """Before a chunk: ``layout`` is its one segment with t from 0; returns the queries' layout
        (t shifted past the cached frames) and sets the keys' (``key_layout``)."""
        if layout.cu_seqlens.numel() != 2:
            raise ValueError("the KV cache decodes one chunk of one video at a time")
        coords = layout.coords.clone()
        if self.past_coords is not None:
            coords[:, 0] += self.frames
        query = dataclasses.replace(layout, coords=coords)
        keys = coords if self.past_coords is None else torch.cat([self.past_coords, coords])
        self.key_layout = dataclasses.replace(layout, coords=keys)
        first = int(keys[:, 0].max()) - self.frames + 1  # the first timestep kept
        self._keep = keys[:, 0] >= first
        self._next_coords = keys[self._keep].clone()
        self._next_coords[:, 0] -= first
        return query

    def block(self, index: int) -> BlockCache:
        while len(self.blocks) <= index:
            self.blocks.append(BlockCache(self))
        return self.blocks[index]

    def end(self) -> None:
        """After a chunk: what it kept becomes the cache of the next."""
        for b in self.blocks:
            b.k, b.v = (b.next_k, b.next_v) if self.frames else (None, None)
        self.past_coords = self._next_coords if self.frames else None


class BlockCache:
    """One decoder block's cached keys and values [M, heads, D] (after QK-norm, before RoPE)."""

    def __init__(self, parent: KVCache):
        self.parent = parent
        self.k = self.v = self.next_k = self.next_v = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: Angles) -> torch.Tensor:
        """q, k, v [N, heads, D] of this chunk (QK-normed, no RoPE yet) -> attention output [N, heads, D]."""
        if self.k is not None:
            k, v = torch.cat([self.k, k]), torch.cat([self.v, v])
        keep = self.parent._keep
        self.next_k, self.next_v = k[keep], v[keep]
        q = apply_rope(q, *angles).to(v.dtype)
        k = apply_rope(k, *self.parent.key_angles).to(v.dtype)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
        return out.transpose(0, 1)  # [N, heads, D]

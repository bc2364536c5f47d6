"""Finite scalar quantization (FSQ, Mentzer et al. 2023) of the posterior mean: AToken's discrete tokens.

The C latent channels are cut into G = C / D groups of D dims; each dim is squashed by tanh and
rounded to one of L levels, so a group is one of L**D codes and a token is G ids. AToken uses
C = 48, D = 6, L = 4: 4096 codes per group, 8 ids per token.

Matches ``vector_quantize_pytorch.FSQ(levels=[L] * D)`` (without its optional projections, noise
or symmetry-preserving variants; tested): for even L the levels are asymmetric,
{-L/2, ..., L/2 - 1} / (L/2), e.g. {-1, -0.5, 0, 0.5} for L = 4, and the first dim of a group
is the least significant digit of its id. Rounding passes the gradient straight through.
"""
from __future__ import annotations

import torch
import torch.nn as nn

EPS = 1e-3  # keeps the tanh bound just inside the outermost levels (as the FSQ paper's code)


class FSQ(nn.Module):
    """No parameters and no buffers: nothing in checkpoints, and ``.to(bf16)`` cannot touch the constants."""

    def __init__(self, channels: int, levels: int = 4, group_dims: int = 6):
        super().__init__()
        if channels % group_dims:
            raise ValueError(f"FSQ: {channels} channels do not split into groups of {group_dims}")
        self.channels, self.levels, self.group_dims = channels, levels, group_dims
        self.groups = channels // group_dims
        self.codebook_size = levels ** group_dims
        # NOTE: computed as the reference implementation does (int32 tensor ops in fp32) and kept as the
        # exact fp32 values, so inputs at a rounding boundary land on the same side as there.
        # (On the CPU always: the model may be built on the meta device.)
        lv = torch.tensor(levels, dtype=torch.int32, device="cpu")
        half_l = (lv - 1) * (1 + EPS) / 2
        offset = torch.tensor(0.5 if levels % 2 == 0 else 0.0, device="cpu")
        self.half_l, self.offset = half_l.item(), offset.item()
        self.shift = torch.atanh(offset / half_l).item()

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, C] -> (xq [N, C] in x.dtype with values in [-1, 1), ids [N, G] int64 in [0, L**D)).

        Computed in fp32 whatever autocast says; the gradient of xq w.r.t. x is that of the
        unrounded tanh bound (straight-through rounding).
        """
        if x.shape[-1] != self.channels:
            raise ValueError(f"FSQ expects [..., {self.channels}] inputs, got {tuple(x.shape)}")
        with torch.autocast(x.device.type, enabled=False):
            z = x.float().unflatten(-1, (self.groups, self.group_dims))  # [N, G, D]
            bounded = torch.tanh(z + self.shift) * self.half_l - self.offset
            rounded = bounded + (bounded.round() - bounded).detach()  # straight-through round
            half_width = self.levels // 2
            digits = (rounded.detach() + half_width).long()  # [N, G, D] in [0, L)
            ids = (digits * self.basis(x.device)).sum(-1)  # [N, G]
            xq = (rounded / half_width).flatten(-2)
        return xq.to(x.dtype), ids

    def dequantize(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, G] int64 -> xq [N, C] fp32, the values ``quantize`` returned for them."""
        if ids.shape[-1] != self.groups:
            raise ValueError(f"FSQ expects [..., {self.groups}] ids, got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"FSQ ids must lie in [0, {self.codebook_size}), got [{int(ids.min())}, {int(ids.max())}]")
        digits = (ids[..., None] // self.basis(ids.device)) % self.levels  # [N, G, D]
        half_width = self.levels // 2
        return ((digits - half_width).float() / half_width).flatten(-2)

    def basis(self, device) -> torch.Tensor:
        """[D] int64 digit weights of an id: L**0, L**1, ... (first dim least significant)."""
        return self.levels ** torch.arange(self.group_dims, dtype=torch.int64, device=device)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, groups={self.groups}, levels={self.levels}, "
                f"codebook_size={self.codebook_size}")

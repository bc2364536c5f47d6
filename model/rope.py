"""4D rotary position embedding over (t, x, y, z) patch coordinates, as in the released AToken code.

The head dim D is split equally over the 4 axes: D/8 complex frequencies (rotation pairs) per axis.
NOTE: the frequencies are ``theta ** (-i / D)`` for i = 0..D/8-1, divided by the FULL head dim, not
by the axis' share as in textbook RoPE; the released weights were trained with this, so we keep it.
Pairs are adjacent (even, odd) head-dim entries, rotated like a complex multiplication.
"""
from __future__ import annotations

import torch

AXES = 4  # (t, x, y, z)


def rope_frequencies(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """[D/8] fp32 angular frequencies of one axis."""
    if head_dim % (2 * AXES):
        raise ValueError(f"head_dim {head_dim} must be a multiple of {2 * AXES} for 4D RoPE")
    i = torch.arange(head_dim // (2 * AXES), dtype=torch.float32, device=device)
    return theta ** (-i / head_dim)


def rope_angles(coords: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """coords [N, 4] integer (t, x, y, z) -> (cos, sin), each [N, D/2] fp32.

    Computed once per forward and shared by every layer. Pair j of the head dim belongs to axis
    j // (D/8) (axis order t, x, y, z) and frequency j % (D/8).
    """
    freqs = rope_frequencies(head_dim, theta, coords.device)  # [D/8]
    angles = coords.to(torch.float32)[:, :, None] * freqs  # [N, 4, D/8]
    angles = angles.flatten(1)  # [N, D/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D] rotated by per-token angles cos/sin [N, D/2]; math in fp32, returns x.dtype."""
    xf = x.float().unflatten(-1, (-1, 2))  # [N, heads, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]  # [N, 1, D/2]
    # (x0 + i x1) * (c + i s)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)

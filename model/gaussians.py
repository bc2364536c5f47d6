"""The 3D output side: a Gaussian-splat decoder over the latents of an asset's occupied voxels.

    z [M, C] (one row per occupied voxel of a packed batch of 3D samples, coords (0, i, j, k))
      -> Linear up -> windowed transformer (4D RoPE from the voxel coords) -> RMSNorm
      -> head: per voxel K = 32 Gaussians x 14 raw values -> bounded activations -> ``Gaussians``

Geometry (the shared 3D convention): the asset fills the cube [-0.5, 0.5]^3; voxel (i, j, k) of the
64^3 grid has its centre at ((i, j, k) + 0.5) / 64 - 0.5. All lengths below in "voxels" are in
units of one voxel side (1 / resolution).

Windowed attention: a token attends only to tokens of its own sample inside the same window of
``window``^3 voxels. The tokens are sorted into windows and each window becomes one sequence of the
varlen attention (its own ``cu_seqlens``), so nothing is padded. With ``shift_windows`` every odd
block uses windows shifted by ``window // 2`` (as Swin / TRELLIS do), so information crosses window
borders; without it, windows never exchange anything.

Activations (why each is bounded): the 32 Gaussians of a voxel start spread over the voxel on a
Hammersley pattern (a fixed, non-learned pre-activation offset, as in TRELLIS), so they do not all
receive the same gradient.
  position  centre + max_offset * tanh(raw + slot_offset) voxels     (never leaves the neighbourhood)
  scale     exp(lerp(log s_min, log s_max, sigmoid(raw + b))) voxels (std-dev per axis, bounded)
  rotation  normalise(raw + (1, 0, 0, 0))                            (unit wxyz quaternion)
  opacity   sigmoid(raw + logit(init_opacity))
  colour    sigmoid(raw): RGB in [0, 1], not SH (``model.ply`` converts to SH DC when saving)
The constants make a zero raw output the configured initial Gaussian (init_scale, init_opacity,
grey, identity rotation), and the head starts with small weights, so the first render is a soft,
grey, semi-transparent version of the occupied voxels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import GaussianDecoderConfig, TransformerConfig, gaussian_decoder_preset  # noqa: F401
from .rope import rope_angles
from .transformer import Angles, Block, init_weights, make_norm

# Raw values per Gaussian: position offset 3, scale 3, rotation 4, opacity 1, RGB 3.
GAUSSIAN_CHANNELS = 14
_SPLIT = (3, 3, 4, 1, 3)


@dataclass
class Gaussians:
    """3D Gaussians of one or more samples, flat; sample i owns rows ``cu_seqlens[i]:cu_seqlens[i+1]``."""
    means: torch.Tensor  # [G, 3] world positions
    scales: torch.Tensor  # [G, 3] std-devs along the rotated axes, world units (> 0)
    quats: torch.Tensor  # [G, 4] unit quaternions (w, x, y, z), rotation of the local axes
    opacities: torch.Tensor  # [G] in (0, 1)
    colors: torch.Tensor  # [G, 3] RGB, in [0, 1] from the decoder
    cu_seqlens: torch.Tensor = field(default=None)  # [B + 1] int32; default: one sample

    def __post_init__(self):
        g = self.means.shape[0]
        if self.cu_seqlens is None:
            self.cu_seqlens = torch.tensor([0, g], dtype=torch.int32, device=self.means.device)
        shapes = {"means": (g, 3), "scales": (g, 3), "quats": (g, 4), "opacities": (g,), "colors": (g, 3)}
        for name, shape in shapes.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"Gaussians.{name} must be {list(shape)}, got {list(getattr(self, name).shape)}")
        if self.cu_seqlens.ndim != 1 or int(self.cu_seqlens[0]) != 0 or int(self.cu_seqlens[-1]) != g:
            raise ValueError(f"cu_seqlens {self.cu_seqlens.tolist()} does not cover {g} Gaussians")

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def sample_ids(self) -> torch.Tensor:
        """[G] int64: which sample each Gaussian belongs to."""
        lens = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.num_samples, device=lens.device), lens)

    def sample(self, i: int) -> "Gaussians":
        """The Gaussians of sample ``i`` alone (views of the rows, gradients flow)."""
        s, e = int(self.cu_seqlens[i]), int(self.cu_seqlens[i + 1])
        return Gaussians(self.means[s:e], self.scales[s:e], self.quats[s:e], self.opacities[s:e],
                         self.colors[s:e])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Gaussians":
        f = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return replace(self, means=f(self.means), scales=f(self.scales), quats=f(self.quats),
                       opacities=f(self.opacities), colors=f(self.colors),
                       cu_seqlens=self.cu_seqlens.to(device))

    def detach(self) -> "Gaussians":
        return replace(self, means=self.means.detach(), scales=self.scales.detach(), quats=self.quats.detach(),
                       opacities=self.opacities.detach(), colors=self.colors.detach())


@dataclass
class WindowPartition:
    """Tokens sorted into attention windows: ``x[order]`` lists window after window."""
    order: torch.Tensor  # [M] int64
    inverse: torch.Tensor  # [M] int64, x == x[order][inverse]
    cu_seqlens: torch.Tensor  # [num_windows + 1] int32
    max_seqlen: int


def window_partition(coords: torch.Tensor, cu_seqlens: torch.Tensor, window: int, shift: int = 0) -> WindowPartition:
    """coords [M, 4] (0, i, j, k), cu_seqlens [B + 1] -> windows of ``window``^3 voxels shifted by
    ``shift`` (window (a, b, c) holds voxels with floor((i + shift) / window) == a, ...), never
    crossing samples. Windows are ordered by (sample, a, b, c); tokens keep their order inside."""
    m = coords.shape[0]
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(coords.device)
    sample = torch.repeat_interleave(torch.arange(lens.shape[0], device=coords.device), lens)  # [M]
    cell = torch.div(coords[:, 1:].long() + shift, window, rounding_mode="floor")  # [M, 3]
    n = int(cell.max()) + 1 if m else 1
    key = ((sample * n + cell[:, 0]) * n + cell[:, 1]) * n + cell[:, 2]  # [M] int64
    key, order = torch.sort(key, stable=True)
    counts = torch.unique_consecutive(key, return_counts=True)[1]
    cu = torch.zeros(counts.shape[0] + 1, dtype=torch.int32, device=coords.device)
    cu[1:] = torch.cumsum(counts, 0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(m, device=order.device)
    return WindowPartition(order, inverse, cu, int(counts.max()) if m else 0)


def slot_offsets(k: int) -> torch.Tensor:
    """[k, 3] positions of a voxel's k Gaussians inside it, in voxels, in (-0.5, 0.5): a 3D Hammersley
    set ((n + 0.5) / k, base-2 and base-3 radical inverses of n), shrunk to keep off the faces."""
    def radical_inverse(n: int, base: int) -> float:
        out, f = 0.0, 1.0 / base
        while n:
            n, digit = divmod(n, base)
            out += digit * f
            f /= base
        return out
    pts = torch.tensor([[(n + 0.5) / k, radical_inverse(n, 2), radical_inverse(n, 3)] for n in range(k)],
                       dtype=torch.float64)
    return (pts * (1 - 1 / k) + 0.5 / k - 0.5).float()


class GaussianDecoder(nn.Module):
    """Latents of occupied voxels -> ``gaussians_per_voxel`` Gaussians per voxel.

    Tensor parallelism is applied to its blocks from outside (training/parallelize.py); sequence
    parallelism is not supported here (each block re-sorts the tokens into its windows).
    ``checkpoint=True`` recomputes each block in backward.
    """

    def __init__(self, cfg: GaussianDecoderConfig, latent_channels: int, checkpoint: bool = False):
        super().__init__()
        self.cfg = cfg
        tc, k = cfg.transformer, cfg.gaussians_per_voxel
        self.checkpoint = checkpoint
        self.up = nn.Linear(latent_channels, tc.width, bias=tc.bias)
        self.blocks = nn.ModuleList(Block(tc) for _ in range(tc.depth))
        self.norm = make_norm(tc.norm, tc.width, tc.norm_eps)
        self.head = nn.Linear(tc.width, k * GAUSSIAN_CHANNELS)
        # Fixed pre-activation constants (recomputed from the config, so not saved).
        self.register_buffer("slot_bias", torch.atanh(slot_offsets(k) / cfg.max_offset), persistent=False)
        lo, hi = (math.log(s) for s in cfg.scale_range)
        self.log_scale_range = (lo, hi)
        frac = (math.log(cfg.init_scale) - lo) / (hi - lo)
        self.scale_bias = math.log(frac / (1 - frac))  # sigmoid(scale_bias) == frac
        self.opacity_bias = math.log(cfg.init_opacity / (1 - cfg.init_opacity))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Trunk linears as ``AToken.reset_parameters``; the head small (see ``head_init_std``).
        NOTE: a parent that re-initialises every nn.Linear must call this again afterwards."""
        init_weights(self, std)
        s = self.cfg.head_init_std
        nn.init.trunc_normal_(self.head.weight, std=s, a=-2 * s, b=2 * s)
        nn.init.zeros_(self.head.bias)

    def partitions(self, coords: torch.Tensor, cu_seqlens: torch.Tensor) -> list[WindowPartition | None]:
        """The window partition of each block (None: whole samples, no re-sorting)."""
        w = self.cfg.window
        if w == 0:
            return [None] * len(self.blocks)
        plain = window_partition(coords, cu_seqlens, w)
        shifted = window_partition(coords, cu_seqlens, w, w // 2) if self.cfg.shift_windows and w > 1 else plain
        return [plain if i % 2 == 0 else shifted for i in range(len(self.blocks))]

    def forward(self, z: torch.Tensor, coords: torch.Tensor, cu_seqlens: torch.Tensor) -> Gaussians:
        """z [M, C] latents of the occupied voxels; coords [M, 4] (0, i, j, k); cu_seqlens [B + 1] voxel
        offsets per sample -> Gaussians with [M * K, ...] rows, voxel-major (voxel m owns rows
        m*K:(m+1)*K) and ``cu_seqlens`` = K * the voxel offsets."""
        self._check(z, coords, cu_seqlens)
        m, k = z.shape[0], self.cfg.gaussians_per_voxel
        cos, sin = rope_angles(coords, self.cfg.transformer.head_dim, self.cfg.rope_theta)  # [M, D/2] each
        x = self.up(z)  # [M, width]
        for block, part in zip(self.blocks, self.partitions(coords, cu_seqlens)):
            if part is None:  # window 0: whole samples, already in order
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if m else 0
                x = self._block(block, x, cu_seqlens, max_seqlen, (cos, sin))
            else:
                angles = (cos[part.order], sin[part.order])
                x = self._block(block, x[part.order], part.cu_seqlens, part.max_seqlen, angles)[part.inverse]
        raw = self.head(self.norm(x)).view(m, k, GAUSSIAN_CHANNELS).float()  # [M, K, 14]
        return self.activate(raw, coords, cu_seqlens)

    def _block(self, block: Block, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               angles: Angles) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint(block, x, cu_seqlens, max_seqlen, angles, use_reentrant=False)
        return block(x, cu_seqlens, max_seqlen, angles)

    def activate(self, raw: torch.Tensor, coords: torch.Tensor, cu_seqlens: torch.Tensor) -> Gaussians:
        """raw [M, K, 14] fp32 -> bounded Gaussian parameters (see the module docstring)."""
        cfg, (m, k, _) = self.cfg, raw.shape
        voxel = 1.0 / cfg.resolution
        offset, scale, rot, opacity, rgb = raw.split(_SPLIT, dim=-1)
        centre = (coords[:, 1:].to(raw.dtype) + 0.5) * voxel - 0.5  # [M, 3]
        means = centre[:, None, :] + cfg.max_offset * voxel * torch.tanh(offset + self.slot_bias)  # [M, K, 3]
        lo, hi = self.log_scale_range
        scales = voxel * torch.exp(lo + (hi - lo) * torch.sigmoid(scale + self.scale_bias))
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=raw.dtype, device=raw.device)
        quats = F.normalize(rot + identity, dim=-1, eps=1e-8)
        return Gaussians(means=means.reshape(m * k, 3), scales=scales.reshape(m * k, 3),
                         quats=quats.reshape(m * k, 4),
                         opacities=torch.sigmoid(opacity + self.opacity_bias).reshape(m * k),
                         colors=torch.sigmoid(rgb).reshape(m * k, 3),
                         cu_seqlens=(cu_seqlens.to(torch.int64) * k).to(torch.int32))

    def _check(self, z: torch.Tensor, coords: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
        m = z.shape[0]
        if z.ndim != 2 or z.shape[1] != self.up.in_features:
            raise ValueError(f"z must be [M, {self.up.in_features}], got {list(z.shape)}")
        if coords.shape != (m, 4):
            raise ValueError(f"coords must be [{m}, 4], got {list(coords.shape)}")
        if cu_seqlens.ndim != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != m:
            raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} does not cover {m} voxels")
        if m and (bool((coords[:, 0] != 0).any()) or int(coords[:, 1:].min()) < 0
                  or int(coords[:, 1:].max()) >= self.cfg.resolution):
            raise ValueError(f"3D coords must be (0, i, j, k) with 0 <= i, j, k < {self.cfg.resolution}; got "
                             f"t in [{int(coords[:, 0].min())}, {int(coords[:, 0].max())}], ijk in "
                             f"[{int(coords[:, 1:].min())}, {int(coords[:, 1:].max())}]")

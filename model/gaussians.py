"""The 3D output side: the released AToken Gaussian decoder (``SLatGaussianDecoder`` of
``apple/ml-atoken``, ``configs/3d_decode_gs.yaml``) and TRELLIS' ``Gaussian`` activations.

    pixels [M, 3072] (the pixel decoder's output at an asset's occupied voxels, coords (0, x, y, z))
      -> first 768 values -> Linear 768 -> width (no bias) + sinusoidal position of (x, y, z)
      -> blocks (RMSNorm, no biases, no QK-norm, no RoPE), attention inside Swin windows of 8^3
         voxels shifted by 4 on odd blocks, logits soft-capped at 30
      -> LayerNorm without affine (eps 1e-5) -> Linear width -> 448 (bias)
      -> per voxel [xyz 32x3 | features_dc 32x3 | scaling 32x3 | rotation 32x4 | opacity 32]
      -> activations -> ``Gaussians``, 32 per voxel

Geometry (the shared 3D convention): the asset fills [-0.5, 0.5]^3; voxel (x, y, z) of the 64^3
grid has its centre at ((x, y, z) + 0.5) / 64 - 0.5. Activations (TRELLIS' ``Gaussian`` with the
yaml's ``representation_config``; r = raw output * lr of its attribute):
  position  centre + tanh(r + offset_perturbation) / 64 * 0.5 * voxel_size
  scale     sqrt(softplus(r + inverse_softplus(scaling_bias))^2 + filter_3d^2)
  rotation  normalise(r + (1, 0, 0, 0))                       (wxyz)
  opacity   sigmoid(r + logit(opacity_bias))
  colour    the SH DC coefficient r; RGB = C0 * r + 0.5 (the rasterizer's degree-0 colour)
``offset_perturbation`` [32, 3] spreads a voxel's Gaussians on a Hammersley set; it is a buffer in
the release's state dict, so it is one here too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GAUSSIAN_ATTRIBUTES, GaussianDecoderConfig, TransformerConfig, gaussian_decoder_preset  # noqa: F401 - re-exported
from .transformer import Attention, Block, init_weights

try:
    from flash_attn import flash_attn_varlen_func
except Exception:  # noqa: BLE001 - ImportError, or a build that does not match the installed torch/CUDA
    flash_attn_varlen_func = None

SH_C0 = 0.28209479177387814  # the degree-0 real spherical harmonic, 1 / (2 sqrt(pi))


@dataclass
class Gaussians:
    """3D Gaussians of one or more samples, flat; sample i owns rows ``cu_seqlens[i]:cu_seqlens[i+1]``."""
    means: torch.Tensor  # [G, 3] world positions
    scales: torch.Tensor  # [G, 3] std-devs along the rotated axes, world units (> 0)
    quats: torch.Tensor  # [G, 4] unit quaternions (w, x, y, z), rotation of the local axes
    opacities: torch.Tensor  # [G] in (0, 1)
    # [G, 3] RGB = C0 * SH DC + 0.5, not clamped (renderers clamp at 0, as the 3DGS rasterizer does)
    colors: torch.Tensor
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

    def sample(self, i: int) -> Gaussians:
        """The Gaussians of sample ``i`` alone (views of the rows, gradients flow)."""
        s, e = int(self.cu_seqlens[i]), int(self.cu_seqlens[i + 1])
        return Gaussians(self.means[s:e], self.scales[s:e], self.quats[s:e], self.opacities[s:e],
                         self.colors[s:e])

    def to(self, device=None, dtype: torch.dtype | None = None) -> Gaussians:
        f = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731 - a one-line local helper
        return replace(self, means=f(self.means), scales=f(self.scales), quats=f(self.quats),
                       opacities=f(self.opacities), colors=f(self.colors),
                       cu_seqlens=self.cu_seqlens.to(device))

    def detach(self) -> Gaussians:
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


def hammersley(k: int) -> torch.Tensor:
    """[k, 3] float32 in [0, 1): the 3D Hammersley set (n / k, base-2 and base-3 radical inverses of n)."""
    def radical_inverse(base: int, n: int) -> float:
        val, f = 0.0, 1.0 / base
        while n > 0:
            n, digit = divmod(n, base)
            val += digit * f
            f /= base
        return val
    return torch.tensor([[n / k, radical_inverse(2, n), radical_inverse(3, n)] for n in range(k)])


def sinusoidal_positions(xyz: torch.Tensor, width: int) -> torch.Tensor:
    """xyz [M, 3] -> [M, width] fp32: per axis [sin(p f) | cos(p f)], f_i = 10000^(-i / F), F =
    width // 6 frequencies, axes concatenated, zero-padded to ``width`` (the release's
    ``AbsolutePositionEmbedder``)."""
    f = width // 3 // 2
    freqs = 1.0 / (10000 ** (torch.arange(f, dtype=torch.float32, device=xyz.device) / f))
    out = torch.outer(xyz.reshape(-1).float(), freqs)  # [3M, F]
    emb = torch.cat([torch.sin(out), torch.cos(out)], dim=-1).reshape(xyz.shape[0], -1)  # [M, 6F]
    return F.pad(emb, (0, width - emb.shape[1]))


def softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, cap: float, budget: int = 1 << 24) -> torch.Tensor:
    """q, k, v [N, heads, D], sequences ``cu_seqlens`` -> [N, heads, D]: per sequence
    softmax(cap * tanh(q k^T / (sqrt(D) cap))) v, flash-attn's ``softcap`` (0: no cap).

    flash-attn on CUDA fp16/bf16; otherwise the sequences padded to ``max_seqlen`` and batched, in
    chunks of at most ``budget`` score elements (windows hold at most window^3 tokens)."""
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softcap=cap)
    n, h, d = q.shape
    lens = (cu[1:] - cu[:-1]).long()
    pos = torch.arange(max_seqlen, device=q.device)
    valid = pos[None] < lens[:, None]  # [S, L]
    index = (cu[:-1, None].long() + pos[None]).clamp(max=max(n - 1, 0))  # [S, L]
    step = max(1, budget // max(1, h * max_seqlen * max_seqlen))
    outs = []
    for s in range(0, lens.shape[0], step):
        i, ok = index[s:s + step], valid[s:s + step]
        scores = torch.einsum("slhd,smhd->shlm", q[i].float(), k[i].float()) / math.sqrt(d)  # [S', h, L, L]
        if cap:
            scores = cap * torch.tanh(scores / cap)
        probs = scores.masked_fill(~ok[:, None, None, :], float("-inf")).softmax(-1)
        out = torch.einsum("shlm,smhd->slhd", probs, v[i].float())  # [S', L, h, D]
        outs.append(out[ok])  # the sequences' rows, in order
    return torch.cat(outs).to(q.dtype) if outs else q.new_empty(q.shape)


class WindowAttention(Attention):
    """The block's attention with soft-capped logits and no RoPE (parameters as ``Attention``)."""

    def __init__(self, cfg: TransformerConfig, softcap: float):
        super().__init__(cfg)
        self.softcap = softcap

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, angles=None,
                cache=None) -> torch.Tensor:
        qkv = self.qkv(x)
        n = qkv.shape[0]
        q, k, v = qkv.view(n, self.heads, 3, self.head_dim).unbind(2)  # each [N, h, D]
        out = softcap_attention(q, k, v, cu_seqlens, max_seqlen, self.softcap)
        return self.proj(out.reshape(n, self.heads * self.head_dim))


class WindowBlock(Block):
    """A pre-norm block whose attention is ``WindowAttention`` (same parameter names as ``Block``)."""

    def __init__(self, cfg: TransformerConfig, softcap: float):
        super().__init__(cfg)
        self.attn = WindowAttention(cfg, softcap)


class GaussianDecoder(nn.Module):
    """The pixel decoder's output at occupied voxels -> ``gaussians_per_voxel`` Gaussians per voxel.

    Parameters (release name in brackets): ``up`` [input_layer], ``blocks.i`` [blocks.i], ``head``
    [out_layer], buffer ``offset_perturbation``. Tensor parallelism and activation checkpointing are
    applied to its blocks from outside (training/parallelize.py); sequence parallelism is not (each
    block re-sorts the tokens into its windows).
    """

    def __init__(self, cfg: GaussianDecoderConfig):
        super().__init__()
        self.cfg = cfg
        tc, k = cfg.transformer, cfg.gaussians_per_voxel
        self.up = nn.Linear(cfg.in_channels, tc.width, bias=False)
        self.blocks = nn.ModuleList(WindowBlock(tc, cfg.attn_softcap) for _ in range(tc.depth))
        self.head = nn.Linear(tc.width, k * sum(GAUSSIAN_ATTRIBUTES.values()))
        # The release's float32 arithmetic, op for op (its buffer then loads bit-identical).
        self.register_buffer("offset_perturbation", torch.atanh((hammersley(k) * 2 - 1) / cfg.voxel_size))
        bias = torch.tensor(cfg.scaling_bias, device="cpu")  # (also when built on the meta device)
        self.scale_bias = float(bias + torch.log(-torch.expm1(-bias)))  # inverse softplus
        o = torch.tensor(cfg.opacity_bias, device="cpu")
        self.opacity_bias = float(torch.log(o / (1 - o)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Trunk linears as ``AToken.reset_parameters``; the head zero, as the release initialises it
        (every Gaussian starts as the configured one). NOTE: a parent that re-initialises every
        nn.Linear must call this again afterwards."""
        init_weights(self, std)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def partitions(self, coords: torch.Tensor, cu_seqlens: torch.Tensor) -> list[WindowPartition]:
        """Each block's windows: plain on even blocks, shifted by window // 2 on odd ones."""
        w = self.cfg.window
        plain = window_partition(coords, cu_seqlens, w)
        shifted = window_partition(coords, cu_seqlens, w, w // 2) if w > 1 else plain
        return [plain if i % 2 == 0 else shifted for i in range(len(self.blocks))]

    def forward(self, pixels: torch.Tensor, coords: torch.Tensor, cu_seqlens: torch.Tensor) -> Gaussians:
        """pixels [M, >= in_channels] the pixel decoder's output at the occupied voxels (its first
        ``in_channels`` are read); coords [M, 4] (0, x, y, z); cu_seqlens [B + 1] voxel offsets per
        sample -> Gaussians with [M * K, ...] rows, voxel-major (voxel m owns rows m*K:(m+1)*K) and
        ``cu_seqlens`` = K * the voxel offsets."""
        self._check(pixels, coords, cu_seqlens)
        x = self.up(pixels[:, :self.cfg.in_channels])  # [M, width]
        x = x + sinusoidal_positions(coords[:, 1:], x.shape[1]).to(x.dtype)
        for block, part in zip(self.blocks, self.partitions(coords, cu_seqlens), strict=True):
            x = block(x[part.order], part.cu_seqlens, part.max_seqlen, None)[part.inverse]
        x = F.layer_norm(x, x.shape[-1:])  # no affine parameters, eps 1e-5: as released
        return self.activate(self.head(x).float(), coords, cu_seqlens)

    def activate(self, raw: torch.Tensor, coords: torch.Tensor, cu_seqlens: torch.Tensor) -> Gaussians:
        """raw [M, K * 14] fp32, attribute-major -> Gaussians (formulas in the module docstring)."""
        cfg, m, k = self.cfg, raw.shape[0], self.cfg.gaussians_per_voxel
        r = {name: part.reshape(m, k, -1) * cfg.lr[name]  # [M, K, n] each
             for (name, n), part in zip(GAUSSIAN_ATTRIBUTES.items(),
                                        raw.split([k * n for n in GAUSSIAN_ATTRIBUTES.values()], dim=-1), strict=True)}
        centre = (coords[:, 1:].float() + 0.5) / cfg.resolution  # [M, 3] in the unit cube
        offset = torch.tanh(r["_xyz"] + self.offset_perturbation) / cfg.resolution * 0.5 * cfg.voxel_size
        means = (centre[:, None, :] + offset) - 0.5  # TRELLIS' aabb [-0.5, -0.5, -0.5, 1, 1, 1]
        scales = torch.sqrt(torch.square(F.softplus(r["_scaling"] + self.scale_bias)) + cfg.filter_3d ** 2)
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=raw.dtype, device=raw.device)
        return Gaussians(means=means.reshape(m * k, 3), scales=scales.reshape(m * k, 3),
                         quats=F.normalize(r["_rotation"] + identity, dim=-1).reshape(m * k, 4),
                         opacities=torch.sigmoid(r["_opacity"] + self.opacity_bias).reshape(m * k),
                         colors=(SH_C0 * r["_features_dc"] + 0.5).reshape(m * k, 3),
                         cu_seqlens=(cu_seqlens.to(torch.int64) * k).to(torch.int32))

    def _check(self, pixels: torch.Tensor, coords: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
        m = pixels.shape[0]
        if pixels.ndim != 2 or pixels.shape[1] < self.cfg.in_channels:
            raise ValueError(f"pixels must be [M, >= {self.cfg.in_channels}], got {list(pixels.shape)}")
        if coords.shape != (m, 4):
            raise ValueError(f"coords must be [{m}, 4], got {list(coords.shape)}")
        if cu_seqlens.ndim != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != m:
            raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} does not cover {m} voxels")
        if m and (bool((coords[:, 0] != 0).any()) or int(coords[:, 1:].min()) < 0
                  or int(coords[:, 1:].max()) >= self.cfg.resolution):
            raise ValueError(f"3D coords must be (0, x, y, z) with 0 <= x, y, z < {self.cfg.resolution}; got "
                             f"t in [{int(coords[:, 0].min())}, {int(coords[:, 0].max())}], xyz in "
                             f"[{int(coords[:, 1:].min())}, {int(coords[:, 1:].max())}]")

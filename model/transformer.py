"""Pre-norm transformer blocks on the packed token stream ``[N, width]``.

The blocks are plain modules (``nn.Linear``, one process). Parallelism is applied to a built model
from outside (training/parallelize.py): it swaps the block linears for megatron's tensor-parallel ones
in place and may set a ``Transformer``'s ``sequence`` hook (``SequenceSharding``), which splits the packed stream
``[N, width]`` across the TP ranks at the start of the stack and gathers it at the end (its column /
row linears then all-gather / reduce-scatter the tokens around attention and the MLP), so norms and
residuals run on a shard while attention still sees the whole packed stream.

Fused QKV layout: output features are ordered ``[heads, 3 (q, k, v), head_dim]`` (per head, like
megatron's linear_qkv) so that a column-parallel split along the output keeps each rank's q, k and
v heads together. Use ``fuse_qkv`` / ``split_qkv`` to convert from / to separate q, k, v
projections (e.g. SigLIP2's ``q_proj``, ``k_proj``, ``v_proj``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused_qk_rope
from .attention import varlen_attention
from .config import TransformerConfig
from .kv_cache import BlockCache, KVCache
from .rope import apply_rope

Angles = tuple[torch.Tensor, torch.Tensor]  # RoPE (cos, sin), each [N, head_dim / 2] fp32


class SequenceSharding:
    """The hook a ``Transformer`` calls around its blocks; the identity here (one process).
    training/parallelize.py sets a sequence-parallel one."""

    def shard(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, angles: Angles | None
              ) -> tuple[torch.Tensor, torch.Tensor, int, Angles | None]:
        """Entering a stack: x [N, width] -> this rank's rows, with the (cu_seqlens, max_seqlen,
        angles) that attention must use on the full stream it will see."""
        return x, cu_seqlens, max_seqlen, angles

    def unshard(self, x: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Leaving a stack: this rank's rows -> the full [num_tokens, width]."""
        return x


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else nn.RMSNorm(dim, eps=eps)


class MultiHeadRMSNorm(nn.Module):
    """The release's per-head QK-norm (``SparseMultiHeadRMSNorm``): x [N, heads, D] ->
    ``normalize(x) * sqrt(D) * weight`` in fp32, with a gain per head and channel (weight [heads, D]).
    Under tensor parallelism each rank holds its own heads' rows."""
    NO_DECAY = ("weight",)  # a norm's gain (model/params.py)

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, head_dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x.float(), dim=-1) * (x.shape[-1] ** 0.5) * self.weight.float()
        return y.to(x.dtype)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Separate q/k/v weights [H*D, in] (or biases [H*D]) -> fused qkv [3*H*D, ...] in our layout."""
    return torch.stack([t.unflatten(0, (heads, -1)) for t in (q, k, v)], dim=1).flatten(0, 2)


def split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``."""
    q, k, v = qkv.unflatten(0, (heads, 3, -1)).unbind(1)
    return q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, backend: str = "auto", fused: bool = False):
        super().__init__()
        self.backend = backend  # model/attention.py: "auto" or a kernel's name
        self.fused = fused  # QK-norm and RoPE in one Triton pass (model/fused_qk_rope.py) where it runs
        self.heads = cfg.heads  # this rank's heads (tensor parallelism divides them)
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)
        self.q_norm = MultiHeadRMSNorm(self.heads, self.head_dim) if cfg.qk_norm else None
        self.k_norm = MultiHeadRMSNorm(self.heads, self.head_dim) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                angles: Angles | None, cache: BlockCache | None = None) -> torch.Tensor:
        qkv = self.qkv(x)
        n = qkv.shape[0]  # all N tokens, also when x holds only a sequence-parallel shard of them
        q, k, v = qkv.view(n, self.heads, 3, self.head_dim).unbind(2)  # each [N, h, D]
        if (self.fused and self.q_norm is not None and angles is not None and cache is None
                and fused_qk_rope.available(q)):
            q = fused_qk_rope.qk_norm_rope(q, self.q_norm.weight, *angles, v.dtype)
            k = fused_qk_rope.qk_norm_rope(k, self.k_norm.weight, *angles, v.dtype)
            angles = None  # applied
        elif self.q_norm is not None:  # QK-norm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:  # inference across video chunks: RoPE and attention with the cached keys
            return self.proj(cache.attend(q, k, v, angles).reshape(n, self.heads * self.head_dim))
        if angles is not None:
            q, k = apply_rope(q, *angles), apply_rope(k, *angles)
        # NOTE: CUDA autocast may run the norms in fp32; the fused kernels need one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.backend)  # [N, h, D]
        return self.proj(out.reshape(n, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, attention: str = "auto", fused: bool = False):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.width, cfg.norm_eps)
        self.attn = Attention(cfg, attention, fused)
        self.norm2 = make_norm(cfg.norm, cfg.width, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                angles: Angles | None, cache: BlockCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen, angles, cache)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of ``cfg.depth`` blocks; no final norm (the encoder / decoder own theirs).

    ``rope=False`` (or setting ``.rope = False`` later) ignores the RoPE angles, e.g. to compare
    against SigLIP2, which has none. ``attention``: the varlen kernel (model/attention.py), "auto" or a
    backend's name; ``fused``: QK-norm and RoPE in one Triton pass where it runs (model/fused_qk_rope.py).
    """

    def __init__(self, cfg: TransformerConfig, rope: bool = True, attention: str = "auto", fused: bool = False):
        super().__init__()
        self.sequence = SequenceSharding()  # a plain object (no parameters): shards / unshards the token dim
        self.rope = rope
        self.blocks = nn.ModuleList(Block(cfg, attention, fused) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                angles: Angles | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """x [N, width] -> [N, width]; angles from ``rope_angles(coords, head_dim, theta)``;
        ``cache``: decode one video chunk with the previous chunk's keys (``kv_cache.py``)."""
        angles = angles if self.rope else None
        num_tokens = x.shape[0]
        if cache is not None:
            for i, block in enumerate(self.blocks):
                x = block(x, cu_seqlens, max_seqlen, angles, cache.block(i))
            return x
        x, cu_seqlens, max_seqlen, angles = self.sequence.shard(x, cu_seqlens, max_seqlen, angles)
        for block in self.blocks:
            x = block(x, cu_seqlens, max_seqlen, angles)
        return self.sequence.unshard(x, num_tokens)


@torch.no_grad()
def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Every Linear of ``module``: truncated normal(std) weights, zero biases; norms: their own reset."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm, MultiHeadRMSNorm)):
            m.reset_parameters()

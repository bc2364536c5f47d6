"""The whole model's weights from a checkpoint at any layout, for inference (atoken-convert) and
stage hand-offs: TP shards merged, ZeRO-3 partitions joined."""
from __future__ import annotations

from pathlib import Path

import torch

from ..shards import merge
from .deepspeed_internals import model_states_file, zero3_fp32_weights
from .layout import Layout, ema_file, legacy_ema_file, read_layout, unpartition


def tp_rank_ema(ckpt: Path, layout: Layout, tp_rank: int) -> dict[str, torch.Tensor]:
    """TP rank ``tp_rank``'s EMA tensors at their TP-local shapes: ZeRO-3's DP partitions joined, or
    ZeRO 1/2's DP shares merged (or one whole file, from before they were shared out)."""
    if layout.zero_stage != 3 and (ckpt / legacy_ema_file(tp_rank)).exists():
        return torch.load(ckpt / legacy_ema_file(tp_rank), map_location="cpu")
    parts = [torch.load(ckpt / ema_file(tp_rank, d), map_location="cpu") for d in range(layout.dp)]
    if layout.zero_stage == 3:
        return {n: unpartition([p[n] for p in parts], layout.params[n][0]) for n in parts[0]}
    return {n: v for p in parts for n, v in p.items()}


def ema_shards(ckpt: Path, layout: Layout) -> list[dict[str, torch.Tensor]]:
    """Per TP rank, its EMA tensors at their TP-local shapes."""
    return [tp_rank_ema(ckpt, layout, t) for t in range(layout.tp)]


def raw_shards(ckpt: Path, layout: Layout) -> list[dict[str, torch.Tensor]]:
    """Per TP rank, its training weights at their TP-local shapes (fp32)."""
    out = []
    for t in range(layout.tp):
        if layout.zero_stage == 3:  # the fp32 master partitions live in the optimizer shards
            out.append(zero3_fp32_weights(ckpt, t, layout.dp))
            continue
        # ZeRO 1/2: every DP rank holds the whole weights, and DeepSpeed saved them.
        states = torch.load(ckpt / model_states_file(1, t), map_location="cpu", weights_only=False)
        out.append({k: v.float() for k, v in states["module"].items()})
    return out


def consolidate(ckpt: Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The whole model's weights from a checkpoint at any layout (ZeRO 1/2/3, any TP and DP): keys
    and shapes as a plain single-process ``AToken``'s state dict. ``weights``: "ema" or "raw"."""
    layout = read_layout(ckpt)
    shards = ema_shards(ckpt, layout) if weights == "ema" else raw_shards(ckpt, layout)
    return {n: merge([s[n] for s in shards], layout.params[n][1]) for n in shards[0]}

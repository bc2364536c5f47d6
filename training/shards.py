"""The tensor-parallel split and merge of one tensor: the one place for it.

A parameter marked by megatron's attributes (``tensor_model_parallel``, ``partition_dim``) is split
into ``tp`` equal contiguous chunks along its ``partition_dim``; TP rank ``r`` holds chunk ``r``.
Everything else is replicated. parallelize.py cuts a built model's weights with ``split``; the
checkpoint code merges saved shards with ``merge`` and cuts them again at another layout.
"""
from __future__ import annotations

import torch


def partition_dim(p: torch.Tensor) -> int | None:
    """The dim ``p`` is split along over the TP ranks, None if it is replicated. Only contiguous
    splits: megatron's strided ones (``partition_stride`` > 1) are refused."""
    if not getattr(p, "tensor_model_parallel", False):
        return None
    if getattr(p, "partition_stride", 1) != 1:
        raise ValueError(f"parameter of shape {tuple(p.shape)} has partition_stride {p.partition_stride}: only "
                         "contiguous tensor-parallel splits are supported")
    return p.partition_dim


def split(t: torch.Tensor, dim: int | None, tp: int, tp_rank: int) -> torch.Tensor:
    """The whole tensor -> TP rank ``tp_rank``'s chunk (a view; ``t`` itself when replicated)."""
    return t if dim is None or tp == 1 else t.chunk(tp, dim=dim)[tp_rank]


def merge(shards: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    """One tensor's TP shards -> the whole tensor. Replicated ones are averaged: identical in exact
    arithmetic, but nondeterministic GPU kernels can leave them a few ulps apart, where a strict
    copy would refuse."""
    if dim is None:
        return shards[0] if len(shards) == 1 else sum(s.double() for s in shards).div(len(shards)).to(shards[0])
    return torch.cat(shards, dim=dim)

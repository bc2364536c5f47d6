"""Attention over packed variable-length sequences: one function, three backends.

Sample i owns rows ``cu_seqlens[i]:cu_seqlens[i + 1]`` of q/k/v ``[N, heads, head_dim]``; a token
attends (bidirectionally) to the tokens of its own sample only.

Backends, in order of preference:
  ``flash_attn``   flash-attn's ``flash_attn_varlen_func`` (package installed, CUDA, fp16/bf16)
  ``torch_varlen`` PyTorch's fused ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16)
  ``sdpa``         a loop over samples with ``F.scaled_dot_product_attention`` (any device/dtype)
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

try:
    from flash_attn import flash_attn_varlen_func
except Exception:  # ImportError, or a build that does not match the installed torch/CUDA
    flash_attn_varlen_func = None

try:
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except Exception:  # older torch
    torch_varlen_attn = None

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")
_HALF = (torch.float16, torch.bfloat16)
_forced: str | None = None
_logged: set[tuple[str, str]] = set()


def _unavailable_reason(name: str, x: torch.Tensor | None) -> str | None:
    """Why backend ``name`` cannot run on tensors like ``x`` (None: it can; x None: package check only)."""
    if name == "flash_attn" and flash_attn_varlen_func is None:
        return "flash_attn is not installed"
    if name == "torch_varlen" and torch_varlen_attn is None:
        return "torch.nn.attention.varlen.varlen_attn is missing in this torch"
    if name != "sdpa" and x is not None and not (x.is_cuda and x.dtype in _HALF):
        return f"needs CUDA fp16/bf16 tensors, got {x.device.type} {x.dtype}"
    return None


def set_attention_backend(name: str | None) -> None:
    """Force a backend by name for every later call, or ``None`` to choose automatically."""
    global _forced
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS} or None")
        reason = _unavailable_reason(name, None)
        if reason:
            raise ValueError(f"attention backend {name!r} is unavailable: {reason}")
    _forced = name


def get_attention_backend(q: torch.Tensor) -> tuple[str, str]:
    """(backend, reason) the next call with tensors like ``q`` will use."""
    if _forced is not None:
        reason = _unavailable_reason(_forced, q)
        if reason:
            raise ValueError(f"forced attention backend {_forced!r} cannot run: {reason}")
        return _forced, "forced by set_attention_backend"
    for name in BACKENDS[:-1]:
        if _unavailable_reason(name, q) is None:
            return name, f"auto: {q.device.type} {q.dtype}"
    why = "; ".join(f"{n}: {_unavailable_reason(n, q)}" for n in BACKENDS[:-1])
    return "sdpa", f"auto fallback ({why})"


def _log_once(name: str, reason: str) -> None:
    if (name, reason) not in _logged:  # once per distinct choice, not every layer and step
        _logged.add((name, reason))
        logger.info("attention backend: %s (%s)", name, reason)


def log_attention_backend(q: torch.Tensor) -> str:
    """Log (once per distinct choice) and return the backend calls with tensors like ``q`` use."""
    name, reason = get_attention_backend(q)
    _log_once(name, reason)
    return name


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> torch.Tensor:
    """q, k, v [N, heads, head_dim]; cu_seqlens [B + 1] int; -> out [N, heads, head_dim].

    Scale is 1/sqrt(head_dim); no dropout, no causal mask.
    """
    name, reason = get_attention_backend(q)
    # Not while torch.compile traces: a side effect there would split the graph (the trainer logs
    # its choice at start, eagerly).
    if not torch.compiler.is_compiling():
        _log_once(name, reason)
    if name == "flash_attn":
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0, causal=False)
    if name == "torch_varlen":
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return torch_varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)
    return sdpa_loop_attention(q, k, v, cu_seqlens)


def sdpa_loop_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The portable path: one ``F.scaled_dot_product_attention`` per sample."""
    bounds = cu_seqlens.tolist()  # NOTE: a host sync on CUDA; the fused backends avoid it
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        # [n_i, heads, D] -> [heads, n_i, D]
        qi, ki, vi = (t[s:e].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def dense_reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Slow reference: full [N, N] scores with an explicit block-diagonal mask (tests only)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(len(lens), device=q.device), lens.to(q.device))  # [N]
    mask = ids[:, None] == ids[None, :]  # [N, N]
    scores = torch.einsum("nhd,mhd->hnm", q.float(), k.float()) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hnm,mhd->nhd", probs, v.float()).to(q.dtype)

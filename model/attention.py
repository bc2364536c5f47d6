"""Attention over packed variable-length sequences: one function, four backends.

Sample i owns rows ``cu_seqlens[i]:cu_seqlens[i + 1]`` of q/k/v ``[N, heads, head_dim]``; a token
attends (bidirectionally) to the tokens of its own sample only.

The backend is part of the model config (``ModelConfig.attention``, like transformers'
``attn_implementation``): ``"auto"`` or one of
  ``flash_attn``   flash-attn's ``flash_attn_varlen_func`` (package installed, CUDA, fp16/bf16)
  ``torch_varlen`` PyTorch's fused ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16)
  ``cudnn``        cuDNN's SDPA on ragged (THD) tensors, through ``nvidia-cudnn-frontend``'s torch op
                   ``cudnn.sdpa_torch`` (CUDA sm80+, fp16/bf16, head_dim a multiple of 8, <= 128).
                   It takes head_dim 72 as it is; FlashAttention pads it to 96.
  ``sdpa``         a loop over samples with ``F.scaled_dot_product_attention`` (any device/dtype)
``auto`` takes the first that can run, in that order. cuDNN comes after the FlashAttention kernels:
on an H100, so400m's heads (16 x 72) and a 16k-token mixed-resolution batch, its forward + backward
took 2.46 ms against torch_varlen's 1.39 ms (benchmarks/results/attention_nvidia_h100_80gb_hbm3.json).
"""
from __future__ import annotations

import functools
import itertools
import logging

import torch
import torch.nn.functional as F

from .config import ATTENTION_BACKENDS as BACKENDS

logger = logging.getLogger(__name__)

try:
    from flash_attn import flash_attn_varlen_func
except Exception:  # noqa: BLE001 - ImportError, or a build that does not match the installed torch/CUDA
    flash_attn_varlen_func = None

try:
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except Exception:  # noqa: BLE001 - older torch
    torch_varlen_attn = None

_HALF = (torch.float16, torch.bfloat16)
_logged: set[tuple[str, str]] = set()


@functools.cache
def _cudnn_sdpa():
    """cuDNN's differentiable varlen SDPA op, or None (imported on first use: it loads cuDNN)."""
    try:
        import cudnn  # noqa: PLC0415 - the cuDNN frontend, an optional GPU kernel

        return cudnn.sdpa_torch
    except Exception:  # noqa: BLE001 - not installed, or a build without the torch op (before 1.32)
        return None


@torch.compiler.assume_constant_result
def _sm(index: int) -> int:
    """Compute capability of CUDA device ``index`` as 10 * major + minor (90: Hopper)."""
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _unavailable_reason(name: str, x: torch.Tensor | None) -> str | None:
    """Why backend ``name`` cannot run on tensors like ``x`` (None: it can; x None: package check only)."""
    if name == "cudnn" and _cudnn_sdpa() is None:
        return "nvidia-cudnn-frontend >= 1.32 is not installed"
    if name == "flash_attn" and flash_attn_varlen_func is None:
        return "flash_attn is not installed"
    if name == "torch_varlen" and torch_varlen_attn is None:
        return "torch.nn.attention.varlen.varlen_attn is missing in this torch"
    if name == "sdpa" or x is None:
        return None
    if not (x.is_cuda and x.dtype in _HALF):
        return f"needs CUDA fp16/bf16 tensors, got {x.device.type} {x.dtype}"
    if name == "cudnn":
        if _sm(x.device.index or 0) < 80:
            return "needs sm80 or later"
        if x.shape[-1] % 8 or x.shape[-1] > 128:
            return f"head_dim {x.shape[-1]} is not a multiple of 8 up to 128"
    return None


def check_backend(name: str) -> None:
    """Raise ValueError for a name that is not a backend or whose package is missing ("auto" passes)."""
    if name == "auto":
        return
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose 'auto' or one of {BACKENDS}")
    reason = _unavailable_reason(name, None)
    if reason:
        raise ValueError(f"attention backend {name!r} is unavailable: {reason}")


def get_attention_backend(q: torch.Tensor, backend: str = "auto") -> tuple[str, str]:
    """(backend, reason) a call with tensors like ``q`` uses, for the configured ``backend``."""
    if backend != "auto":
        reason = _unavailable_reason(backend, q)
        if reason:
            raise ValueError(f"attention backend {backend!r} (model.attention) cannot run: {reason}")
        return backend, "set in model.attention"
    order = BACKENDS[:-1]  # sdpa is the fallback
    for name in order:
        if _unavailable_reason(name, q) is None:
            return name, f"auto: {q.device.type} {q.dtype}"
    why = "; ".join(f"{n}: {_unavailable_reason(n, q)}" for n in order)
    return "sdpa", f"auto fallback ({why})"


def _log_once(name: str, reason: str) -> None:
    if (name, reason) not in _logged:  # once per distinct choice, not every layer and step
        _logged.add((name, reason))
        logger.info("attention backend: %s (%s)", name, reason)


def log_attention_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """Log (once per distinct choice) and return the backend calls with tensors like ``q`` use."""
    name, reason = get_attention_backend(q, backend)
    _log_once(name, reason)
    return name


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, backend: str = "auto") -> torch.Tensor:
    """q, k, v [N, heads, head_dim]; cu_seqlens [B + 1] int; -> out [N, heads, head_dim].

    Scale is 1/sqrt(head_dim); no dropout, no causal mask.
    """
    name, reason = get_attention_backend(q, backend)
    # Not while torch.compile traces: a side effect there would split the graph (the trainer logs
    # its choice at start, eagerly).
    if not torch.compiler.is_compiling():
        _log_once(name, reason)
    if name == "sdpa":
        return sdpa_loop_attention(q, k, v, cu_seqlens)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if name == "cudnn":
        # cuDNN builds and caches an execution plan per (samples, max_seqlen); mixed-resolution
        # batches would build one nearly every step. Rounding both up (samples to a power of two, by
        # empty samples at the end; max_seqlen, an upper bound, to 128) keeps a few plans.
        samples = cu.numel() - 1
        cu = torch.cat([cu, cu[-1:].expand((1 << (samples - 1).bit_length()) - samples)])
        bound = -(-max_seqlen // 128) * 128
        # return_lse=True: the op is differentiable only then (its backward reads the softmax stats).
        out, _ = _cudnn_sdpa()(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=bound,
                               max_seqlen_kv=bound, return_lse=True)
        return out
    if name == "flash_attn":
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0, causal=False)
    return torch_varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)


def sdpa_loop_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The portable path: one ``F.scaled_dot_product_attention`` per sample."""
    bounds = cu_seqlens.tolist()  # NOTE: a host sync on CUDA; the fused backends avoid it
    outs = []
    for s, e in itertools.pairwise(bounds):
        # [n_i, heads, D] -> [heads, n_i, D]
        qi, ki, vi = (t[s:e].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def dense_reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Slow reference: full [N, N] scores with an explicit block-diagonal mask (tests only)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(len(lens), device=q.device), lens.to(q.device))  # [N]
    mask = ids[:, None] == ids[None, :]  # [N, N]
    scores = torch.einsum("nhd,mhd->hnm", q.float(), k.float()) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hnm,mhd->nhd", probs, v.float()).to(q.dtype)

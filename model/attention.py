"""Attention over packed variable-length sequences: one function, five backends.

Sample i owns rows ``cu_seqlens[i]:cu_seqlens[i + 1]`` of q/k/v ``[N, heads, head_dim]``; a token
attends (bidirectionally) to the tokens of its own sample only.

The backend is part of the model config (``ModelConfig.attention``, like transformers'
``attn_implementation``): ``"auto"`` or one of
  ``fa4``          flash-attn-4 (``flash_attn.cute``, the CuTe-DSL FlashAttention, JIT-compiled; CUDA sm90+,
                   fp16/bf16). It pads head_dim 72 to an 80-wide tile, FA2/FA3 to 96. Called through
                   the custom ops ``atoken::fa4_fwd`` / ``atoken::fa4_bwd`` so compiled blocks keep one graph.
  ``flash_attn``   flash-attn's ``flash_attn_varlen_func`` (package installed, CUDA, fp16/bf16)
  ``torch_varlen`` PyTorch's fused ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16)
  ``cudnn``        cuDNN's SDPA on ragged (THD) tensors, through ``nvidia-cudnn-frontend``'s torch op
                   ``cudnn.sdpa_torch`` (CUDA sm80+, fp16/bf16, head_dim a multiple of 8, <= 128).
                   It takes head_dim 72 as it is; FlashAttention pads it to 96.
  ``sdpa``         a loop over samples with ``F.scaled_dot_product_attention`` (any device/dtype)
``auto`` takes the first that can run in ``auto_order()``: the backends measured on a GPU, fastest first
(``MEASURED_MS``, from ``benchmarks/attention.py``), then the unmeasured ones, then sdpa.
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

# auto's ranking is data: forward + backward ms of each backend on one GPU, one packed mixed-resolution
# batch of 16384 tokens at so400m's heads (16 x 72), bf16, all in the same run of benchmarks/attention.py.
# Source: benchmarks/results/attention_nvidia_h100_80gb_hbm3.json (H100 80GB HBM3, 2026-11-26);
# tests/test_benchmarks.py checks these numbers against that file. A backend missing here (fa4,
# flash_attn: not installed in that run) comes after the measured ones; benchmarks/attention.py prints
# the line to paste after a new run.
MEASURED_MS = {"torch_varlen": 1.394, "cudnn": 2.464}
MEASURED_ON = "benchmarks/results/attention_nvidia_h100_80gb_hbm3.json"


def auto_order() -> tuple[str, ...]:
    """The backends ``auto`` tries, in order: measured fastest first, then unmeasured, sdpa last."""
    fused = [b for b in BACKENDS if b != "sdpa"]
    measured = sorted((b for b in fused if b in MEASURED_MS), key=MEASURED_MS.__getitem__)
    return (*measured, *(b for b in fused if b not in MEASURED_MS))


@functools.cache
def _cudnn_sdpa():
    """cuDNN's differentiable varlen SDPA op, or None (imported on first use: it loads cuDNN)."""
    try:
        import cudnn  # noqa: PLC0415 - the cuDNN frontend, an optional GPU kernel

        return cudnn.sdpa_torch
    except Exception:  # noqa: BLE001 - not installed, or a build without the torch op (before 1.32)
        return None


@functools.cache
def _fa4():
    """flash-attn-4's ``flash_attn.cute.interface`` module, or None. Imported on first use: it loads the
    CuTe DSL (MLIR, seconds) and needs nvidia-cutlass-dsl; the installed version is the pinned one
    (benchmarks/gpu_trainer.sh), since its ``_flash_attn_fwd`` / ``_flash_attn_bwd`` are not public."""
    try:
        from flash_attn.cute import interface  # noqa: PLC0415 - optional GPU package; loads the CuTe DSL (seconds)

        interface._flash_attn_fwd, interface._flash_attn_bwd  # noqa: B018 - the entry points the ops call
        return interface
    except Exception:  # noqa: BLE001 - not installed, no CUDA driver for the DSL, or another version's internals
        return None


# FA4 through two custom ops (forward, backward) with their autograd and fake kernels: dynamo sees
# one opaque op, as it sees flash-attn 2's, instead of tracing into the CuTe DSL. q/k/v [N, h, D],
# cu [B + 1] int32, lse [h, N] fp32.
@torch.library.custom_op("atoken::fa4_fwd", mutates_args=())
def _fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
             max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, *_ = _fa4()._flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen,
                                          max_seqlen_k=max_seqlen, return_lse=True)
    return out.contiguous(), lse.contiguous()  # no-ops: FA4 allocates them so; the fake kernel says so


@_fa4_fwd.register_fake
def _(q, k, v, cu, max_seqlen):
    # Contiguous whatever q's strides (q/k/v are strided views of the fused qkv projection).
    return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("atoken::fa4_bwd", mutates_args=())
def _fa4_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
             lse: torch.Tensor, cu: torch.Tensor, max_seqlen: int,
             deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _fa4()._flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                                        deterministic=deterministic)[:3]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_fa4_bwd.register_fake
def _(q, k, v, out, dout, lse, cu, max_seqlen, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fa4_setup(ctx, inputs, output):
    q, k, v, cu, max_seqlen = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu)
    ctx.max_seqlen = max_seqlen
    # deterministic=true (training/determinism): FA4's backward then accumulates dq in a fixed order.
    ctx.deterministic = torch.are_deterministic_algorithms_enabled()


def _fa4_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    dq, dk, dv = _fa4_bwd(q, k, v, out, dout, lse, cu, ctx.max_seqlen, ctx.deterministic)
    return dq, dk, dv, None, None


_fa4_fwd.register_autograd(_fa4_backward, setup_context=_fa4_setup)


@torch.compiler.assume_constant_result
def _sm(index: int) -> int:
    """Compute capability of CUDA device ``index`` as 10 * major + minor (90: Hopper)."""
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


@torch.compiler.assume_constant_result
def _package_missing(name: str) -> str:
    """Why backend ``name``'s package cannot be used ("" if it can). Run eagerly and taken as a constant
    under torch.compile: tracing the imports would break the compiled block's graph."""
    if name == "fa4" and _fa4() is None:
        return "flash-attn-4 (flash_attn.cute) with nvidia-cutlass-dsl is not installed"
    if name == "cudnn" and _cudnn_sdpa() is None:
        return "nvidia-cudnn-frontend >= 1.32 is not installed"
    if name == "flash_attn" and flash_attn_varlen_func is None:
        return "flash_attn is not installed"
    if name == "torch_varlen" and torch_varlen_attn is None:
        return "torch.nn.attention.varlen.varlen_attn is missing in this torch"
    return ""


def _unavailable_reason(name: str, x: torch.Tensor | None) -> str | None:
    """Why backend ``name`` cannot run on tensors like ``x`` (None: it can; x None: package check only)."""
    missing = _package_missing(name)
    if missing:
        return missing
    if name == "sdpa" or x is None:
        return None
    if not (x.is_cuda and x.dtype in _HALF):
        return f"needs CUDA fp16/bf16 tensors, got {x.device.type} {x.dtype}"
    if name == "fa4":
        if _sm(x.device.index or 0) < 90:
            return "needs sm90 (Hopper) or later"
        if x.shape[-1] % 8 or x.shape[-1] > 256:
            return f"head_dim {x.shape[-1]} is not a multiple of 8 up to 256"
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
    order = auto_order()  # sdpa is the fallback
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
    if name == "fa4":
        return _fa4_fwd(q, k, v, cu, max_seqlen)[0]
    if name == "flash_attn":
        # flash-attn's backward adds dq atomically unless asked: deterministic=true must ask (it is
        # outside torch.use_deterministic_algorithms, so it would drift silently rather than raise).
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0, causal=False,
                                      deterministic=torch.are_deterministic_algorithms_enabled())
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

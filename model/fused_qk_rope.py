"""QK-norm and 4D RoPE in one pass over q and k: a Triton kernel, forward and backward.

The eager path (``transformer.MultiHeadRMSNorm`` then ``rope.apply_rope``) reads and writes q and k
three times each, in fp32; this reads them once and writes them once, in their own dtype. Per token
and head, with x [D] in (even, odd) pairs, weight w [D], cos/sin [D/2]:

    r = max(||x||, 1e-12);  y = x / r * sqrt(D) * w            (F.normalize, as the release)
    out_even = y_even * cos - y_odd * sin;  out_odd = y_even * sin + y_odd * cos

Backward: rotate the gradient back (by -angle), then through the weight and the normalisation:
    gy = rot(-angle) g;  u = gy * sqrt(D) * w;  gw = sum_tokens gy * sqrt(D) * x / r
    gx = (u - xh * <u, xh>) / r  with xh = x / r   (gx = u / r where r was clamped)

``model.fused_qk_rope`` selects it (CUDA tensors only; the eager path stays the fallback and the
reference). Tested against the eager path on CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager path runs
    triton = None

# Triton's interpreter runs the kernels on CPU tensors (the tests); read once, at import, as triton does.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    """The kernel can run on tensors like ``x`` (CUDA, or anywhere under TRITON_INTERPRET=1)."""
    return triton is not None and (x.is_cuda or INTERPRET)


if triton is not None:
    @triton.jit
    def _fwd(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, stride_xn, stride_xh, heads, half, scale,
             BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
        # One program per token: x [heads, D] at x_ptr + n * stride_xn (any head stride, dim stride 1).
        n = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)[:, None]  # [BH, 1]
        p = tl.arange(0, BLOCK_P)[None, :]  # [1, BP] rotation pairs
        mask = (h < heads) & (p < half)
        src = x_ptr + n * stride_xn + h * stride_xh + 2 * p
        xe = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        r = tl.maximum(tl.sqrt(tl.sum(xe * xe + xo * xo, axis=1)), 1e-12)[:, None]  # [BH, 1]
        we = tl.load(w_ptr + h * 2 * half + 2 * p, mask=mask, other=0.0).to(tl.float32)
        wo = tl.load(w_ptr + h * 2 * half + 2 * p + 1, mask=mask, other=0.0).to(tl.float32)
        ye, yo = xe / r * scale * we, xo / r * scale * wo
        c = tl.load(cos_ptr + n * half + p, mask=p < half, other=0.0)
        s = tl.load(sin_ptr + n * half + p, mask=p < half, other=0.0)
        dst = out_ptr + n * heads * 2 * half + h * 2 * half + 2 * p  # out [N, heads, D] contiguous
        tl.store(dst, (ye * c - yo * s).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + 1, (ye * s + yo * c).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd(x_ptr, w_ptr, cos_ptr, sin_ptr, g_ptr, gx_ptr, gw_ptr, stride_xn, stride_xh, heads, half, scale,
             BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
        # One program per token; gx [N, heads, D] and this token's weight-gradient term gw [N, heads, D].
        n = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)[:, None]
        p = tl.arange(0, BLOCK_P)[None, :]
        mask = (h < heads) & (p < half)
        src = x_ptr + n * stride_xn + h * stride_xh + 2 * p
        xe = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(xe * xe + xo * xo, axis=1))[:, None]
        r = tl.maximum(norm, 1e-12)
        we = tl.load(w_ptr + h * 2 * half + 2 * p, mask=mask, other=0.0).to(tl.float32)
        wo = tl.load(w_ptr + h * 2 * half + 2 * p + 1, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + n * half + p, mask=p < half, other=0.0)
        s = tl.load(sin_ptr + n * half + p, mask=p < half, other=0.0)
        off = n * heads * 2 * half + h * 2 * half + 2 * p
        ge = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        go = tl.load(g_ptr + off + 1, mask=mask, other=0.0).to(tl.float32)
        gye, gyo = ge * c + go * s, go * c - ge * s  # rotated back
        xhe, xho = xe / r, xo / r
        tl.store(gw_ptr + off, gye * scale * xhe, mask=mask)
        tl.store(gw_ptr + off + 1, gyo * scale * xho, mask=mask)
        ue, uo = gye * scale * we, gyo * scale * wo
        dot = tl.sum(ue * xhe + uo * xho, axis=1)[:, None]
        proj = tl.where(norm > 1e-12, dot, 0.0)  # clamped r: x / eps is linear in x
        tl.store(gx_ptr + off, ((ue - xhe * proj) / r).to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gx_ptr + off + 1, ((uo - xho * proj) / r).to(gx_ptr.dtype.element_ty), mask=mask)


def _launch_args(x: torch.Tensor) -> dict:
    heads, dim = x.shape[1], x.shape[2]
    return dict(stride_xn=x.stride(0), stride_xh=x.stride(1), heads=heads, half=dim // 2, scale=math.sqrt(dim),
                BLOCK_H=triton.next_power_of_2(heads), BLOCK_P=triton.next_power_of_2(dim // 2))


class _NormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cos, sin, out_dtype):
        # x [N, heads, D] (dim stride 1, e.g. a view of the fused qkv output); weight [heads, D].
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        weight = weight.contiguous()
        if x.shape[0]:
            _fwd[(x.shape[0],)](x, weight, cos, sin, out, **_launch_args(x))
        ctx.save_for_backward(x, weight, cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, cos, sin = ctx.saved_tensors
        grad = grad.contiguous()
        gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        gw = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # per-token terms, summed below
        if x.shape[0]:
            _bwd[(x.shape[0],)](x, weight, cos, sin, grad, gx, gw, **_launch_args(x))
        return gx, gw.sum(0).to(weight.dtype), None, None, None


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """x [N, heads, D] -> normalised, scaled by weight [heads, D], rotated by cos/sin [N, D/2] fp32;
    returns a contiguous [N, heads, D] of ``out_dtype``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _NormRope.apply(x, weight, cos.contiguous(), sin.contiguous(), out_dtype)

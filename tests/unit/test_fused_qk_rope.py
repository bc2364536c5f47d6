"""The fused QK-norm + 4D RoPE Triton kernel against the eager path, forward and backward.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton decorates
them: so in a fresh process); on a GPU they run compiled."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CHECK = r"""
import torch
from atoken.model import fused_qk_rope
from atoken.model.rope import apply_rope, rope_angles
from atoken.model.transformer import MultiHeadRMSNorm

device, dtype = DEVICE, DTYPE
torch.manual_seed(0)
n, heads, dim = 37, 3, 24  # head_dim 24: 12 rotation pairs, padded to 16 in the kernel
assert fused_qk_rope.available(torch.empty(1, device=device))
qkv = torch.randn(n, heads, 3, dim, device=device, dtype=dtype).requires_grad_()
qkv.data[5, 1, 0] = 0  # a zero vector: F.normalize's clamp
norm = MultiHeadRMSNorm(heads, dim).to(device)
with torch.no_grad():
    norm.weight.copy_(1 + 0.3 * torch.randn(heads, dim))
coords = torch.randint(0, 9, (n, 4), device=device)
cos, sin = rope_angles(coords, dim)
g = torch.randn(n, heads, dim, device=device, dtype=dtype)

x = qkv[:, :, 0]  # a strided view, as in Attention: [N, heads, D]
eager = apply_rope(norm(x), cos, sin)
fused = fused_qk_rope.qk_norm_rope(x, norm.weight, cos, sin, dtype)
tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
torch.testing.assert_close(fused, eager, **tol)
want = torch.autograd.grad(eager, (qkv, norm.weight), g)
got = torch.autograd.grad(fused, (qkv, norm.weight), g)
for a, b in zip(got, want):
    torch.testing.assert_close(a, b, **tol)
assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0

# Wired into the model: model.fused_qk_rope=true against the same weights without it.
import dataclasses
from atoken.model import AToken, PackedBatch, patchify, preset
cfg = preset("tiny")
for tc in (cfg.encoder, cfg.decoder):
    tc.depth = 1
eager_model = AToken(cfg).to(device)
fused_model = AToken(dataclasses.replace(cfg, fused_qk_rope=True)).to(device)
fused_model.load_state_dict(eager_model.state_dict())
f, c, grid = patchify(torch.rand(3, 32, 48))
batch = PackedBatch.cat([(f, c, grid, "image", 1)]).to(device)
outs = [m(batch, sample=False).recon for m in (eager_model, fused_model)]
torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
grads = [torch.autograd.grad(o.square().sum(), m.decoder.transformer.blocks[0].attn.q_norm.weight)[0]
         for o, m in zip(outs, (eager_model, fused_model))]
torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)
print("ok")
"""


def _run(device: str, dtype: str, env: dict) -> None:
    code = CHECK.replace("DEVICE", repr(device)).replace("DTYPE", dtype)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.slow  # the interpreter runs each program in Python
def test_fused_matches_eager_in_triton_interpreter():
    pytest.importorskip("triton")
    _run("cpu", "torch.float32", {"TRITON_INTERPRET": "1"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_fused_matches_eager_on_gpu(dtype):
    _run("cuda", dtype, {})

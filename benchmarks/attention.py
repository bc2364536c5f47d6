"""Packed varlen attention kernels on one mixed-resolution batch: forward + backward time and TFLOP/s.

    python benchmarks/attention.py                      # a GPU: so400m's heads (16 x 72), bf16
    python benchmarks/attention.py --heads 12 --head-dim 64

The batch has the sequence lengths of ``train_step.py``'s packed images (``common.image_sizes``).
Each variant computes the same block-diagonal attention over q, k, v [N, heads, head_dim]:

  fa4           flash-attn-4 (``flash_attn.cute``, CuTe DSL, JIT-compiled on first call; sm90+) through
                ``model.attention``'s custom ops, when installed
  cudnn         cuDNN's ragged (THD) SDPA through ``nvidia-cudnn-frontend``'s ``cudnn.sdpa_torch``, when
                installed (after torch_varlen in ``model.attention``'s auto order)
  torch_varlen  ``torch.nn.attention.varlen.varlen_attn``
  flash_attn    flash-attn's ``flash_attn_varlen_func``, when installed
  flex          ``flex_attention`` (compiled) with a document block mask built from the sample ids
  sdpa_loop     one ``F.scaled_dot_product_attention`` per sample (the portable fallback)
  njt_*         SDPA on nested (jagged) tensors, with its flash / efficient / cuDNN backend forced
  padded        SDPA over the samples padded to [B, heads, Lmax, D] with a key-padding mask

FLOPs: 4 * sum_i L_i^2 * heads * head_dim forward, 2.5x that backward (as flash-attn counts).
Outputs are checked against ``sdpa_loop`` (max abs difference). Writes
``results/attention_<device>.json`` and prints the ``MEASURED_MS`` line of ``model/attention.py`` (auto's
ranking: the model's backends that ran, fwd + bwd ms); paste it there when the run is the reference one.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from atoken.model import attention as attn
from atoken.model.attention import sdpa_loop_attention
from atoken.model.config import PATCH_HW
from common import device_slug, git_state, image_sizes, write_report


def timed(fn, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--min-res", type=int, default=256)
    p.add_argument("--max-res", type=int, default=512)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=72)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("attention.py times CUDA kernels: no CUDA device here")
    dev = torch.device("cuda")
    sizes = image_sizes(args.tokens, args.seed, args.min_res, args.max_res)
    lens = [(h // PATCH_HW) * (w // PATCH_HW) for h, w in sizes]
    n, b, lmax, h, d = sum(lens), len(lens), max(lens), args.heads, args.head_dim
    cu = torch.zeros(b + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    cu = cu.to(dev)
    g = torch.Generator(device=dev).manual_seed(args.seed)
    q, k, v = (torch.randn(n, h, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    dy = torch.randn(n, h, d, device=dev, dtype=torch.bfloat16, generator=g)
    ids = torch.repeat_interleave(torch.arange(b, device=dev), cu[1:] - cu[:-1], output_size=n)
    pos = torch.arange(n, device=dev) - cu.long()[ids]
    fwd_flops = 4 * sum(L * L for L in lens) * h * d

    def run(f):
        def step():
            qi, ki, vi = (t.detach().requires_grad_() for t in (q, k, v))
            y = f(qi, ki, vi)
            y.backward(dy)
            return y
        return step

    variants = {}
    variants["sdpa_loop"] = lambda q_, k_, v_: sdpa_loop_attention(q_, k_, v_, cu)
    if attn._fa4() is not None:  # the first call JIT-compiles (seconds): warm-up, not timed
        variants["fa4"] = lambda q_, k_, v_: attn.varlen_attention(q_, k_, v_, cu, lmax, backend="fa4")
    if attn._cudnn_sdpa() is not None:
        variants["cudnn"] = lambda q_, k_, v_: attn.varlen_attention(q_, k_, v_, cu, lmax, backend="cudnn")
    if attn.torch_varlen_attn is not None:
        variants["torch_varlen"] = lambda q_, k_, v_: attn.torch_varlen_attn(q_, k_, v_, cu, cu, lmax, lmax)
    if attn.flash_attn_varlen_func is not None:
        variants["flash_attn"] = lambda q_, k_, v_: attn.flash_attn_varlen_func(q_, k_, v_, cu, cu, lmax, lmax)
    try:
        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = create_block_mask(lambda _b, _h, qi, ki: ids[qi] == ids[ki], None, None, n, n, device=dev)
        variants["flex"] = lambda q_, k_, v_: flex(q_.transpose(0, 1)[None], k_.transpose(0, 1)[None],
                                                    v_.transpose(0, 1)[None], block_mask=block_mask)[0].transpose(0, 1)
    except Exception as e:  # noqa: BLE001 - recorded, the others still run
        print(f"flex unavailable: {type(e).__name__}: {e}")
    # Nested (jagged) tensors: SDPA picks a varlen kernel itself; each backend forced in turn.
    offsets = cu.long()

    def njt(backend):
        def f(q_, k_, v_):
            qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q_, k_, v_))
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(qn, kn, vn)  # [B, h, (L_i), D] jagged
            return o.transpose(1, 2).values()
        return f
    for name, backend in (("njt_flash", SDPBackend.FLASH_ATTENTION), ("njt_efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("njt_cudnn", SDPBackend.CUDNN_ATTENTION)):
        variants[name] = njt(backend)
    mask = torch.zeros(b, lmax, dtype=torch.bool, device=dev)
    mask[ids, pos] = True

    def padded(q_, k_, v_):
        qp, kp, vp = (t.new_zeros(b, lmax, h, d).index_put((ids, pos), t).transpose(1, 2) for t in (q_, k_, v_))
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask[:, None, None, :])  # [B, h, Lmax, D]
        return o.transpose(1, 2)[ids, pos]
    variants["padded"] = padded

    ref = sdpa_loop_attention(q, k, v, cu).float()
    results = {}
    for name, f in variants.items():
        try:
            err = (f(q, k, v).float() - ref).abs().max().item()
            ts = timed(run(f), args.warmup, args.reps)
        except Exception as e:  # noqa: BLE001 - a kernel that fails is reported, the others still run
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"{name}: {results[name]['error']}")
            continue
        med = statistics.median(ts)
        results[name] = {"fwd_bwd_s": med, "times_s": ts, "tflops": 3.5 * fwd_flops / med / 1e12, "max_abs_diff": err}
        print(f"{name:13s} {med * 1e3:8.2f} ms  {results[name]['tflops']:6.1f} TFLOP/s  max diff {err:.1e}", flush=True)

    info = torch.cuda.get_device_properties(dev)
    report = {"benchmark": "attention", "command": shlex.join([sys.executable, *sys.argv]),
              "device": {"type": "cuda", "name": info.name}, "versions": {"torch": torch.__version__,
                                                                          "cuda": torch.version.cuda, **git_state()},
              "settings": vars(args), "samples": b, "tokens": n, "max_len": lmax, "seqlens": lens,
              "fwd_flops": fwd_flops, "flops_counted": "fwd 4*sum(L^2)*heads*head_dim, fwd+bwd 3.5x fwd",
              "results": results}
    out = write_report(report, args.out, f"attention_{device_slug(report['device'])}.json")
    print(f"wrote {out}")
    print(f"model/attention.py: {measured_ms_line(results)}")


def measured_ms_line(results: dict) -> str:
    """auto's ranking from one run: ``MEASURED_MS = {...}`` over the model's backends that ran."""
    ms = {name: round(r["fwd_bwd_s"] * 1e3, 3) for name, r in sorted(results.items(), key=lambda x: x[1].get(
        "fwd_bwd_s", 1e9)) if name in attn.BACKENDS and "fwd_bwd_s" in r}
    return f"MEASURED_MS = {ms}"


if __name__ == "__main__":
    main()

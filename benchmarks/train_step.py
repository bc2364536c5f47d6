"""Time single-process AToken training steps on a packed mixed-resolution batch, with an analytic
MFU, and compare packed varlen attention against a padded batch of the same samples.

    python benchmarks/train_step.py                                  # CPU: tiny, base (fp32)
    python benchmarks/train_step.py --models so400m --tokens 16384   # a GPU: bf16 autocast

Per model (``--models``): a fixed packed batch of random-pixel images, sized by the training
resolution policy (``data_pipeline.images``: longer side uniform over 64..512 px in steps of 16,
seeded), exactly ``--tokens`` tokens. After ``--warmup`` untimed steps, ``--steps`` steps are
timed, each the trainer's own ``training.train.micro_step`` on an image-reconstruction micro-batch:
forward through the DeepSpeed engine that ``training.parallelize.parallelize`` builds in one process
(ZeRO-1, AdamW from ``training.engine.make_optimizer``: apex FusedAdam or torch's fused AdamW on
CUDA, clipping), the trainer's ``Objective`` (``--lpips``: the paper's LPIPS and Gram weights; by
default they are 0, so the total is 0.2 * L1 + 1e-8 * KL, though the perceptual net still runs),
backward, the optimizer step. ``--compile`` compiles the transformer blocks as training's
``parallel.compile=true`` does. On CUDA: bf16 autocast, a device sync after each step, and
``torch.cuda.max_memory_allocated`` over the timed steps. On CPU: fp32, and the growth of the
process' peak resident set (``VmHWM``) over the timed steps.

MFU = analytic model FLOPs / (median step time * peak FLOP/s), FLOPs counted as

    6 * N * (matmul weights a token touches: patch embed, qkv, proj, fc1, fc2, latent, up, head)
  + 3 * sum over layers of 4 * sum_i L_i^2 * width       (attention scores + values, fwd + bwd)

over the real per-sample lengths L_i (N = sum_i L_i). Norms, RoPE, GELU, the loss and the optimizer
are not counted; neither is the LPIPS network with ``--lpips``. Peak FLOP/s: ``--peak-tflops``;
default 989 (H100 bf16 dense) on CUDA, and on CPU a fp32 matmul measured in this script (so the CPU
MFU is relative to what this machine's torch matmul achieves, not to a datasheet).

Packed vs padded: the encoder's ``Transformer`` (attention + MLP blocks, same weights, with RoPE),
forward + backward, over (a) the packed stream [N, width] with ``varlen_attention`` and (b) the same
samples padded to [B, Lmax, width], every linear / norm / MLP run on all B * Lmax rows and the
attention through ``F.scaled_dot_product_attention`` with a key-padding mask. Reported: the median
time of each, the ratio padded / packed and the padding fraction 1 - N / (B * Lmax).

Writes ``benchmarks/results/train_step_<device>.json`` (``--out`` changes it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from atoken.model import AToken, PackedBatch, preset
from atoken.model.attention import get_attention_backend
from atoken.model.config import PATCH_DIM
from atoken.model.losses import LossConfig
from atoken.model.objective import Objective
from atoken.model.rope import apply_rope
from atoken.training import distributed
from atoken.training.checkpoint.deepspeed_internals import torch_optimizer
from atoken.training.config import RunConfig
from atoken.training.ema import EMA
from atoken.training.engine import precision
from atoken.training.parallelize import init_parallel, parallelize, prepare_loss
from atoken.training.train import micro_step
from common import (
    cpu_info,
    device_slug,
    git_state,
    image_sizes,
    packed_batch,
    proc_status_bytes,
    resolve_device,
    sync,
    write_report,
)
from step_split import labels, split

# ------------------------------------------------------------------ FLOPs

def matmul_params_per_token(cfg) -> int:
    """Weights of every linear layer one token goes through (biases excluded)."""
    e, d, c = cfg.encoder, cfg.decoder, cfg.latent_channels

    def stack(t):
        return t.depth * (4 * t.width * t.width + 2 * t.width * t.mlp_width)  # qkv 3w^2, proj w^2, fc1, fc2

    return (PATCH_DIM * e.width + stack(e) + e.width * 2 * c  # patch embed, blocks, latent
            + c * d.width + stack(d) + d.width * PATCH_DIM)  # up, blocks, head


def attention_flops_fwd(cfg, seqlens: list[int]) -> int:
    s2 = sum(n * n for n in seqlens)
    return sum(4 * s2 * t.width * t.depth for t in (cfg.encoder, cfg.decoder))


def train_flops(cfg, seqlens: list[int]) -> dict:
    n = sum(seqlens)
    linear = 6 * matmul_params_per_token(cfg) * n
    attn = 3 * attention_flops_fwd(cfg, seqlens)
    return {"linear": linear, "attention": attn, "total": linear + attn}


def measure_cpu_peak(size: int = 2048, reps: int = 5) -> float:
    """Best fp32 FLOP/s of a size^3 matmul on this machine's torch (all its threads)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * size ** 3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ------------------------------------------------------------------ helpers

def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _reset_hwm() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS


class Memory:
    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_hwm()
            self.rss0 = proc_status_bytes("VmRSS")

    def peak(self) -> dict:
        if self.device.type == "cuda":
            return {"kind": "cuda max_memory_allocated", "peak_mib": torch.cuda.max_memory_allocated() / 2**20}
        hwm, rss0 = proc_status_bytes("VmHWM"), self.rss0
        return {"kind": "cpu VmHWM over the timed steps (process-wide resident set)",
                "peak_mib": hwm / 2**20 if hwm else None,
                "growth_over_step_start_mib": (hwm - rss0) / 2**20 if hwm and rss0 else None}


# ------------------------------------------------------------------ training step

def count_host_syncs(step, device) -> dict:
    """Run ``step`` once under CUDA's sync debug mode: every op that makes the host wait on the
    device warns. Returns the count and the distinct call sites."""
    if device.type != "cuda":
        return {"checked": False, "why": "CUDA only"}
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "called a synchronizing" in str(w.message)]
    return {"checked": True, "count": len(where), "where": sorted(set(where))[:20],
            "note": "torch's sync debug mode is a prototype: it does not catch every synchronizing op"}


def profile_step(step, device, out_dir: Path, name: str) -> dict:
    """One step under torch.profiler: the top kernels by device time, a Chrome trace, and the split of
    the step's time into parts (``step_split.split``: perceptual loss, optimizer, ...)."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts, record_shapes=False) as prof:
        step()
        sync(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = list(prof.key_averages())
    (out_dir / f"profile_{name}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    prof.export_chrome_trace(str(out_dir / f"trace_{name}.json"))
    total = sum(getattr(e, key) for e in events)
    top = sorted(events, key=lambda e: -getattr(e, key))[:25]
    return {"sort": key, "total_us": total, "split": split(prof, device.type == "cuda"),
            "top": [{"name": e.key[:120], "us": getattr(e, key), "share": getattr(e, key) / total if total else 0,
                     "calls": e.count} for e in top]}


def bench_train(engine, batch: PackedBatch, objective, run: RunConfig, args, device) -> dict:
    """Time the trainer's ``micro_step`` (one micro-batch per optimizer step)."""
    noise = torch.Generator(device).manual_seed(args.seed + 1)
    amp = precision(run, device)

    def step():
        return micro_step(engine, objective, batch, [{}] * batch.num_samples, ("rec",), noise, amp)["total"]

    for _ in range(args.warmup):
        step()
    sync(device)
    mem = Memory(device)
    mem.start()
    times = []
    for _ in range(args.steps):
        sync(device)
        t = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t)
    out = {"step_times_s": times, "step_s": statistics.median(times), "memory": mem.peak(),
           "final_loss": float(loss.detach()),
           "optimizer": type(torch_optimizer(engine)).__module__ + "." + type(torch_optimizer(engine)).__name__,
           "host_syncs_per_step": count_host_syncs(step, device)}
    if args.profile:  # after the timing: labels the parts, and adds the trainer's EMA update to the step
        ema = EMA(engine.module, run.optim.ema_decay)
        out["profile_labels"] = labels(engine, objective, ema)

        def step_with_ema():
            step()
            ema.update(engine.module, 1)
        step_with_ema()  # the hooks' and the EMA's first call, outside the profile
        out["profile"] = profile_step(step_with_ema, device, Path(args.profile),
                                      f"{args.tag}_{engine.module.cfg.encoder.width}")
    return out


# ------------------------------------------------------------------ packed vs padded

def padded_transformer(transformer, x: torch.Tensor, key_mask: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
    """The blocks of ``model.transformer.Transformer`` on a padded layout: x [B, L, width],
    key_mask [B, L] bool (True = real), cos/sin [B, L, D/2]; attention is masked SDPA."""
    b, L, width = x.shape
    mask = key_mask[:, None, None, :]  # [B, 1, 1, L] broadcast over heads and queries
    for blk in transformer.blocks:
        a = blk.attn
        h = blk.norm1(x)
        q, k, v = a.qkv(h).view(b, L, a.heads, 3, a.head_dim).unbind(3)  # each [B, L, h, D]
        if a.q_norm is not None:
            q, k = a.q_norm(q), a.k_norm(k)
        if transformer.rope:
            q = apply_rope(q.flatten(0, 1), cos.flatten(0, 1), sin.flatten(0, 1)).view(b, L, a.heads, a.head_dim)
            k = apply_rope(k.flatten(0, 1), cos.flatten(0, 1), sin.flatten(0, 1)).view(b, L, a.heads, a.head_dim)
        q, k = q.to(v.dtype), k.to(v.dtype)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        x = x + a.proj(o.transpose(1, 2).reshape(b, L, width))
        x = x + blk.mlp(blk.norm2(x))
    return x


def bench_packed_vs_padded(model, batch: PackedBatch, args, device) -> dict:
    enc = model.encoder.transformer
    cfg = model.cfg.encoder
    lens = batch.seqlens
    n, b, lmax = sum(lens), len(lens), max(lens)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    x = torch.randn(n, cfg.width, generator=g).to(device)
    cos, sin = model.rope(batch, cfg.head_dim)
    cu = batch.cu_seqlens

    # The padded copy of the same rows.
    ids = batch.sample_ids().to(device)
    pos = torch.arange(n, device=device) - cu.to(device).long()[ids]
    xp = x.new_zeros(b, lmax, cfg.width)
    xp[ids, pos] = x
    key_mask = torch.zeros(b, lmax, dtype=torch.bool, device=device)
    key_mask[ids, pos] = True
    cosp = cos.new_zeros(b, lmax, cos.shape[-1])
    sinp = sin.new_zeros(b, lmax, sin.shape[-1])
    cosp[ids, pos], sinp[ids, pos] = cos, sin
    cosp[~key_mask] = 1.0  # identity rotation on padding

    gy = torch.randn(n, cfg.width, generator=g).to(device)
    gyp = xp.new_zeros(b, lmax, cfg.width)
    gyp[ids, pos] = gy  # no gradient flows from padding rows

    padded_fn = torch.compile(padded_transformer, dynamic=False) if args.compile else padded_transformer

    def packed():
        xi = x.detach().requires_grad_()
        with autocast(device):
            y = enc(xi, cu, lmax, (cos, sin))
        y.backward(gy.to(y.dtype))

    def padded():
        xi = xp.detach().requires_grad_()
        with autocast(device):
            y = padded_fn(enc, xi, key_mask, cosp, sinp)
        y.backward(gyp.to(y.dtype))

    # Same function, same weights: check the outputs agree on the real rows (forward only).
    with torch.no_grad(), autocast(device):
        err = (padded_transformer(enc, xp, key_mask, cosp, sinp)[ids, pos].float()
               - enc(x, cu, lmax, (cos, sin)).float()).abs().max().item()

    def timeit(fn):
        for _ in range(args.warmup):
            fn()
        model.zero_grad(set_to_none=True)
        ts = []
        for _ in range(args.steps):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
        return ts

    # Alternate the two so slow drift of a shared machine hits both alike.
    tp, tq = [], []
    for _ in range(2):
        tp += timeit(packed)
        tq += timeit(padded)
    mp, mq = statistics.median(tp), statistics.median(tq)
    probe = torch.empty(1, cfg.head_dim, device=device,
                        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return {"scope": "encoder Transformer blocks (attention + MLP, RoPE), forward + backward",
            "packed_attention_backend": get_attention_backend(probe, model.cfg.attention)[0],
            "padded_attention": "F.scaled_dot_product_attention, bool key-padding mask [B, 1, 1, Lmax]",
            "compiled": bool(args.compile),
            "samples": b, "tokens": n, "max_len": lmax, "padded_tokens": b * lmax,
            "padding_fraction": 1 - n / (b * lmax),
            "packed_times_s": tp, "padded_times_s": tq, "packed_s": mp, "padded_s": mq,
            "padded_over_packed": mq / mp, "max_abs_diff_forward": err}


# ------------------------------------------------------------------ report

def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": p.name, "memory_gib": p.total_memory / 2**30,
                "count": torch.cuda.device_count()}
    return cpu_info()


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, **git_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    try:
        import flash_attn  # noqa: PLC0415 - flash-attn, an optional GPU kernel
        out["flash_attn"] = flash_attn.__version__
    except Exception:  # noqa: BLE001 - not installed, or a build for another torch/CUDA
        pass
    return out


def table(results: list[dict]) -> str:
    rows = ["| model | params (M) | tokens | samples | step (s) | tokens/s | samples/s | TFLOP/step | "
            "MFU | peak mem (MiB) | padded/packed | padding |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['tokens']} | {r['error']} |")
            continue
        pp = r.get("packed_vs_padded") or {}
        rows.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['tokens']} | {r['samples']} | {r['step_s']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {r['samples_per_s']:.2f} | {r['flops']['total'] / 1e12:.3f} | "
            f"{100 * r['mfu']:.1f}% | {r['memory']['peak_mib']:.0f} | "
            + (f"{pp['padded_over_packed']:.2f}x | {100 * pp['padding_fraction']:.0f}% |" if pp else "- | - |"))
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,base", help="comma-separated presets: tiny, base, so400m")
    p.add_argument("--depth", type=int, help="override encoder and decoder depth (to shrink so400m on CPU)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens in the packed batch (default 1024)")
    p.add_argument("--min-res", type=int, default=64)
    p.add_argument("--max-res", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (default 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    p.add_argument("--lpips", action="store_true", help="the paper's LPIPS + Gram weights in the objective")
    p.add_argument("--trunk-weights", help="with --lpips: the perceptual trunk file (loss.trunk_weights; default: "
                                           "torch hub cache, then stlpips-pytorch)")
    p.add_argument("--perceptual-size", type=int,
                   help="loss.perceptual_size: the side the perceptual terms see (default 224; smaller for CPU tests)")
    p.add_argument("--peak-tflops", type=float,
                   help="device peak, TFLOP/s (default: 989 on CUDA = H100 bf16 dense; CPU: measured fp32 matmul)")
    p.add_argument("--no-padded", action="store_true", help="skip the packed vs padded comparison")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (training.parallelize.compile_blocks), as "
                        "parallel.compile=true does in training; the padded comparison compiles its function too")
    p.add_argument("--attention", default="auto", help="model.attention: auto, cudnn, flash_attn, torch_varlen or sdpa")
    p.add_argument("--fused-qk-rope", action="store_true", help="model.fused_qk_rope: the Triton QK-norm + RoPE kernel")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="parallel.activation_checkpointing (for token budgets whose activations do not fit)")
    p.add_argument("--profile", metavar="DIR", help="profile one step per model: top kernels in the JSON, "
                                                    "the table and a Chrome trace in DIR")
    p.add_argument("--tag", default="", help="label stored in the JSON and in output names (e.g. eager, compiled)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", help="JSON path (default benchmarks/results/train_step_<device>.json)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    distributed.init()  # a world of one: the trainer's DeepSpeed engine needs a process group
    dims = init_parallel(seed=args.seed)
    started, load_start = datetime.now(UTC), os.getloadavg()
    dev = device_info(device)
    if args.peak_tflops:
        peak, peak_src = args.peak_tflops * 1e12, "--peak-tflops"
    elif device.type == "cuda":
        peak, peak_src = 989e12, "default: H100 SXM bf16 dense (989 TFLOP/s)"
    else:
        peak, peak_src = measure_cpu_peak(), "measured: best of 5 fp32 2048^3 torch matmuls in this process"
    print(f"device {dev['name']}; peak {peak / 1e12:.3f} TFLOP/s ({peak_src})", flush=True)

    sizes = image_sizes(args.tokens, args.seed, args.min_res, args.max_res)
    batch_cpu = packed_batch(sizes, args.seed)
    batch = batch_cpu.to(device)
    # The trainer's objective. The CLIP term needs a teacher and has its own benchmark (clip_term.py).
    loss_cfg = (LossConfig(clip_weight=0.0, trunk_weights=args.trunk_weights) if args.lpips else
                LossConfig(lpips_weight=0.0, gram_weight=0.0, clip_weight=0.0))
    if args.perceptual_size:
        loss_cfg.perceptual_size = args.perceptual_size
    objective = Objective(loss_cfg).to(device)

    results = []
    for name in args.models.split(","):
        cfg = preset(name)
        cfg.attention, cfg.fused_qk_rope = args.attention, args.fused_qk_rope
        if args.depth:
            cfg.encoder.depth = cfg.decoder.depth = args.depth
        torch.manual_seed(args.seed)
        model = AToken(cfg)
        params = sum(p.numel() for p in model.parameters())
        run = RunConfig(model=cfg, steps=10**6, seed=args.seed)
        run.optim.warmup_steps = 0  # every timed step moves the weights
        run.parallel.compile = args.compile
        run.parallel.activation_checkpointing = args.activation_checkpointing
        engine = parallelize(model, dims, run, device)
        prepare_loss(objective, run, device)  # the perceptual net as the trainer runs it
        flops = train_flops(cfg, batch.seqlens)
        t0 = time.perf_counter()
        try:
            r = bench_train(engine, batch, objective, run, args, device)
        except torch.cuda.OutOfMemoryError as e:  # record it and go on with the next model
            print(f"{name}: out of memory at {args.tokens} tokens: {str(e).splitlines()[0]}", flush=True)
            results.append({"model": name, "params": params, "tokens": batch.num_tokens, "error": "CUDA OOM"})
            del model, engine
            torch.cuda.empty_cache()
            continue
        step = r["step_s"]
        res = {"model": name, "depth": cfg.encoder.depth, "params": params,
               "matmul_params_per_token": matmul_params_per_token(cfg), "tokens": batch.num_tokens,
               "samples": batch.num_samples, **r, "tokens_per_s": batch.num_tokens / step,
               "samples_per_s": batch.num_samples / step, "flops": flops,
               "achieved_tflops": flops["total"] / step / 1e12, "mfu": flops["total"] / (step * peak)}
        if not args.no_padded:
            res["packed_vs_padded"] = bench_packed_vs_padded(model, batch, args, device)
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        pp = res.get("packed_vs_padded")
        print(f"{name}: step {step:.3f}s, {res['tokens_per_s']:.0f} tok/s, MFU {100 * res['mfu']:.1f}%"
              + (f", padded/packed {pp['padded_over_packed']:.2f}x (padding {100 * pp['padding_fraction']:.0f}%,"
                 f" max diff {pp['max_abs_diff_forward']:.1e})" if pp else ""), flush=True)
        del model, engine
        torch._dynamo.reset()  # each model compiles afresh (the blocks of all models share one code object)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    report = {
        "benchmark": "train_step", "timestamp": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]), "device": dev,
        "load_average_1_5_15": {"start": list(load_start), "end": list(os.getloadavg())},
        "versions": versions(),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "compiled_blocks": bool(args.compile), "tag": args.tag,
        # so400m's head_dim (72): the cuDNN backend's eligibility depends on it.
        "attention_backend": get_attention_backend(
            torch.empty(1, 72, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32),
            args.attention)[0],
        "fused_qk_rope": args.fused_qk_rope, "activation_checkpointing": args.activation_checkpointing,
        "peak_flops": peak, "peak_flops_source": peak_src,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "image_sizes": [f"{h}x{w}" for h, w in sizes], "seqlens": batch.seqlens,
        "flops_counted": "6*N*matmul weights per token (patch embed, qkv, proj, fc1, fc2, latent, up, head) + "
                         "3 * 4*sum(L_i^2)*width per layer; norms, RoPE, GELU, loss, LPIPS, optimizer not counted",
        "results": results,
    }
    suffix = f"_{args.tag}" if args.tag else ""
    out = write_report(report, args.out, f"train_step_{device_slug(dev)}{suffix}.json")
    print(table(results))
    print(f"wrote {out}")
    distributed.shutdown()


if __name__ == "__main__":
    main()

"""How long a checkpoint save blocks the training step: synchronous against background writing,
in one run, on the trainer's own engine and checkpoint code.

    python benchmarks/checkpoint_stall.py                       # CPU: base, fp32, ZeRO-1
    python benchmarks/checkpoint_stall.py --model tiny --reps 1  # quick

One process (a world of one): the plain model (``--model``, optionally ``--depth`` blocks per
stack) built and wrapped as ``training.parallelize.parallelize`` does, one optimizer step of the
trainer's ``micro_step`` on a small packed batch so that AdamW's moments exist, and the EMA. Then
``--reps`` rounds, each of one synchronous save (``checkpoint.Writer(background=False)``: the
snapshot, every file written and fsynced, the commit) and one background save (the trainer's
default: the step waits only for the snapshot), alternating. Reported per mode: the seconds
``checkpoint.save`` blocked the caller (median and every sample); for the background mode also
the seconds until its write was durable and committed; the bytes the checkpoint holds on disk.

Writes ``benchmarks/results/checkpoint_stall_<device>.json`` (``--out`` changes it), with the
command, the machine and its load average before and after (other processes share the CPUs).
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from atoken.model import AToken, preset
from atoken.model.losses import LossConfig
from atoken.model.objective import Objective
from atoken.training import checkpoint, distributed
from atoken.training.config import RunConfig
from atoken.training.ema import EMA
from atoken.training.parallelize import init_parallel, parallelize
from atoken.training.train import micro_step
from common import cpu_info, device_slug, git_state, image_sizes, packed_batch, write_report


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="base", help="model preset (tiny, base, so400m)")
    p.add_argument("--depth", type=int, default=None, help="blocks per encoder/decoder stack (default: the preset's)")
    p.add_argument("--reps", type=int, default=3, help="rounds of one synchronous and one background save")
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary folder in $TMPDIR)")
    p.add_argument("--out", default=None, help="result JSON (default: results/checkpoint_stall_<device>.json)")
    args = p.parse_args(argv)

    load_before = load_average()
    info = distributed.init()
    dims = init_parallel(seed=0)
    cfg = preset(args.model)
    if args.depth:
        cfg.encoder.depth = cfg.decoder.depth = args.depth
    torch.manual_seed(0)
    model = AToken(cfg)
    run = RunConfig(model=cfg, steps=10**6, precision="fp32")
    engine = parallelize(model, dims, run, info.device)
    ema = EMA(model, 0.999)
    params = sum(p.numel() for p in model.parameters())
    # One optimizer step, so the optimizer's moments exist (and are saved) as in a running job.
    loss = LossConfig(lpips_weight=0.0, gram_weight=0.0, clip_weight=0.0, perceptual_size=32)
    batch = packed_batch(image_sizes(64, 0, 32, 64), 0).to(info.device)
    micro_step(engine, Objective(loss).to(info.device), batch, [{}] * batch.num_samples, ("rec",),
               torch.Generator(info.device).manual_seed(0), nullcontext())
    ema.update(model, 1)
    noise = torch.Generator().manual_seed(1)

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="checkpoint_stall_"))
    writers = {"sync": checkpoint.Writer(background=False), "async": checkpoint.Writer()}
    stalls: dict[str, list[float]] = {"sync": [], "async": []}
    written: list[float] = []
    step, nbytes = 1, None
    for _ in range(args.reps):
        for mode, writer in writers.items():
            client = {"step": step, "data": {}, "config": run.to_dict()}
            t0 = time.perf_counter()
            path = checkpoint.save(engine, ema, dims, {"noise": noise}, client, root, step, 1, writer)
            stalls[mode].append(time.perf_counter() - t0)
            writer.wait()
            if mode == "async":
                written.append(time.perf_counter() - t0)
            nbytes = disk_bytes(path)
            print(f"{mode:5s} save of step {step}: blocked {stalls[mode][-1]:.3f} s, {nbytes / 1e9:.2f} GB",
                  flush=True)
            step += 1

    sync_s, async_s = statistics.median(stalls["sync"]), statistics.median(stalls["async"])
    device = cpu_info() if info.device.type == "cpu" else {"type": "cuda", "name": torch.cuda.get_device_name()}
    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "device": device, **git_state(), "torch": torch.__version__,
        "load_average_before": load_before, "load_average_after": load_average(),
        "model": args.model, "depth": args.depth or cfg.encoder.depth, "parameters": params,
        "precision": "fp32", "zero_stage": run.parallel.zero_stage, "reps": args.reps,
        "bytes_written": nbytes,
        "stall_s_sync": sync_s, "stall_s_async": async_s, "async_over_sync": async_s / sync_s,
        "async_write_done_s": statistics.median(written),
        "samples": {"stall_s_sync": stalls["sync"], "stall_s_async": stalls["async"], "async_write_done_s": written},
        "what": "seconds checkpoint.save blocked the caller: sync writes, fsyncs and commits before returning; "
                "async returns after the snapshot (the write and commit run in the background thread)",
    }
    out = write_report(report, args.out, f"checkpoint_stall_{device_slug(device)}.json")
    print(f"sync {sync_s:.3f} s, async {async_s:.3f} s ({async_s / sync_s:.3f} of sync), "
          f"{nbytes / 1e9:.2f} GB a checkpoint -> {out}")
    distributed.shutdown()


if __name__ == "__main__":
    main()

"""Time the image reconstruction loss (model/losses.py ``ReconstructionLoss``: L1 + LPIPS + Gram, no
CLIP term) per micro-batch, forward + backward to the reconstruction, against the loss of another
revision in the same run.

    python benchmarks/perceptual_loss.py --baseline 80e0bbe                    # CPU: the demo's micro-batch
    python benchmarks/perceptual_loss.py --tokens 16384 --size 224 --max-res 512 --compile   # a GPU, stage 1

The micro-batch: random-pixel images sized by the training resolution policy (``common.image_sizes``,
exactly ``--tokens`` tokens between ``--min-res`` and ``--max-res``; the defaults are the demo's
512 tokens of 64-128 px, LPIPS/Gram at 64 px with weights 1 and 10), a "reconstruction" = the images
plus noise, a leaf that takes gradients (the decoder's output). Timed, rounds interleaved so that
a change of machine load hits every case alike, median of ``--steps`` after ``--warmup``:

- ``current``: this tree's loss (``--compile``: with ``training.parallelize.prepare_loss``, which
  makes the trunk channels_last and compiles it on CUDA);
- ``current_eager`` (with ``--compile``): the same loss without ``prepare_loss``;
- ``baseline``: ``model/losses.py`` of ``--baseline REV`` (git), with this tree's perceptual net;
- ``zero_weights``: this tree's loss with LPIPS and Gram weighted 0 (the net does not run);
- ``image_pairs_current`` / ``image_pairs_baseline``: the part that batching changed alone, the
  unpatchify and resize of ``image_pairs`` (forward and backward).

Writes ``benchmarks/results/perceptual_loss_<device>.json`` (``--out`` changes it).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import torch

from atoken.model.losses import LossConfig, ReconstructionLoss, image_pairs
from atoken.training.parallelize import prepare_loss
from common import cpu_info, device_slug, git_state, image_sizes, packed_batch, resolve_device, sync, write_report

ROOT = Path(__file__).resolve().parent.parent


def losses_module_at(rev: str):
    """``model/losses.py`` as of git ``rev``, imported as a sibling of ``atoken.model.losses`` (its
    relative imports resolve to this tree's modules)."""
    text = subprocess.run(["git", "show", f"{rev}:model/losses.py"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout
    path = Path(tempfile.mkdtemp()) / "losses_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("atoken.model.losses_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up there
    spec.loader.exec_module(module)
    return module


def ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a / b: robust to load that changes between rounds."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", help="git revision whose model/losses.py is timed beside this tree's")
    p.add_argument("--tokens", type=int, default=512, help="tokens of the micro-batch (default 512, the demo's)")
    p.add_argument("--min-res", type=int, default=64)
    p.add_argument("--max-res", type=int, default=128)
    p.add_argument("--size", type=int, default=64, help="LPIPS/Gram resolution (default 64, the demo's; stage 1: 224)")
    p.add_argument("--compile", action="store_true",
                   help="prepare_loss with parallel.compile (CUDA: channels_last, compiled)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", help="JSON path (default benchmarks/results/perceptual_loss_<device>.json)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    info = cpu_info() if device.type == "cpu" else {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    sizes = image_sizes(args.tokens, args.seed, args.min_res, args.max_res)
    batch = packed_batch(sizes, args.seed).to(device)
    g = torch.Generator().manual_seed(args.seed + 1)
    recon = (batch.features.cpu() + 0.1 * torch.randn(batch.features.shape, generator=g)).to(device)
    recon.requires_grad_(True)

    weights = {"lpips_weight": 1.0, "gram_weight": 10.0, "clip_weight": 0.0, "perceptual_size": args.size}
    current = ReconstructionLoss(LossConfig(**weights)).to(device)
    prepare_loss(current, SimpleNamespace(parallel=SimpleNamespace(compile=args.compile)), device)
    cases = {"current": current,
             **({"current_eager": ReconstructionLoss(LossConfig(**weights))} if args.compile else {}),
             "zero_weights": ReconstructionLoss(LossConfig(**{**weights, "lpips_weight": 0.0, "gram_weight": 0.0}))}
    if args.baseline:
        old = losses_module_at(args.baseline)
        cases["baseline"] = old.ReconstructionLoss(old.LossConfig(**weights)).to(device)
    cases = {k: v.to(device) for k, v in cases.items()}

    times = {k: [] for k in cases}
    for r in range(args.warmup + args.steps):
        for name, loss in cases.items():
            recon.grad = None
            sync(device)
            t0 = time.perf_counter()
            terms = loss(batch, recon)
            (terms["l1"] + weights["lpips_weight"] * terms["lpips"] + weights["gram_weight"] * terms["gram"]).backward()
            sync(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    # The part batching changed alone: unpatchify + resize (image_pairs), forward and backward.
    pairs_fns = {"current": image_pairs, **({"baseline": old.image_pairs} if args.baseline else {})}
    for r in range(args.warmup + args.steps):
        for name, fn in pairs_fns.items():
            recon.grad = None
            sync(device)
            t0 = time.perf_counter()
            fn(batch, recon, args.size)[1].sum().backward()
            sync(device)
            if r >= args.warmup:
                times.setdefault(f"image_pairs_{name}", []).append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>20}: {v * 1e3:8.1f} ms per micro-batch ({len(sizes)} images, {args.tokens} tokens, "
              f"{args.size} px)", flush=True)
    if "baseline" in med:
        for k in ("", "image_pairs_"):
            print(f"{k}baseline / {k}current: {med[k + 'baseline'] / med[k + 'current']:.2f}x (medians); "
                  f"median of the rounds' ratios {ratio(times[k + 'baseline'], times[k + 'current']):.2f}x")
    report = {"benchmark": "perceptual_loss", "device": info, "load_average": os.getloadavg(),
              "torch": torch.__version__, "python": platform.python_version(), **git_state(),
              "command": shlex.join([sys.executable, *sys.argv]),
              "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "settings": {"tokens": args.tokens, "images": len(sizes), "sizes": sizes, "size": args.size,
                           "compile": args.compile, "baseline": args.baseline, "warmup": args.warmup,
                           "steps": args.steps, "threads": torch.get_num_threads()},
              "median_s": med, "times_s": times}
    print(f"wrote {write_report(report, args.out, f'perceptual_loss_{device_slug(info)}.json')}")


if __name__ == "__main__":
    main()

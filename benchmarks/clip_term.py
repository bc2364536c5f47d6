"""Time the CLIP/feature term of image reconstruction (model/losses.py ``feature_loss``) per micro-batch,
against the rest of the image reconstruction loss.

    python benchmarks/clip_term.py                          # CPU: teachers base and so400m, 1024 tokens
    python benchmarks/clip_term.py --teachers so400m --tokens 16384   # a GPU

The micro-batch: random-pixel images sized by the training resolution policy (``common.image_sizes``,
exactly ``--tokens`` tokens), a "reconstruction" = the images plus noise, a leaf that takes gradients
(the decoder's output). Timed, each forward + backward to the reconstruction, median of ``--steps``
after ``--warmup``:

- ``rest``: ``ReconstructionLoss`` with ``clip_weight=0`` (L1 + LPIPS + Gram at ``--size``);
- ``with_clip``: the same plus the CLIP term through a teacher of the named shape (``Siglip2ImageTower``:
  the preset's encoder, RoPE off, random weights: the cost does not depend on their values);
- ``clip``: their difference, the term's cost per micro-batch of this size.

Writes ``benchmarks/results/clip_term_<device>.json`` (``--out`` changes it).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime

import torch

from atoken.model import preset
from atoken.model.losses import LossConfig, ReconstructionLoss
from atoken.model.siglip2 import Siglip2ImageTower
from common import cpu_info, device_slug, git_state, image_sizes, packed_batch, resolve_device, sync, write_report


def timed(fn, warmup: int, steps: int, device: torch.device) -> float:
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default="base,so400m", help="comma-separated presets of the teacher's shape")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the micro-batch (default 1024)")
    p.add_argument("--size", type=int, default=224, help="resolution of LPIPS, Gram and the CLIP term (default 224)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", help="JSON path (default benchmarks/results/clip_term_<device>.json)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    info = cpu_info() if device.type == "cpu" else {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    sizes = image_sizes(args.tokens, args.seed, 64, 512)
    batch = packed_batch(sizes, args.seed).to(device)
    g = torch.Generator().manual_seed(args.seed + 1)
    recon = (batch.features.cpu() + 0.1 * torch.randn(batch.features.shape, generator=g)).to(device)
    recon.requires_grad_(True)
    rest_loss = ReconstructionLoss(LossConfig(perceptual_size=args.size, clip_weight=0.0)).to(device)
    clip_loss = ReconstructionLoss(LossConfig(perceptual_size=args.size)).to(device)

    def step(loss, teacher=None):
        recon.grad = None
        sum(loss(batch, recon, teacher).values()).backward()  # the weights do not change the cost

    rest = timed(lambda: step(rest_loss), args.warmup, args.steps, device)
    rows = []
    for name in args.teachers.split(","):
        cfg = dataclasses.replace(preset(name), encoder_rope=False)
        teacher = Siglip2ImageTower(cfg).to(device)
        with_clip = timed(lambda: step(clip_loss, teacher), args.warmup, args.steps, device)  # noqa: B023, F821 - run now
        rows.append({"teacher": name, "teacher_params": sum(p.numel() for p in teacher.parameters()),
                     "with_clip_s": with_clip, "clip_s": with_clip - rest, "clip_over_rest": (with_clip - rest) / rest})
        print(f"teacher {name:>7}: rest {rest:.3f} s, with the CLIP term {with_clip:.3f} s: "
              f"+{with_clip - rest:.3f} s per micro-batch ({(with_clip - rest) / rest:.1f}x the rest)", flush=True)
        del teacher
    report = {"benchmark": "clip_term", "device": info, "load_average": os.getloadavg(), "torch": torch.__version__,
              "python": platform.python_version(),
              **git_state(), "command": shlex.join([sys.executable, *sys.argv]),
              "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "settings": {"tokens": args.tokens, "images": len(sizes), "sizes": sizes, "size": args.size,
                           "warmup": args.warmup, "steps": args.steps},
              "rest_s": rest, "teachers": rows}
    print(f"wrote {write_report(report, args.out, f'clip_term_{device_slug(info)}.json')}")


if __name__ == "__main__":
    main()

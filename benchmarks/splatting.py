"""Time the Gaussian renderers and compare them on one scene: the pure-PyTorch rasterizer (any
device, per tile size) and, on CUDA with gsplat importable, ``gsplat.rasterization``.

    python benchmarks/splatting.py                                   # CPU: torch backend, small scene
    python benchmarks/splatting.py --grid 64 --per-voxel 32 --size 512 --views 8   # a GPU

The scene is what the Gaussian decoder emits: the occupied voxels of a spherical shell (radius 0.4,
one voxel thick) in the ``--grid``^3 cube, ``--per-voxel`` Gaussians each, made by
``GaussianDecoder.activate`` from random raw outputs (N(0, 0.5^2), seeded), so positions, scales,
rotations, opacities and colours have the decoder's bounds and spread. ``--views`` cameras orbit
at distance 1.6 looking at the centre; the focal length makes the unit cube fill ~80% of the image.

Per backend (and per ``--tiles`` tile size for the torch one): the median over ``--repeats`` timed
runs (after one warm-up) of a forward render and of forward + L1 against a fixed random target +
backward; the device is synchronised around each. Memory: CUDA ``max_memory_allocated`` over the
runs, CPU the growth of the process' peak resident set (``VmHWM``).

Agreement: every other result against the reference (gsplat where it ran, else the first torch
tile size): max / mean abs difference of the images and alphas, and per parameter the cosine
similarity and relative L2 difference of the L1 gradients.

Writes ``benchmarks/results/splatting_<device>.json`` (``--out`` changes it).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from atoken.data_pipeline.render import look_at
from atoken.model.gaussians import GaussianDecoder, Gaussians, gaussian_decoder_preset
from atoken.model.splatting import HAVE_GSPLAT, render_gsplat, render_torch
from common import cpu_info, device_slug, git_state, proc_status_bytes, sync, write_report

PARAMS = ("means", "scales", "quats", "opacities", "colors")


def shell_scene(grid: int, per_voxel: int, seed: int, device: torch.device) -> Gaussians:
    """Decoder-like Gaussians on the voxels of a sphere shell of radius 0.4."""
    ijk = torch.stack(torch.meshgrid(*[torch.arange(grid)] * 3, indexing="ij"), -1).reshape(-1, 3)
    centre = (ijk + 0.5) / grid - 0.5
    ijk = ijk[((centre.norm(dim=-1) - 0.4).abs() < 0.5 / grid)]
    coords = torch.cat([torch.zeros(len(ijk), 1, dtype=torch.long), ijk], 1)
    cfg = dataclasses.replace(gaussian_decoder_preset("tiny"), resolution=grid, gaussians_per_voxel=per_voxel)
    dec = GaussianDecoder(cfg)
    raw = 0.5 * torch.randn(len(coords), per_voxel * 14, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        g = dec.activate(raw, coords, torch.tensor([0, len(coords)], dtype=torch.int32))
    return g.to(device)


def orbit(views: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.linspace(0, 2 * math.pi, views + 1)[:-1]
    eyes = torch.stack([1.6 * a.cos(), torch.full_like(a, 0.4), 1.6 * a.sin()], -1)
    mats = torch.from_numpy(look_at(eyes.numpy(), up=(0.0, -1.0, 0.0)))
    f = 0.8 * size / 2 / (0.5 * math.sqrt(3) / 1.6)  # the cube's circumsphere fills 80% of the image
    k = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])
    return mats.to(device), k.expand(views, 3, 3).contiguous().to(device)


def measure(fn, g: Gaussians, cams, size: int, target: torch.Tensor, repeats: int, device: torch.device) -> dict:
    bg = torch.zeros(3, device=device)
    leaves = Gaussians(*(getattr(g, p).detach().clone().requires_grad_(True) for p in PARAMS))

    def fwd():
        with torch.no_grad():
            return fn(leaves, *cams, size, size, bg)

    def fwd_bwd():
        for p in PARAMS:
            getattr(leaves, p).grad = None
        img, _ = fn(leaves, *cams, size, size, bg)
        (img - target).abs().mean().backward()

    def timed(step):
        step()  # warm-up (gsplat compiles its kernels on first use)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        hwm0 = proc_status_bytes("VmHWM")
        times = []
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t)
        mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
               else (proc_status_bytes("VmHWM") or 0) - (hwm0 or 0))
        return statistics.median(times), mem / 2 ** 20

    fwd_s, fwd_mib = timed(fwd)
    bwd_s, bwd_mib = timed(fwd_bwd)
    img, alpha = fwd()
    return {"forward_s": fwd_s, "forward_backward_s": bwd_s, "forward_peak_mib": fwd_mib,
            "forward_backward_peak_mib": bwd_mib, "_img": img, "_alpha": alpha,
            "_grads": {p: getattr(leaves, p).grad.detach().clone() for p in PARAMS}}


def compare(res: dict, ref: dict) -> dict:
    out = {"image_max_abs": float((res["_img"] - ref["_img"]).abs().max()),
           "image_mean_abs": float((res["_img"] - ref["_img"]).abs().mean()),
           "alpha_max_abs": float((res["_alpha"] - ref["_alpha"]).abs().max()),
           "alpha_mean_abs": float((res["_alpha"] - ref["_alpha"]).abs().mean()), "grads": {}}
    for p in PARAMS:
        a, b = res["_grads"][p].flatten().double(), ref["_grads"][p].flatten().double()
        out["grads"][p] = {"cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
                           "rel_l2": float((a - b).norm() / b.norm().clamp(min=1e-30))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, default=None, help="voxels per side (default: 64 on CUDA, 32 on CPU)")
    ap.add_argument("--per-voxel", type=int, default=None, help="Gaussians per voxel (default: 32 CUDA, 8 CPU)")
    ap.add_argument("--size", type=int, default=None, help="image side in px (default: 512 CUDA, 128 CPU)")
    ap.add_argument("--views", type=int, default=None, help="cameras (default: 8 CUDA, 2 CPU)")
    ap.add_argument("--tiles", default="8,16", help="tile sizes of the torch rasterizer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    grid = args.grid or (64 if gpu else 32)
    per_voxel = args.per_voxel or (32 if gpu else 8)
    size = args.size or (512 if gpu else 128)
    views = args.views or (8 if gpu else 2)

    g = shell_scene(grid, per_voxel, args.seed, device)
    cams = orbit(views, size, device)
    target = torch.rand(views, 3, size, size, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    print(f"scene: {g.num_gaussians} Gaussians ({g.num_gaussians // per_voxel} voxels x {per_voxel}), "
          f"{views} views of {size}x{size} on {device}", flush=True)

    results: dict[str, dict] = {}
    if gpu and HAVE_GSPLAT:
        results["gsplat"] = measure(render_gsplat, g, cams, size, target, args.repeats, device)
    for tile in [int(t) for t in args.tiles.split(",")]:
        fn = lambda g_, vm, k, w, h, bg, tile=tile: render_torch(g_, vm, k, w, h, bg, tile=tile)  # noqa: E731 - a one-line local helper
        results[f"torch_tile{tile}"] = measure(fn, g, cams, size, target, args.repeats, device)
    ref_name = next(iter(results))
    for name, res in results.items():
        if name != ref_name:
            res["vs_" + ref_name] = compare(res, results[ref_name])
    for name, res in results.items():
        line = f"{name:12s} fwd {res['forward_s']:.4f} s  fwd+bwd {res['forward_backward_s']:.4f} s  " \
               f"peak {res['forward_backward_peak_mib']:.0f} MiB"
        if "vs_" + ref_name in res:
            c = res["vs_" + ref_name]
            line += f"  | vs {ref_name}: image max {c['image_max_abs']:.2e} mean {c['image_mean_abs']:.2e}, " \
                    f"grad cos min {min(v['cosine'] for v in c['grads'].values()):.5f}"
        print(line, flush=True)

    info = {"type": "cuda", "name": torch.cuda.get_device_name(device)} if gpu else cpu_info()
    try:
        import gsplat  # noqa: PLC0415 - gsplat, an optional GPU rasterizer
        gsplat_version = gsplat.__version__
    except Exception:  # noqa: BLE001 - not installed, or a build for another torch/CUDA
        gsplat_version = None
    report = {
        "benchmark": "splatting", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "device": info, "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                     "cuda": torch.version.cuda, "gsplat": gsplat_version},
        **git_state(),
        "scene": {"grid": grid, "gaussians_per_voxel": per_voxel, "gaussians": g.num_gaussians, "views": views,
                  "size": size, "seed": args.seed},
        "reference": ref_name,
        "results": {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in results.items()},
    }
    out = write_report(report, args.out, f"splatting_{device_slug(info)}.json")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

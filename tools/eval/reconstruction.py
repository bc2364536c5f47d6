"""Reconstruction evaluation of images and videos (and, through ``assets``, 3D), as ``atoken-evaluate``
describes: ``evaluate`` reads every source, scores each item and writes ``OUT/report.json`` and the grids.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from atoken.data_pipeline.images import IMAGE_EXTENSIONS
from atoken.data_pipeline.video import VIDEO_EXTENSIONS
from atoken.model.config import PATCH_HW, PATCH_T
from atoken.model.inference_dir import read_inference_config
from atoken.model.metrics import fid_from_features, lpips_pairs, psnr, ssim, ssim_pairs, to_8bit
from atoken.model.perceptual import load_perceptual
from atoken.model.tokenizer import Tokenizer
from atoken.tools.shard_writer import reason

from .assets import AssetSettings, asset_items, evaluate_assets
from .grid import Extremes
from .i3d import I3D_SIZE, I3DFeatures
from .inception import InceptionFeatures
from .inputs import (
    MIN_SIDE,
    Item,
    Source,
    each_readable,
    failed,
    input_files,
    is_mds,
    mds_items,
    read_clip,
    read_image,
    resized_clip,
)
from .report import mean_or_none, versions, write_report

if TYPE_CHECKING:
    from atoken.model.perceptual import LPIPS
    from atoken.model.tokenizer import Tokenizer

FID_NOTE = ("FID over fewer than several thousand images is biased high (it falls as N grows): compare "
            "only values computed over the same N; the paper's ImageNet rFID uses 50k images at 256x256.")
FVD_NOTE = ("FVD over few clips is biased high (it falls as N grows) and depends on the clip length: compare "
            "only values computed over the same N and frames; the usual protocol uses hundreds to thousands "
            "of 16-frame clips.")
NO_I3D = ("not computed: no --i3d-weights given (FVD needs StyleGAN-V's I3D TorchScript file "
          "i3d_torchscript.pt, which ships in no package; nothing is downloaded)")
BICUBIC_NOTE = ("the baseline a tokenizer must beat: bicubic down (antialiased) by `scale`, so that the small "
                "image holds as many values as the latent (C per 16x16 patch, per 4 frames for video), rounded "
                "to 8 bits, then bicubic up; the same metrics")


class EvaluateError(ValueError):
    """A request the tool cannot serve (e.g. 3D without a Gaussian decoder): reported, exit code 2."""


@dataclass
class VideoSettings:
    """How videos are read and reconstructed."""
    frames: int = 16
    """The first N frames of each video (0: all)."""
    max_side: int | None = None
    """Downscale so that the longer side is at most this (None: native size)."""
    tile_frames: int = 16
    """Frames per temporal tile of the reconstruction (a multiple of 4)."""
    i3d_weights: str | None = None
    """StyleGAN-V's i3d_torchscript.pt; None: no rFVD."""


def bicubic_scale(latent_channels: int, frames_per_latent: int = 1) -> float:
    """The linear downscale factor at which an image keeps as many RGB values as the tokenizer's
    latent: C values per 16x16 patch (per ``frames_per_latent`` frames: 4 for video) against 3 per
    pixel, i.e. 3 / s^2 = C / (256 * frames) -> s = 16 * sqrt(3 * frames / C)."""
    return PATCH_HW * math.sqrt(3 * frames_per_latent / latent_channels)


def bicubic_baseline(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] -> bicubic down by ``scale`` (antialiased), bicubic back up to
    H x W, rounded to 8 bits like a reconstruction: the classical codec at equal latent size."""
    h, w = x.shape[-2:]
    small = (max(1, round(h / scale)), max(1, round(w / scale)))
    down = to_8bit(torch.nn.functional.interpolate(x.float(), size=small, mode="bicubic", antialias=True))
    return to_8bit(torch.nn.functional.interpolate(down, size=(h, w), mode="bicubic", align_corners=False))



# ------------------------------------------------------------------------------------- inputs

def _scorable(name: str, x: torch.Tensor, **fields) -> Item:
    """An image [3, H, W] or clip [3, T, H, W] as an Item, unless it is smaller than SSIM's window."""
    if min(x.shape[-2:]) < MIN_SIDE:
        return failed(name, f"too small for SSIM's {MIN_SIDE}x{MIN_SIDE} window: {tuple(x.shape[-2:])}")
    return Item(name, x, **fields)


def image_item(name: str, data: bytes) -> Item:
    """An encoded image -> Item with the image at native size, or why it cannot be scored."""
    try:
        img = read_image(data)
    except Exception as e:  # noqa: BLE001 - any decode failure is reported, not raised
        return failed(name, reason(e))
    return _scorable(name, img)


def image_items(spec: str) -> Source:
    """(kind, count, items) of ``--images``: image files, or MDS shards of ``IMAGE_COLUMNS``."""
    if is_mds(spec):
        return ("mds", *mds_items(spec, lambda name, sample: image_item(name, sample["image"]), ("image",)))
    root, paths = input_files(spec, IMAGE_EXTENSIONS, "--images", "image")
    return "folder", len(paths), (image_item(p.relative_to(root).as_posix(), p.read_bytes()) for p in paths)


def first_frames(count: int) -> Callable[[int, float], np.ndarray]:
    """The frame picker of the reconstruction evaluation: the first ``count`` frames (0: all)."""
    return lambda frames, fps: np.arange(min(frames, count) if count else frames)


def video_item(name: str, data: bytes, settings: VideoSettings) -> Item:
    """An encoded video -> Item with its first ``settings.frames`` frames [3, T, H, W] in [0, 1]
    (``max_side``: downscaled), or why it cannot be scored."""
    try:
        frames, fps = read_clip(data, first_frames(settings.frames))
        clip = resized_clip(frames, max_side=settings.max_side)
    except Exception as e:  # noqa: BLE001 - any decode failure is reported, not raised
        return failed(name, reason(e))
    return _scorable(name, clip, meta={"fps": fps})


def video_items(spec: str, settings: VideoSettings) -> Source:
    """(kind, count, items) of ``--videos``: video files, or MDS shards of ``VIDEO_COLUMNS``."""
    if is_mds(spec):
        return ("mds", *mds_items(spec, lambda name, sample: video_item(name, sample["video"], settings), ("video",)))
    root, paths = input_files(spec, VIDEO_EXTENSIONS, "--videos", "video")
    return "folder", len(paths), (video_item(p.relative_to(root).as_posix(), p.read_bytes(), settings)
                                  for p in paths)


# ------------------------------------------------------------------------------------- scoring

def video_record(name: str, x: torch.Tensor, r: torch.Tensor, lpips: LPIPS) -> dict:
    """The metrics of one video [3, T, H, W] in [0, 1] against its reconstruction ``r`` (already 8-bit):
    per-frame PSNR, SSIM and LPIPS, and their means over the frames."""
    frames_x, frames_r = x.transpose(0, 1), r.transpose(0, 1)  # [T, 3, H, W]
    psnrs = [psnr(a, b) for a, b in zip(frames_x, frames_r, strict=True)]
    ssims = ssim_pairs(frames_x, frames_r, next(lpips.parameters()).device)
    lps = lpips_pairs(lpips, frames_x, frames_r)
    return {"name": name, "frames": int(x.shape[1]), "height": int(x.shape[2]), "width": int(x.shape[3]),
            "psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "lpips": float(np.mean(lps)),
            "per_frame": {"psnr": psnrs, "ssim": ssims, "lpips": lps}}


def evaluate_images(tok: Tokenizer, lpips: LPIPS, spec: str, source: Source, out: Path, limit: int | None,
                     batch_size: int, grid_k: int, grid_cell: int, inception_weights: str | None,
                     progress: bool) -> dict:
    """The image results (the report's top-level keys); writes ``grid.png``."""
    dev = tok.device
    inception = InceptionFeatures(inception_weights).to(dev)
    kind, total, items = source
    scale = bicubic_scale(tok.model.cfg.latent_channels)

    per_image, failed, extremes = [], [], Extremes(grid_k, grid_cell)
    feats_orig, feats_recon = [], []
    target = total if limit is None else min(limit, total)  # readable images to evaluate
    bar = tqdm(total=target, desc="images", unit="img", disable=not progress)  # counts every item read
    psnr_sum = 0.0

    def flush(batch: list[Item]) -> None:
        nonlocal psnr_sum
        originals = [it.data for it in batch]
        recons = [to_8bit(r) for r in tok.reconstruct(originals)]  # 8-bit, as saved
        fid_in = []
        for it, x, r in zip(batch, originals, recons, strict=True):
            xd, rd = x.to(dev), r.to(dev)
            with torch.no_grad():
                lp = lpips(xd[None] * 2 - 1, rd[None] * 2 - 1).item()
            bd = bicubic_baseline(xd[None], scale)[0]
            with torch.no_grad():
                lp_bicubic = lpips(xd[None] * 2 - 1, bd[None] * 2 - 1).item()
            rec = {"name": it.name, "height": int(x.shape[1]), "width": int(x.shape[2]),
                   "psnr": psnr(x, r), "ssim": ssim(xd, rd), "lpips": lp,
                   "bicubic": {"psnr": psnr(x, bd.cpu()), "ssim": ssim(xd, bd), "lpips": lp_bicubic}}
            per_image.append(rec)
            psnr_sum += rec["psnr"]
            extremes.add(it.name, rec["psnr"], x, r)
            fid_in.append((xd, rd))
        # Originals and reconstructions of the batch in one Inception pass (each resized to 299).
        f = inception([t for pair in fid_in for t in pair]).cpu().numpy()
        feats_orig.append(f[0::2])
        feats_recon.append(f[1::2])
        bar.update(len(batch))
        bar.set_postfix(psnr=f"{psnr_sum / len(per_image):.2f}")

    batch: list[Item] = []
    for item in items:
        if len(per_image) + len(batch) >= target:
            break
        if item.error is not None:
            failed.append({"name": item.name, "error": item.error})
            bar.write(f"unreadable: {item.name}: {item.error}")
            bar.update(1)
            continue
        batch.append(item)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    bar.close()

    n = len(per_image)
    rfid = None
    if n >= 2:
        rfid = fid_from_features(np.concatenate(feats_orig), np.concatenate(feats_recon))
    if n:
        extremes.save(out / "grid.png")
    return {
        "source": {"images": spec, "kind": kind, "items": total, "limit": limit},
        "n": n,
        "means": {"psnr": mean_or_none([p["psnr"] for p in per_image]),
                  "ssim": mean_or_none([p["ssim"] for p in per_image]),
                  "lpips": mean_or_none([p["lpips"] for p in per_image])},
        "rfid": {"value": rfid, "n": n, "note": FID_NOTE if n >= 2 else "needs at least 2 images"},
        "bicubic": {"means": {k: mean_or_none([p["bicubic"][k] for p in per_image]) for k in ("psnr", "ssim", "lpips")},
                    "scale": scale, "note": BICUBIC_NOTE},
        "unreadable": {"count": len(failed), "items": failed},
        "settings": {
            "reconstruction": "native size (padded to whole patches, cropped back), rounded to 8 bits",
            "psnr_ssim": "native size, data range 1; SSIM: Gaussian window sigma 1.5 (11 px), K1 0.01, K2 0.03",
            "inception": {"weights": inception.path, "input": "299x299, TF1 bilinear resize, (v - 128) / 128"},
            "batch_size": batch_size,
        },
        "per_image": per_image,
    }


def evaluate_videos(tok: Tokenizer, lpips: LPIPS, spec: str, source: Source, out: Path, limit: int | None,
                     settings: VideoSettings, grid_k: int, grid_cell: int, progress: bool) -> dict:
    """The report's ``video`` section; writes ``grid_video.png``."""
    i3d = I3DFeatures(settings.i3d_weights).to(tok.device) if settings.i3d_weights else None
    kind, total, items = source
    extremes = Extremes(grid_k, grid_cell)
    feats_orig, feats_recon, fvd_failed = [], [], []

    scale = bicubic_scale(tok.model.cfg.latent_channels, PATCH_T)

    def one(item: Item) -> dict:
        x = item.data
        r = to_8bit(tok.reconstruct_video(x, settings.tile_frames))
        b = bicubic_baseline(x.transpose(0, 1), scale).transpose(0, 1)  # frame by frame, [3, T, H, W]
        base = video_record(item.name, x, b, lpips)
        rec = {**video_record(item.name, x, r, lpips), "fps": item.meta.get("fps"),
               "bicubic": {k: base[k] for k in ("psnr", "ssim", "lpips")}}
        mid = x.shape[1] // 2
        extremes.add(item.name, rec["psnr"], x[:, mid], r[:, mid])
        if i3d is not None:
            try:
                f = i3d([x, r]).cpu().numpy()
            except Exception as e:  # noqa: BLE001 - e.g. a clip too short for the detector
                fvd_failed.append({"name": item.name, "error": reason(e)})
            else:
                feats_orig.append(f[:1])
                feats_recon.append(f[1:])
        return rec

    per_video, failed = each_readable(items, total, limit, "videos", "video", progress, one)
    n, n_fvd = len(per_video), len(feats_orig)
    if i3d is None:
        rfvd = {"value": None, "n": 0, "note": NO_I3D}
    else:
        value = fid_from_features(np.concatenate(feats_orig), np.concatenate(feats_recon)) if n_fvd >= 2 else None
        used = {p["name"] for p in per_video} - {f["name"] for f in fvd_failed}
        rfvd = {"value": value, "n": n_fvd, "note": FVD_NOTE if value is not None else
                "not computed: needs at least 2 clips",
                "frames": sorted({p["frames"] for p in per_video if p["name"] in used}),  # clip lengths used
                "left_out": fvd_failed}  # clips the detector failed on, with the error
    if n:
        extremes.save(out / "grid_video.png", rows="middle frame; top: original, bottom: reconstruction")
    return {
        "source": {"videos": spec, "kind": kind, "items": total, "limit": limit},
        "n": n,
        "means": {k: mean_or_none([p[k] for p in per_video]) for k in ("psnr", "ssim", "lpips")},
        "rfvd": rfvd,
        "bicubic": {"means": {k: mean_or_none([p["bicubic"][k] for p in per_video]) for k in ("psnr", "ssim", "lpips")},
                    "scale": scale, "note": BICUBIC_NOTE + " (each frame; its values per 4 frames)"},
        "unreadable": {"count": len(failed), "items": failed},
        "settings": {
            "frames": settings.frames, "max_side": settings.max_side, "tile_frames": settings.tile_frames,
            "decoding": "PyAV, the first `frames` frames (0: all); resized (bicubic, antialiased) only when the "
                        "longer side exceeds max_side; 8-bit",
            "reconstruction": "Tokenizer.reconstruct_video by temporal tiles of tile_frames, rounded to 8 bits",
            "metrics": "PSNR/SSIM/LPIPS per frame as for images, mean over frames, then mean over videos",
            "i3d": None if i3d is None else {
                "weights": i3d.path, "input": f"shorter side to {I3D_SIZE} (bilinear), centre crop "
                                              f"{I3D_SIZE}x{I3D_SIZE}, [-1, 1]; rescale=False, resize=False, "
                                              "return_features=True"},
        },
        "per_video": per_video,
    }


def evaluate(model_dir: str, images: str | None, out: str | Path, *, videos: str | None = None,
             assets: str | None = None, limit: int | None = None, device: str | None = None, batch_size: int = 4,
             grid_k: int = 8, grid_cell: int = 192, lpips_net: str = "alex", lpips_weights: str | None = None,
             inception_weights: str | None = None, video: VideoSettings | None = None,
             asset: AssetSettings | None = None, progress: bool = True, command: str | None = None) -> dict:
    """Evaluate and write ``out/report.json`` and the grids; returns the report (as written)."""
    if not (images or videos or assets):
        raise EvaluateError("nothing to evaluate: give images, videos or assets")
    started = time.time()
    video, asset = video or VideoSettings(), asset or AssetSettings()
    out = Path(out)
    if videos and (video.tile_frames < 16 or video.tile_frames % 16 or video.frames < 0):
        raise EvaluateError(f"need tile frames a positive multiple of 16 and frames >= 0, got "
                            f"{video.tile_frames} and {video.frames}")
    if assets and (asset.views < 1 or asset.resolution < 16 or asset.spp < 1):
        raise EvaluateError(f"need asset views >= 1, resolution >= 16 (one patch) and spp >= 1, got "
                            f"{asset.views}, {asset.resolution}, {asset.spp}")
    if video.i3d_weights and not Path(video.i3d_weights).is_file():
        raise FileNotFoundError(f"--i3d-weights {video.i3d_weights!r}: no such file")

    tok = Tokenizer.from_pretrained(model_dir, device=device)
    if assets and tok.model.gaussian_decoder is None:
        raise EvaluateError(f"--assets: the model in {model_dir} has no Gaussian decoder (its config.json has "
                            "no 'gaussian' section: a stage 1-2 model), so it cannot decode 3D assets")
    # Every source is listed before anything is evaluated, so that a wrong path fails at once.
    sources = {"images": image_items(images) if images else None,
               "video": video_items(videos, video) if videos else None,
               "assets": asset_items(assets, asset) if assets else None}
    out.mkdir(parents=True, exist_ok=True)
    lpips = load_perceptual(lpips_net, trunk_weights=lpips_weights).to(tok.device)
    meta = read_inference_config(model_dir)[1]
    report: dict[str, Any] = {
        "model": {"dir": str(Path(model_dir).resolve()), "weights": meta.get("weights"),
                  "dtype": meta.get("dtype"), "source": meta.get("source"),
                  "latent_channels": meta["model"].get("latent_channels"),
                  "gaussian_decoder": meta["model"].get("gaussian") is not None},
        "modalities": [m for m, spec in (("images", images), ("video", videos), ("assets", assets)) if spec],
    }
    settings: dict[str, Any] = {}
    if images:
        image_part = evaluate_images(tok, lpips, images, sources["images"], out, limit, batch_size, grid_k, grid_cell,
                                      inception_weights, progress)
        settings = image_part.pop("settings")
        report.update(image_part)
    settings.update({"lpips": {"net": lpips_net, "trunk": "shift-tolerant (ST-LPIPS)" if lpips.shift_tolerant
                               else "vanilla", "size": "native", "weights": lpips_weights},
                     "device": str(tok.device)})
    report["settings"] = settings
    if videos:
        report["video"] = evaluate_videos(tok, lpips, videos, sources["video"], out, limit, video, grid_k, grid_cell,
                                           progress)
    if assets:
        report["assets"] = evaluate_assets(tok, lpips, assets, sources["assets"], out, limit, asset, grid_k,
                                            grid_cell, progress)
    report.update({"versions": versions(("av",) * bool(videos) + ("mitsuba", "trimesh") * bool(assets)),
                   "command": command, "seconds": round(time.time() - started, 1)})
    return write_report(out, report)

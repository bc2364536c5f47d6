"""Reconstruction evaluation of 3D assets: reference renders -> voxel tokens -> encode -> decode to
Gaussians -> rendered at the reference cameras, scored per view (``atoken-evaluate --assets``)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from atoken.data_pipeline.assets import ASSET_EXTENSIONS, asset_sample, prepare_asset
from atoken.data_pipeline.config import StreamConfig
from atoken.model.metrics import lpips_pairs, psnr, ssim_pairs, to_8bit
from atoken.model.patches import features_from_values
from atoken.model.splatting import get_render_backend, render
from atoken.tools.shard_writer import reason

from .grid import Extremes
from .inputs import Item, Source, each_readable, failed, input_files, is_mds, mds_items
from .report import mean_or_none

if TYPE_CHECKING:
    from atoken.model.perceptual import LPIPS
    from atoken.model.tokenizer import Tokenizer


@dataclass
class AssetSettings:
    """How a mesh file is rendered into reference views (MDS shards carry their own)."""
    views: int = 8
    resolution: int = 256
    spp: int = 16


def asset_item(name: str, raw: Callable[[], dict]) -> Item:
    """An asset's reference renders, cameras and voxel tokens (``data_pipeline.assets.asset_sample``
    with every stored view as a target), or the reason it cannot be had."""
    try:
        sample = asset_sample({**raw(), "name": name}, np.random.default_rng(0), StreamConfig(modality="3d"))
    except Exception as e:  # noqa: BLE001 - a mesh or sample that fails to load, render or voxelise
        return failed(name, reason(e))
    return Item(name, data=sample, meta={"voxels": int(sample["coords"].shape[0])})


def asset_items(spec: str, settings: AssetSettings) -> Source:
    """(kind, count, items) of ``--assets``: mesh files (rendered here), or MDS 3D shards."""
    if is_mds(spec):
        return ("mds", *mds_items(spec, lambda name, sample: asset_item(name, lambda: dict(sample))))

    def prepared(path: Path) -> Callable[[], dict]:
        return lambda: prepare_asset(path, views=settings.views, resolution=settings.resolution,
                                     spp=settings.spp)

    root, paths = input_files(spec, ASSET_EXTENSIONS, "--assets", "mesh")
    return "folder", len(paths), (asset_item(p.relative_to(root).as_posix(), prepared(p)) for p in paths)


def asset_record(gaussians, views: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
                 lpips: LPIPS, backend: str | None = None) -> tuple[dict, torch.Tensor]:
    """Render ``gaussians`` at each camera and compare with the reference ``views`` [V, 3, H, W] in
    [0, 1] -> (record: per-view PSNR/SSIM/LPIPS and their means over views, renders [V, 3, H, W]
    rounded to 8 bits, on the CPU). Rendered over black, as the references are."""
    dev = next(lpips.parameters()).device
    n_views, _, h, w = views.shape
    with torch.no_grad():
        images, _ = render(gaussians.to(dev), viewmats.to(dev), Ks.to(dev), w, h, backend=backend)
    renders = to_8bit(images.float()).cpu()
    ref = views.float().cpu()
    psnrs = [psnr(a, b) for a, b in zip(ref, renders, strict=True)]
    ssims = ssim_pairs(ref, renders, dev)
    lps = lpips_pairs(lpips, ref, renders)
    per_view = [{"view": i, "psnr": p, "ssim": s, "lpips": lp}
                for i, (p, s, lp) in enumerate(zip(psnrs, ssims, lps, strict=True))]
    record = {"views": n_views, "height": h, "width": w, "gaussians": gaussians.num_gaussians,
              "psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "lpips": float(np.mean(lps)),
              "per_view": per_view}
    return record, renders


def evaluate_assets(tok: Tokenizer, lpips: LPIPS, spec: str, source: Source, out: Path, limit: int | None,
                     settings: AssetSettings, grid_k: int, grid_cell: int, progress: bool) -> dict:
    """The report's ``assets`` section; writes ``grid_3d.png``."""
    kind, total, items = source
    extremes = Extremes(grid_k, grid_cell)
    backend = tok.model.cfg.gaussian.render_backend

    def one(item: Item) -> dict:
        s = item.data
        coords = s["coords"]
        gaussians = tok.decode_asset(tok.encode_asset(features_from_values(s["values"]), coords), coords)
        rec, renders = asset_record(gaussians, s["views"], s["cameras"]["viewmats"], s["cameras"]["Ks"], lpips, backend)
        extremes.add(item.name, rec["psnr"], s["views"][0], renders[0])
        return {"name": item.name, "voxels": item.meta["voxels"], **rec}

    per_asset, failed = each_readable(items, total, limit, "assets", "asset", progress, one)
    n = len(per_asset)
    if n:
        extremes.save(out / "grid_3d.png", rows="first view; top: reference render, bottom: Gaussians")
    return {
        "source": {"assets": spec, "kind": kind, "items": total, "limit": limit},
        "n": n,
        "views": sum(p["views"] for p in per_asset),
        "means": {k: mean_or_none([p[k] for p in per_asset]) for k in ("psnr", "ssim", "lpips")},
        "unreadable": {"count": len(failed), "items": failed},
        "settings": {
            "references": ("stored renders of the shards" if kind == "mds" else
                           {"renderer": "Mitsuba (data_pipeline.render)", "views": settings.views,
                            "resolution": settings.resolution, "spp": settings.spp}),
            "reconstruction": "voxel tokens from all reference views -> encode_asset -> decode_asset (pixel decoder, "
                              "then the Gaussian decoder) -> Gaussians "
                              "rendered at the reference cameras over black, rounded to 8 bits",
            "render_backend": get_render_backend(torch.empty(0, device=tok.device), backend)[0],
            "metrics": "PSNR/SSIM/LPIPS per view as for images, mean over views, then mean over assets",
        },
        "per_asset": per_asset,
    }

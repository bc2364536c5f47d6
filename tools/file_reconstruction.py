"""Reconstruct image, video and 3D files through a tokenizer: the work of ``atoken-reconstruct``
(tools/reconstruct.py has the formats and options), and the demo's held-out photo."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from atoken.data_pipeline.assets import decode_views, prepare_asset, voxel_tokens
from atoken.data_pipeline.images import decode_image
from atoken.data_pipeline.video_decode import decode_all, encode_video, inspect_video
from atoken.model.errors import UserError
from atoken.model.metrics import psnr
from atoken.model.ply import save_ply
from atoken.model.splatting import render
from atoken.model.tokenizer import Tokenizer
from atoken.tools.shard_writer import reason


def save_png(img: torch.Tensor, path: Path) -> None:
    """[3, H, W] in [0, 1] -> 8-bit PNG."""
    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(arr)).save(path)


def reconstruct_files(tokenizer: Tokenizer, paths: list[Path], out: Path) -> dict[str, float]:
    """Reconstruct each file into ``out``; returns name -> PSNR (dB, against the decoded original)."""
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

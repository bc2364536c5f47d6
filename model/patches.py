"""Patchify and unpatchify with the 4x16x16 (t, h, w) patch every modality shares.

Token layout: each token's 3072 values are the patch in (t, h, w, c) order, so the first 768 values
(t = 0) are a 16x16 RGB patch in the (h, w, c) order of SigLIP2's naflex patch embedding.
Tokens of a sample are ordered t-major, then patch row, then patch column.

Size policy: patchify needs H and W to be multiples of 16 and raises otherwise. The data pipeline
resizes each training image to a sampled grid of whole patches (see ``data_pipeline.images``); at
inference ``pad_to_patches`` pads bottom/right by edge replication and the decoder's output is
cropped back, so any image size round-trips. An image is one frame, zero-padded in time to 4 frames
(``frames=1`` marks the padding so losses and decoding drop it). A video's frame count must be a
multiple of 4; the video pipeline cuts clips to one.

Training samples travel from the loader to the device as uint8 *values* (``patchify_values``): per
token only its real frames, 768 values for an image (or a 3D voxel's patch), 3072 for video.
``features_from_values`` builds the float [N, 3072] tensor from them where they arrive (the device).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import CHANNELS, PATCH_DIM, PATCH_HW, PATCH_T


def patchify(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
    """x: [3, T, H, W] (or an image [3, H, W]) -> features [n, 3072], coords [n, 4], grid (t, h, w, 1).

    T is zero-padded up to a multiple of 4 (an image, T = 1, becomes 1 real + 3 zero frames).
    """
    if x.ndim == 3:
        x = x.unsqueeze(1)
    c, t_len, hgt, wid = x.shape
    if c != CHANNELS:
        raise ValueError(f"expected {CHANNELS} channels, got shape {tuple(x.shape)}")
    if hgt % PATCH_HW or wid % PATCH_HW:
        raise ValueError(f"height and width must be multiples of {PATCH_HW}, got {hgt}x{wid} "
                         "(use pad_to_patches at inference; the data pipeline resizes)")
    if t_len % PATCH_T:
        x = F.pad(x, (0, 0, 0, 0, 0, PATCH_T - t_len % PATCH_T))
    t, h, w = x.shape[1] // PATCH_T, hgt // PATCH_HW, wid // PATCH_HW
    # [c, t, pt, h, ph, w, pw] -> [t, h, w, pt, ph, pw, c]
    x = x.reshape(c, t, PATCH_T, h, PATCH_HW, w, PATCH_HW).permute(1, 3, 5, 2, 4, 6, 0)
    features = x.reshape(t * h * w, PATCH_DIM)
    return features, grid_coords(t, h, w, device=x.device), (t, h, w, 1)


def patchify_values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
    """uint8 pixels [3, T, H, W] (or an image [3, H, W]) -> values uint8 [n, 768 * min(T, 4)], coords
    [n, 4], grid (t, h, w, 1): ``patchify``'s tokens without their zero padding in time.

    T must be 1 (an image: each token's t = 0 slice, the first 768 of its 3072 values) or a multiple
    of 4 (video: all 3072). ``features_from_values`` restores ``patchify``'s float tokens.
    """
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {x.dtype}")
    c, t_len, hgt, wid = x.shape
    if c != CHANNELS or hgt % PATCH_HW or wid % PATCH_HW or not (t_len == 1 or t_len % PATCH_T == 0):
        raise ValueError(f"expected [{CHANNELS}, T, H, W] with T = 1 or a multiple of {PATCH_T} and H, W multiples "
                         f"of {PATCH_HW}, got {tuple(x.shape)}")
    pt = min(t_len, PATCH_T)
    t, h, w = t_len // pt, hgt // PATCH_HW, wid // PATCH_HW
    # [c, t, pt, h, ph, w, pw] -> [t, h, w, pt, ph, pw, c]: the token's first pt frames in (t, h, w, c) order
    v = x.reshape(c, t, pt, h, PATCH_HW, w, PATCH_HW).permute(1, 3, 5, 2, 4, 6, 0)
    return v.reshape(t * h * w, pt * PATCH_HW * PATCH_HW * c), grid_coords(t, h, w), (t, h, w, 1)


_UNIT = {}  # device -> float32 [256]: uint8 level -> its value in [-1, 1]


def unit_table(device=None) -> torch.Tensor:
    """float32 [256]: pixel level v -> v / 127.5 - 1, computed once on the host (the same float ops as
    ``data_pipeline.images.to_tensor``) and copied, so every device maps levels to identical bits."""
    key = str(torch.device(device or "cpu"))
    if key not in _UNIT:
        host = torch.arange(256, dtype=torch.float32).div_(127.5).sub_(1.0)
        _UNIT[key] = host.to(device) if key != "cpu" else host
    return _UNIT[key]


def features_from_values(values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 values [N, V] (V = 768: an image or 3D token's t = 0 slice; 3072: video) -> features
    [N, 3072] in [-1, 1], built on the values' device; the frames a token does not have are zeros."""
    n, v = values.shape
    if values.dtype != torch.uint8 or v not in (PATCH_DIM // PATCH_T, PATCH_DIM):
        raise ValueError(f"values must be uint8 [N, {PATCH_DIM // PATCH_T} or {PATCH_DIM}], got {values.dtype} "
                         f"{tuple(values.shape)}")
    # A table lookup, not arithmetic: exact and identical on every device (int32 indices: half of int64's memory).
    looked_up = unit_table(values.device).to(dtype).index_select(0, values.reshape(-1).int()).view(n, v)
    if v == PATCH_DIM:
        return looked_up
    out = torch.zeros(n, PATCH_DIM, dtype=dtype, device=values.device)
    out[:, :v] = looked_up
    return out


def unpatchify(features: torch.Tensor, grid: tuple[int, int, int, int], frames: int | None = None) -> torch.Tensor:
    """Inverse of ``patchify``: features [t*h*w, 3072] -> [3, t*4, h*16, w*16].

    ``frames`` keeps only the first frames (1 for an image, whose result is then [3, 1, H, W]).
    """
    t, h, w, z = grid
    if z != 1 or features.shape != (t * h * w, PATCH_DIM):
        raise ValueError(f"features {tuple(features.shape)} do not fit the pixel grid {grid}")
    x = features.reshape(t, h, w, PATCH_T, PATCH_HW, PATCH_HW, CHANNELS).permute(6, 0, 3, 1, 4, 2, 5)
    x = x.reshape(CHANNELS, t * PATCH_T, h * PATCH_HW, w * PATCH_HW)
    return x if frames is None else x[:, :frames]


def grid_coords(t: int, h: int, w: int, device=None) -> torch.Tensor:
    """[t*h*w, 4] int64 coordinates (t, x, y, z = 0) in patchify's token order."""
    tt, xx, yy = torch.meshgrid(torch.arange(t, device=device), torch.arange(h, device=device),
                                torch.arange(w, device=device), indexing="ij")
    return torch.stack([tt, xx, yy, torch.zeros_like(tt)], -1).reshape(-1, 4)


def pad_to_patches(img: torch.Tensor) -> torch.Tensor:
    """Pad [..., H, W] bottom/right by edge replication to multiples of 16 (inference only)."""
    hgt, wid = img.shape[-2:]
    ph, pw = -hgt % PATCH_HW, -wid % PATCH_HW
    if not (ph or pw):
        return img
    lead = img.shape[:-2]
    flat = img.reshape(-1, 1, hgt, wid)
    return F.pad(flat, (0, pw, 0, ph), mode="replicate").reshape(*lead, hgt + ph, wid + pw)

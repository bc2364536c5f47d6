"""The decode registry: one function per modality turns a raw MDS sample into a training sample.

A decode function is ``fn(raw, rng, stream) -> sample``: ``raw`` the MDS sample dict, ``rng`` a
``numpy.random.Generator`` seeded from (seed, epoch, sample index) so every random choice repeats
exactly after a resume or with any number of workers, ``stream`` the ``StreamConfig``. It raises on
an undecodable sample (the dataset turns that into a counted bad-sample marker). The sample::

    {"values": uint8 [n, V] the tokens' real pixel values (V = 768 for an image or a 3D voxel, one
     frame; 3072 for video; ``model.patches.features_from_values`` makes the float [n, 3072] tokens
     in [-1, 1] on the device), "coords": int64 [n, 4] (t, x, y, z),
     "grid": (T, H, W, Z), "frames": int, "modality": "image" | "video" | "3d", "name": str,
     optional "caption": str, optional "views": float32 [V, 3, H, W] in [0, 1] and
     "cameras": {"viewmats": float32 [V, 4, 4], "Ks": float32 [V, 3, 3]}}
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable

import numpy as np

from atoken.model.packed import IMAGE
from atoken.model.patches import patchify_values
from .config import StreamConfig
from .images import open_rgb, resize_pixels, sample_resolution

Decoder = Callable[[dict[str, Any], np.random.Generator, StreamConfig], dict[str, Any]]


def caption_of(raw: dict[str, Any]) -> dict[str, str]:
    """{"caption": text} when the MDS sample has a non-empty caption column, else {} (absent: "")."""
    text = raw.get("caption") or ""
    return {"caption": text} if text else {}


def image_sample(raw: dict[str, Any], rng: np.random.Generator, stream: StreamConfig) -> dict[str, Any]:
    """An image at a longer side drawn from [min_res, max_res] (``images.py``'s policy): one frame."""
    target = sample_resolution(rng, stream.min_res, stream.max_res)
    values, coords, grid = patchify_values(resize_pixels(open_rgb(raw["image"]), target))
    return {"values": values, "coords": coords, "grid": grid, "frames": 1, "modality": IMAGE,
            "name": str(raw["name"]), **caption_of(raw)}


SAMPLE_DECODERS: dict[str, Decoder] = {"image": image_sample}

# Modalities whose decode function lives in a module of its own, imported on first use (they pull
# in video / 3D dependencies an image-only run does not need).
_LAZY = {"video": ("video", "video_sample"), "3d": ("assets", "asset_sample")}


def decoder_for(modality: str) -> Decoder:
    """The decode function registered for ``modality``; a clear error if there is none."""
    if modality not in SAMPLE_DECODERS and modality in _LAZY:
        module, fn = _LAZY[modality]
        if importlib.util.find_spec(f"{__package__}.{module}") is not None:
            SAMPLE_DECODERS[modality] = getattr(importlib.import_module(f".{module}", __package__), fn)
    if modality not in SAMPLE_DECODERS:
        raise ValueError(f"no decode function registered for modality {modality!r} (registered: "
                         f"{sorted(SAMPLE_DECODERS)}; data_pipeline/samples.py)")
    return SAMPLE_DECODERS[modality]

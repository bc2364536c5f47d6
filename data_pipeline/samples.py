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

from collections.abc import Callable
from typing import Any

import numpy as np

from atoken.model.packed import ASSET3D, IMAGE, VIDEO
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


def _video() -> Decoder:
    from .video import video_sample  # noqa: PLC0415 - PyAV: imported when a video stream exists

    return video_sample


def _asset() -> Decoder:
    from .assets import asset_sample  # noqa: PLC0415 - trimesh and Mitsuba: imported when a 3D stream exists

    return asset_sample


# Every modality's decode function, each behind a small function that imports it: video.py and
# assets.py pull in av and trimesh (over a second, measured), which an image-only run does
# not need, and they import ``caption_of`` from this module. ``decoder_for`` calls it once, when
# the stream's dataset is built, so a missing dependency fails then rather than on every sample.
SAMPLE_DECODERS: dict[str, Callable[[], Decoder]] = {IMAGE: lambda: image_sample, VIDEO: _video, ASSET3D: _asset}


def decoder_for(modality: str) -> Decoder:
    """The decode function registered for ``modality``; a clear error if there is none."""
    if modality not in SAMPLE_DECODERS:
        raise ValueError(f"no decode function registered for modality {modality!r} (registered: "
                         f"{sorted(SAMPLE_DECODERS)}; data_pipeline/samples.py)")
    return SAMPLE_DECODERS[modality]()

"""Video samples: the MDS video schema, and one stored video -> one patchified training clip.

``video_sample(raw, rng, stream)`` (the decode function of a video stream):
  1. choose the clip's frames for the stream's task (``clips.py``: 16-32 frame tiles at a sampled
     stride for "rec", 1 fps up to 64 frames for "und"; always a multiple of 4 frames);
  2. draw a target longer side in [min_res, max_res] and size the clip by the image resolution
     policy (``images.training_size``: aspect kept, sides multiples of 16, never upscaled);
  3. decode only those frames (``video_decode.VideoDecoder``: DALI GPU, DALI CPU or PyAV);
  4. resize (bicubic, antialiased, like the images' PIL bicubic), round to 8-bit levels (as PIL's
     resize does for images: the values travel as uint8) and patchify [3, T, h, w] into
     T/4 x h/16 x w/16 tokens at coordinates (t, x, y, 0).
All draws come from ``rng`` (clip first, then resolution), so the sample does not depend on which
backend decoded it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from atoken.model.config import PATCH_T
from atoken.model.packed import VIDEO
from atoken.model.patches import patchify_values, unit_table

from .clips import clip_frame_indices
from .config import StreamConfig
from .images import sample_resolution, training_size
from .samples import caption_of
from .video_decode import VideoDecoder, make_video_decoder

# The MDS schema of video shards, the one place it is defined (writer and reader share it).
# ``video`` holds the file's encoded bytes untouched; fps, frames (that decoded when written), width
# and height describe its first video stream; caption is "" when the video has none.
VIDEO_COLUMNS = {"video": "bytes", "fps": "float64", "frames": "int32", "width": "int32", "height": "int32",
                 "caption": "str", "name": "str"}

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".mpg", ".mpeg")

_process_decoders: dict[str, VideoDecoder] = {}


def process_decoder(backend: str = "auto") -> VideoDecoder:
    """This process' shared decoder for a backend (its ``counts()`` cover every sample it decoded)."""
    if backend not in _process_decoders:
        _process_decoders[backend] = make_video_decoder(backend)
    return _process_decoders[backend]


def resize_clip_pixels(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [3, T, height, width] (bicubic, antialiased, rounded to 8 bits)."""
    x = frames.permute(0, 3, 1, 2)  # [T, 3, H, W]
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 255.0).round_().to(torch.uint8)  # bicubic overshoots at edges
    return x.permute(1, 0, 2, 3).contiguous()


def resize_clip(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, height, width] in [-1, 1] (``resize_clip_pixels``)."""
    return unit_table()[resize_clip_pixels(frames, height, width).long()]


def video_sample(raw: dict[str, Any], rng: np.random.Generator, stream: StreamConfig,
                 decoder: VideoDecoder | None = None) -> dict[str, Any]:
    """An MDS video sample (``VIDEO_COLUMNS``) -> a training sample:

      {"values": uint8 [T/4 * h/16 * w/16, 3072], "coords": int64 [n, 4] (t, x, y, 0),
       "grid": (T/4, h/16, w/16, 1), "frames": 4, "modality": "video", "name": str,
       "decoder": the backend that decoded it, "caption": str (only when the video has one)}

    ``decoder``: default, this process' shared "auto" decoder. Raises ValueError naming the sample
    when it cannot be decoded.
    """
    name = str(raw.get("name", "?"))
    try:
        num_frames, fps = int(raw["frames"]), float(raw["fps"])
        indices = clip_frame_indices(num_frames, fps, rng, stream)
        target = sample_resolution(rng, stream.min_res, stream.max_res)
        dec = decoder or process_decoder()
        frames = dec.decode(raw["video"], indices)  # uint8 [T, H, W, 3]
    except Exception as e:  # name the sample whatever failed
        raise ValueError(f"video {name!r}: {type(e).__name__}: {e}") from e
    h, w = training_size(frames.shape[1], frames.shape[2], target)
    values, coords, grid = patchify_values(resize_clip_pixels(frames, h, w))
    assert grid[0] * PATCH_T == len(indices)  # clips are whole tiles: no zero-padded frames
    return {"values": values, "coords": coords, "grid": grid, "frames": PATCH_T, "modality": VIDEO,
            "name": name, "decoder": dec.last_backend, **caption_of(raw)}

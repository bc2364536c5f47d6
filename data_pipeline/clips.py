"""Which frames of a video make a training clip (docs/design.md, stage 2: video).

Reconstruction (task "rec"): a tile of ``clip_frames`` frames (a multiple of 4, uniform over the
multiples of 4 in the range), a stride range picked uniformly from ``frame_strides`` then a stride
uniform in it, a start uniform over the positions where the tile fits. A video too short for the
tile gets the longest multiple of 4 frames it holds at that stride; if it holds fewer than 4 at that
stride, the stride drops one step at a time until 4 fit (stride 1 always fits a 4-frame video).
Understanding (task "und"): frames at ``und_fps`` (every ``fps / und_fps`` source frames, or every
frame of a video slower than that), at most ``und_max_frames``, cut to a multiple of 4, from a
window placed uniformly at random (centred without an ``rng``: the evaluation's clip); a video with
fewer than 4 frames at ``und_fps`` (under 4 s at 1 fps) gets 4 frames spread evenly over its length instead.
A video with fewer than 4 frames cannot make a clip: that raises.
The settings come from ``config.StreamConfig``, which validates them.

Every draw comes from the ``rng`` passed in, in a fixed order, so a seed fixes the clip.
"""
from __future__ import annotations

import numpy as np

from atoken.model.config import PATCH_T


def _need_frames(num_frames: int) -> None:
    if num_frames < PATCH_T:
        raise ValueError(f"the video has {num_frames} frames; a clip needs at least {PATCH_T}")


def rec_frame_indices(num_frames: int, rng: np.random.Generator, clip_frames: tuple[int, int] = (16, 32),
                      frame_strides=((1, 3), (4, 12))) -> np.ndarray:
    """[T] int64 frame indices of a reconstruction tile, T a multiple of 4 (module docstring)."""
    _need_frames(num_frames)
    want = PATCH_T * int(rng.integers(clip_frames[0] // PATCH_T, clip_frames[1] // PATCH_T + 1))
    lo, hi = frame_strides[int(rng.integers(len(frame_strides)))]
    stride = int(rng.integers(lo, hi + 1))

    def fits(s: int) -> int:  # the longest multiple of 4 frames the video holds at stride s
        return ((num_frames - 1) // s + 1) // PATCH_T * PATCH_T

    while fits(stride) < PATCH_T:
        stride -= 1
    length = min(want, fits(stride))
    span = (length - 1) * stride + 1
    start = int(rng.integers(0, num_frames - span + 1))
    return start + stride * np.arange(length, dtype=np.int64)


def und_frame_indices(num_frames: int, fps: float, rng: np.random.Generator | None, und_fps: float = 1.0,
                      und_max_frames: int = 64) -> np.ndarray:
    """[T] int64 frame indices of an understanding clip, T a multiple of 4 (module docstring)."""
    _need_frames(num_frames)
    if und_max_frames < PATCH_T:
        raise ValueError(f"und_max_frames={und_max_frames} cannot hold one tile of {PATCH_T} frames")
    step = max(1.0, fps / und_fps)  # source frames per sampled frame
    available = int((num_frames - 1) / step) + 1  # samples at und_fps over the whole video
    length = min(available, und_max_frames) // PATCH_T * PATCH_T
    if length < PATCH_T:
        return np.round(np.linspace(0, num_frames - 1, PATCH_T)).astype(np.int64)
    first = (available - length) // 2 if rng is None else int(rng.integers(0, available - length + 1))
    idx = np.floor((first + np.arange(length)) * step).astype(np.int64)
    return np.minimum(idx, num_frames - 1)  # NOTE: guards float rounding at the last frame only


def clip_frame_indices(num_frames: int, fps: float, rng: np.random.Generator, stream) -> np.ndarray:
    """The clip for a stream's task ("rec" or "und"), using the stream's clip settings (``StreamConfig``
    validates them)."""
    if stream.task == "rec":
        return rec_frame_indices(num_frames, rng, stream.clip_frames, stream.frame_strides)
    if stream.task == "und":
        return und_frame_indices(num_frames, fps, rng, stream.und_fps, stream.und_max_frames)
    raise ValueError(f"stream {stream.name!r}: unknown task {stream.task!r} (expected 'rec' or 'und')")

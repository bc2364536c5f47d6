"""Turn a folder of videos into MDS shards for training.

    python -m atoken.tools.make_video_shards VIDEOS/ OUT        # OUT: a folder or s3://bucket/prefix

Every video file under the folder (recursively, by extension: .mp4 .webm .mkv .mov .avi .m4v .mpg
.mpeg, in sorted order of its relative path) is probed and decoded fully, once, with PyAV; files that
fail (not a video, truncated, no frame decodes, frame size changing mid-stream) are listed with the
reason and left out. Each sample stores the file's original bytes untouched plus the frame rate,
the number of frames that decoded, the frame size, its caption and its name (columns:
``data_pipeline.video.VIDEO_COLUMNS``).

Captions: a UTF-8 text file with the video's stem next to it (``clips/dog.mp4`` -> ``clips/dog.txt``),
whitespace stripped; a video without one gets "" (MDS has no optional columns). Two videos with the
same stem in one folder (``dog.mp4``, ``dog.webm``) share that caption.

An s3:// output is uploaded by MDSWriter itself (boto3: S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .shard_writer import add_common_args, reason, resolve_inputs, run_cli, sidecar_caption, write_shards


def check_video(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The sample for a video that decodes fully, else (None, reason)."""
    from atoken.data_pipeline.video_decode import inspect_video  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    try:
        data = path.read_bytes()
        info = inspect_video(data)
        return {"video": data, "fps": info.fps, "frames": info.frames, "width": info.width,
                "height": info.height, "caption": sidecar_caption(path)}, ""
    except Exception as e:  # noqa: BLE001 - any failure rejects the file
        return None, reason(e)


def write_video_shards(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike], out: str, *,
                       root: str | os.PathLike | None = None, size_limit: int | str = "64mb",
                       overwrite: bool = False, workers: int = 1,
                       progress: bool = True) -> tuple[int, list[tuple[str, str]]]:
    """Write the videos to MDS shards at ``out``; returns (samples written, [(name, reason)] rejected).

    ``paths_or_dir``: a folder (searched recursively) or a list of files, named relative to ``root``
    (default: the folder, or the files' common parent folder).
    """
    from atoken.data_pipeline.video import VIDEO_COLUMNS, VIDEO_EXTENSIONS  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    paths, names = resolve_inputs(paths_or_dir, VIDEO_EXTENSIONS, root)
    return write_shards(paths, names, out, VIDEO_COLUMNS, check_video, desc="videos", size_limit=size_limit,
                        overwrite=overwrite, workers=workers, progress=progress)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="atoken-make-video-shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="folder of videos (and optional <stem>.txt captions), searched recursively")
    add_common_args(ap)
    args = ap.parse_args(argv)
    return run_cli(functools.partial(write_video_shards, args.input, args.out, size_limit=args.size_limit,
                                     overwrite=args.overwrite, workers=args.workers,
                                     progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())

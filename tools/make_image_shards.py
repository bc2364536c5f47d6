"""Turn a folder of images into MDS shards for training.

    python -m atoken.tools.make_image_shards PHOTOS/ OUT        # OUT: a folder or s3://bucket/prefix

Every image file under the folder (recursively, by extension, in sorted order of its relative path)
is decoded fully with PIL first; files that fail are listed with the reason and left out. Each
sample stores the file's original bytes untouched plus its size and name (columns:
``data_pipeline.images.IMAGE_COLUMNS``). An s3:// output is uploaded by MDSWriter itself (boto3:
S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from ..data_pipeline.images import IMAGE_COLUMNS, IMAGE_EXTENSIONS, open_rgb
from .shard_writer import add_common_args, reason, resolve_inputs, run_cli, write_shards


def check_image(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The sample for a file that decodes fully, else (None, reason)."""
    try:
        data = path.read_bytes()
        img = open_rgb(data)
        return {"image": data, "width": img.width, "height": img.height}, ""
    except Exception as e:  # noqa: BLE001 - any failure rejects the file
        return None, reason(e)


def write_image_shards(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike], out: str, *,
                       root: str | os.PathLike | None = None, size_limit: int | str = "64mb",
                       overwrite: bool = False, workers: int = 1,
                       progress: bool = True) -> tuple[int, list[tuple[str, str]]]:
    """Write the images to MDS shards at ``out``; returns (samples written, [(name, reason)] rejected).

    ``paths_or_dir``: a folder (searched recursively) or a list of files, named relative to ``root``
    (default: the folder, or the files' common parent folder).
    """
    paths, names = resolve_inputs(paths_or_dir, IMAGE_EXTENSIONS, root)
    return write_shards(paths, names, out, IMAGE_COLUMNS, check_image, desc="images", size_limit=size_limit,
                        overwrite=overwrite, workers=workers, progress=progress)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="atoken-make-image-shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="folder of images, searched recursively")
    add_common_args(ap)
    args = ap.parse_args(argv)
    return run_cli(functools.partial(write_image_shards, args.input, args.out, size_limit=args.size_limit,
                                     overwrite=args.overwrite, workers=args.workers,
                                     progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())

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
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable

from streaming import MDSWriter
from tqdm import tqdm

from ..data_pipeline.images import IMAGE_COLUMNS, IMAGE_EXTENSIONS, open_rgb


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted; raises if there is no such folder."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {str(root)!r} does not exist or is not a folder")
    return sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                  key=lambda p: p.relative_to(root).as_posix())


def _check(path: Path) -> tuple[bytes | None, int, int, str]:
    """(bytes, width, height, "") for a file that decodes fully, else (None, 0, 0, reason)."""
    try:
        data = path.read_bytes()
        img = open_rgb(data)
        return data, img.width, img.height, ""
    except Exception as e:  # noqa: BLE001 - any failure rejects the file
        return None, 0, 0, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def write_image_shards(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike], out: str, *,
                       root: str | os.PathLike | None = None, size_limit: int | str = "64mb",
                       overwrite: bool = False, workers: int = 1,
                       progress: bool = True) -> tuple[int, list[tuple[str, str]]]:
    """Write the images to MDS shards at ``out``; returns (samples written, [(name, reason)] rejected).

    ``paths_or_dir``: a folder (searched recursively) or a list of files, named relative to ``root``
    (default: the folder, or the files' common parent folder).
    """
    if isinstance(paths_or_dir, (str, os.PathLike)):
        root = Path(paths_or_dir) if root is None else Path(root)
        paths = list_images(paths_or_dir)
        if not paths:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(paths_or_dir)!r}")
    else:
        paths = [Path(p) for p in paths_or_dir]
        if not paths:
            raise ValueError("no image files given")
        root = Path(root) if root is not None else Path(os.path.commonpath([p.absolute().parent for p in paths]))
    names = [p.absolute().relative_to(root.absolute()).as_posix() for p in paths]
    order = sorted(range(len(paths)), key=names.__getitem__)
    paths, names = [paths[i] for i in order], [names[i] for i in order]

    written, rejected = 0, []
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        # Decoding (the slow part) may run in worker processes; map keeps the sorted order.
        checked = pool.map(_check, paths, chunksize=8) if pool else map(_check, paths)
        with MDSWriter(columns=IMAGE_COLUMNS, out=out, size_limit=size_limit, exist_ok=overwrite) as writer:
            for name, (data, width, height, reason) in tqdm(zip(names, checked), total=len(paths),
                                                            desc="images", unit="img", disable=not progress):
                if data is None:
                    rejected.append((name, reason))
                    continue
                writer.write({"image": data, "width": width, "height": height, "name": name})
                written += 1
    finally:
        if pool:
            pool.shutdown()
    return written, rejected


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m atoken.tools.make_image_shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="folder of images, searched recursively")
    ap.add_argument("out", help="output: a local folder or s3://bucket/prefix")
    ap.add_argument("--size-limit", default="64mb", help="shard size limit, e.g. 64mb (default)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    ap.add_argument("--workers", type=int, default=1, help="processes decoding images (default 1)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        written, rejected = write_image_shards(args.input, args.out, size_limit=args.size_limit,
                                               overwrite=args.overwrite, workers=args.workers,
                                               progress=not args.no_progress)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        hint = " (pass --overwrite to replace it)" if isinstance(e, FileExistsError) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    for name, reason in rejected:
        print(f"rejected {name}: {reason}")
    print(f"wrote {written} samples, rejected {len(rejected)}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())

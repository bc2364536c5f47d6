"""Turn a folder of images into MDS shards for training.

    python -m atoken.tools.make_image_shards PHOTOS/ OUT        # OUT: a folder or s3://bucket/prefix

Every image file under the folder (recursively, by extension, in sorted order of its relative path)
is decoded fully with PIL first; files that fail are listed with the reason and left out. Each
sample stores the file's original bytes untouched plus its size and name (columns:
``data_pipeline.images.IMAGE_WRITER_COLUMNS``), its caption (the text of ``<stem>.txt`` beside it, or
"") and its label (with ``--labels-from-folders``: the index of its top-level folder among the
sorted folder names, as in ImageNet-style class folders; else -1). An s3:// output is uploaded by MDSWriter itself
(boto3:
S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from atoken.data_pipeline.images import IMAGE_EXTENSIONS, IMAGE_WRITER_COLUMNS, open_rgb

from .shard_writer import add_common_args, reason, resolve_inputs, run_cli, sidecar_caption, write_shards


def check_image(path: Path, label: int = -1) -> tuple[dict[str, Any] | None, str]:
    """The sample for a file that decodes fully, else (None, reason)."""
    try:
        data = path.read_bytes()
        img = open_rgb(data)
        return {"image": data, "width": img.width, "height": img.height, "caption": sidecar_caption(path),
                "label": label}, ""
    except Exception as e:  # noqa: BLE001 - any failure rejects the file
        return None, reason(e)


def _check_labelled(item: tuple[Path, int]) -> tuple[dict[str, Any] | None, str]:
    return check_image(*item)


def write_image_shards(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike], out: str, *,
                       root: str | os.PathLike | None = None, size_limit: int | str = "64mb",
                       overwrite: bool = False, workers: int = 1, labels_from_folders: bool = False,
                       progress: bool = True) -> tuple[int, list[tuple[str, str]]]:
    """Write the images to MDS shards at ``out``; returns (samples written, [(name, reason)] rejected).

    ``paths_or_dir``: a folder (searched recursively) or a list of files, named relative to ``root``
    (default: the folder, or the files' common parent folder). ``labels_from_folders``: label each
    image by its top-level folder (sorted folder names -> 0, 1, ...; ``class_names`` lists them).
    """
    paths, names = resolve_inputs(paths_or_dir, IMAGE_EXTENSIONS, root)
    if not labels_from_folders:
        return write_shards(paths, names, out, IMAGE_WRITER_COLUMNS, check_image, desc="images",
                            size_limit=size_limit, overwrite=overwrite, workers=workers, progress=progress)
    classes = class_names(names)
    items = [(p, classes.index(n.split("/")[0])) for p, n in zip(paths, names, strict=True)]
    return write_shards(items, names, out, IMAGE_WRITER_COLUMNS, _check_labelled, desc="images",
                        size_limit=size_limit, overwrite=overwrite, workers=workers, progress=progress)


def class_names(names: list[str]) -> list[str]:
    """Sorted top-level folder names of relative file names; label i is ``class_names[i]``."""
    top = sorted({n.split("/")[0] for n in names if "/" in n})
    if not top or any("/" not in n for n in names):
        loose = [n for n in names if "/" not in n][:3]
        raise ValueError(f"--labels-from-folders needs every image inside a class folder; not: {loose}")
    return top


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="atoken-make-image-shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="folder of images, searched recursively")
    add_common_args(ap)
    ap.add_argument("--labels-from-folders", action="store_true",
                    help="label each image by its top-level class folder (printed as index: name)")
    args = ap.parse_args(argv)
    if args.labels_from_folders and Path(args.input).is_dir():
        try:
            names = resolve_inputs(args.input, IMAGE_EXTENSIONS)[1]
            for i, name in enumerate(class_names(names)):
                print(f"label {i}: {name}")
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run_cli(functools.partial(write_image_shards, args.input, args.out, size_limit=args.size_limit,
                                     overwrite=args.overwrite, workers=args.workers,
                                     labels_from_folders=args.labels_from_folders, progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())

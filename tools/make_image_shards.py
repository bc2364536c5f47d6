"""Turn images into MDS shards for training: a folder of files, WebDataset tars or Parquet files.

    atoken-make-image-shards PHOTOS/ OUT                 # OUT: a folder or s3://bucket/prefix
    atoken-make-image-shards s3://laion/wds/ OUT --part 3/64 --min-side 64 --require-captions
    atoken-make-image-shards hf/cc12m/data/ OUT --caption-column caption

INPUT is a folder or s3:// prefix; what it holds decides the form (docs/data.md, tools/sources.py):
``*.tar`` WebDataset shards (img2dataset's KEY.jpg + KEY.txt + KEY.json; its metadata .parquet files
beside them are ignored), else ``*.parquet`` files (an image column, a struct with a ``bytes`` field
as Hugging Face stores it, and a caption column), else image files. Tars and Parquet files are
streamed, nothing is extracted to disk.

Every image is decoded fully with PIL first; a sample that fails, is smaller than ``--min-side`` or
lacks a caption under ``--require-captions`` is listed with its reason (``undecodable: ...``,
``below --min-side: ...``) and left out; a damaged input file is named and the run goes on. Each
sample stores the original bytes untouched plus its size and name (columns:
``data_pipeline.images.IMAGE_WRITER_COLUMNS``; names: ``PATH``, ``00000.tar/KEY`` or
``train-00000.parquet#ROW``), its caption (``<stem>.txt`` beside a file, the tar's .txt or json
"caption", the Parquet column; or "") and its label (with ``--labels-from-folders``: the index of its
top-level folder among the sorted folder names, as in ImageNet-style class folders; ``--label-column``
for Parquet; else -1).

``--part I/N`` converts part I (from 0) of the sorted input files into ``OUT/part-IIIII-of-NNNNN/``
(a Slurm array task picks its part itself: cluster/make_shards.slurm); a rerun skips complete parts;
``atoken-merge-shards OUT`` then writes the one index and the rejection totals (tools/merge_shards.py).
S3 (inputs and output) is boto3: S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from atoken.data_pipeline import objects
from atoken.data_pipeline.images import IMAGE_EXTENSIONS, IMAGE_WRITER_COLUMNS, open_rgb
from atoken.model.errors import UserError

from .parts import Part, add_part_args, part_from, write_part
from .shard_writer import add_common_args, reason, resolve_inputs, run_cli, sidecar_caption, write_samples
from .sources import NO_CAPTION, TOO_SMALL, UNDECODABLE, list_inputs, read_parquet, read_webdataset, rejection


def check_encoded(item: dict[str, Any], min_side: int = 0, require_caption: bool = False
                  ) -> tuple[dict[str, Any] | None, str]:
    """The sample for encoded image bytes that decode fully and pass the filters, else (None, reason).

    ``item``: {"image": bytes, "caption": str | None, "label": int} (``tools/sources.py``).
    """
    data = item["image"]
    try:
        img = open_rgb(data)
    except Exception as e:  # noqa: BLE001 - any failure rejects the sample
        return None, rejection(UNDECODABLE, reason(e))
    if min(img.width, img.height) < min_side:
        return None, rejection(TOO_SMALL, f"{img.width}x{img.height} px, shorter side under {min_side}")
    caption = item.get("caption") or ""
    if require_caption and not caption:
        return None, rejection(NO_CAPTION, "empty or absent, and --require-captions is set")
    return {"image": data, "width": img.width, "height": img.height, "caption": caption,
            "label": item.get("label", -1)}, ""


def check_image(path: Path, label: int = -1, min_side: int = 0,
                require_caption: bool = False) -> tuple[dict[str, Any] | None, str]:
    """The sample for an image file (caption: ``<stem>.txt`` beside it) that passes, else (None, reason)."""
    try:
        item = {"image": path.read_bytes(), "caption": sidecar_caption(path), "label": label}
    except Exception as e:  # noqa: BLE001 - an unreadable file rejects the file
        return None, rejection(UNDECODABLE, reason(e))
    return check_encoded(item, min_side, require_caption)


def _check_labelled(item: tuple[Path, int] | dict[str, Any], min_side: int = 0,
                    require_caption: bool = False) -> tuple[dict[str, Any] | None, str]:
    if isinstance(item, dict):  # an s3:// file, read already
        return check_encoded(item, min_side, require_caption)
    return check_image(*item, min_side=min_side, require_caption=require_caption)


def write_image_shards(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike], out: str, *,
                       root: str | os.PathLike | None = None, size_limit: int | str = "64mb",
                       overwrite: bool = False, workers: int = 1, labels_from_folders: bool = False,
                       min_side: int = 0, require_caption: bool = False,
                       progress: bool = True) -> tuple[int, list[tuple[str, str]]]:
    """Write the images to MDS shards at ``out``; returns (samples written, [(name, reason)] rejected).

    ``paths_or_dir``: a folder (searched recursively) or a list of files, named relative to ``root``
    (default: the folder, or the files' common parent folder). ``labels_from_folders``: label each
    image by its top-level folder (sorted folder names -> 0, 1, ...; ``class_names`` lists them).
    """
    paths, names = resolve_inputs(paths_or_dir, IMAGE_EXTENSIONS, root)
    labels = _labels(names) if labels_from_folders else None
    return write_samples(_file_items(paths, names, range(len(names)), labels), out, IMAGE_WRITER_COLUMNS,
                         functools.partial(_check_labelled, min_side=min_side, require_caption=require_caption),
                         desc="images", total=len(paths), size_limit=size_limit, overwrite=overwrite,
                         workers=workers, progress=progress)


def convert(source: str, out: str, *, part: Part | None = None, image_column: str = "image",
            caption_column: str | None = "text", label_column: str | None = None, min_side: int = 0,
            require_caption: bool = False, labels_from_folders: bool = False, size_limit: int | str = "64mb",
            overwrite: bool = False, workers: int = 1, progress: bool = True) -> tuple[int, list[tuple[str, str]]]:
    """Convert a folder or s3:// prefix of images, WebDataset tars or Parquet files (detected from what
    it holds, ``tools/sources.py``) to MDS at ``out``, or only ``part`` of it (``tools/parts.py``)."""
    form, inputs, names = list_inputs(str(source))
    if labels_from_folders and form != "images":
        raise UserError(f"--labels-from-folders needs a folder of image files; {source} holds {form} inputs "
                        "(Parquet: --label-column)")
    labels = _labels(names) if labels_from_folders else None
    check = functools.partial(_check_labelled if form == "images" else check_encoded, min_side=min_side,
                              require_caption=require_caption)

    def write(chosen: range, target: str, overwrite: bool = True) -> tuple[int, list[tuple[str, str]]]:
        if form == "images":
            items = _file_items(inputs, names, chosen, labels)
        elif form == "webdataset":
            items = itertools.chain.from_iterable(read_webdataset(inputs[i], names[i]) for i in chosen)
        else:
            items = itertools.chain.from_iterable(
                read_parquet(inputs[i], names[i], image_column, caption_column, label_column) for i in chosen)
        return write_samples(items, target, IMAGE_WRITER_COLUMNS, check, desc=f"{form} images",
                             total=len(chosen) if form == "images" else None, size_limit=size_limit,
                             overwrite=overwrite, workers=workers, progress=progress)

    if part is None:
        return write(range(len(names)), out, overwrite)
    return write_part(out, part, names, write)


def _labels(names: list[str]) -> list[int]:
    classes = class_names(names)
    return [classes.index(n.split("/")[0]) for n in names]


def _file_items(paths: list, names: list[str], chosen: range, labels: list[int] | None) -> Iterator:
    """(name, (path, label)) of image files; an s3:// one is read here, its caption from ``<stem>.txt``."""
    for i in chosen:
        label = -1 if labels is None else labels[i]
        if not objects.is_remote(str(paths[i])):
            yield names[i], (Path(paths[i]), label)
            continue
        try:
            sidecar = str(paths[i]).rsplit(".", 1)[0] + ".txt"
            caption = objects.read_bytes(sidecar).decode("utf-8").strip() if objects.exists(sidecar) else ""
            yield names[i], {"image": objects.read_bytes(str(paths[i])), "caption": caption, "label": label}
        except Exception as e:  # noqa: BLE001 - an unreadable object is named and rejected
            yield names[i], rejection(UNDECODABLE, reason(e))


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
    ap.add_argument("input", help="a folder or s3:// prefix of image files, WebDataset *.tar shards or *.parquet "
                                  "files (the form is detected from what it holds)")
    add_common_args(ap)
    add_part_args(ap)
    ap.add_argument("--labels-from-folders", action="store_true",
                    help="label each image by its top-level class folder (printed as index: name)")
    ap.add_argument("--min-side", type=int, default=0, metavar="PX",
                    help="reject images whose shorter side is under PX pixels (default 0: none)")
    ap.add_argument("--require-captions", action="store_true", help="reject images without a caption")
    ap.add_argument("--image-column", default="image",
                    help="Parquet: the image column, a struct with a `bytes` field or binary (default: image)")
    ap.add_argument("--caption-column", default="text",
                    help="Parquet: the caption column (default: text; '' for none)")
    ap.add_argument("--label-column", default="", help="Parquet: an integer class label column (default: none)")
    args = ap.parse_args(argv)
    try:
        part = part_from(args.part)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.labels_from_folders and Path(args.input).is_dir():
        try:
            names = resolve_inputs(args.input, IMAGE_EXTENSIONS)[1]
            for i, name in enumerate(class_names(names)):
                print(f"label {i}: {name}")
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run_cli(functools.partial(
        convert, args.input, args.out, part=part, image_column=args.image_column,
        caption_column=args.caption_column or None, label_column=args.label_column or None,
        min_side=args.min_side, require_caption=args.require_captions, labels_from_folders=args.labels_from_folders,
        size_limit=args.size_limit, overwrite=args.overwrite, workers=args.workers, progress=not args.no_progress),
        empty_ok=part is not None)


if __name__ == "__main__":
    sys.exit(main())

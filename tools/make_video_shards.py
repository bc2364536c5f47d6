"""Turn a folder of videos, or a CSV / Parquet manifest of clips, into MDS shards for training.

    python -m atoken.tools.make_video_shards VIDEOS/ OUT        # OUT: a folder or s3://bucket/prefix
    atoken-make-video-shards s3://webvid/train.csv OUT --path-column contentUrl --caption-column name --part 0/8

A manifest (``.csv`` or ``.parquet``, local or s3://; WebVid-, Panda-70M-style) names each clip's
path (local, s3://, or relative to the manifest's folder) and caption; samples are named
``MANIFEST#ROW``; a clip that cannot be read is rejected as ``missing file``. ``--part I/N`` converts
rows (or, for a folder, files) of part I of N into ``OUT/part-IIIII-of-NNNNN/``; then
``atoken-merge-shards OUT`` (docs/data.md).

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
import contextlib
import csv
import functools
import io
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from atoken.data_pipeline import objects
from atoken.model.errors import UserError

from .parts import Part, add_part_args, part_from, write_part
from .shard_writer import add_common_args, reason, resolve_inputs, run_cli, sidecar_caption, write_samples
from .sources import MISSING_FILE, NO_CAPTION, UNDECODABLE, rejection

MANIFEST_EXTENSIONS = (".csv", ".parquet")


def check_clip(item: dict[str, Any], require_caption: bool = False) -> tuple[dict[str, Any] | None, str]:
    """The sample for video bytes that decode fully (and have a caption, if required), else (None, reason)."""
    from atoken.data_pipeline.video_decode import inspect_video  # noqa: PLC0415 - --help stays fast

    data = item["video"]
    try:
        info = inspect_video(data)
    except Exception as e:  # noqa: BLE001 - any failure rejects the clip
        return None, rejection(UNDECODABLE, reason(e))
    caption = item.get("caption") or ""
    if require_caption and not caption:
        return None, rejection(NO_CAPTION, "empty or absent, and --require-captions is set")
    return {"video": data, "fps": info.fps, "frames": info.frames, "width": info.width,
            "height": info.height, "caption": caption}, ""


def check_video(path: Path, require_caption: bool = False) -> tuple[dict[str, Any] | None, str]:
    """The sample for a video file (caption: ``<stem>.txt`` beside it) that passes, else (None, reason)."""
    try:
        item = {"video": path.read_bytes(), "caption": sidecar_caption(path)}
    except Exception as e:  # noqa: BLE001 - an unreadable file rejects the file
        return None, rejection(UNDECODABLE, reason(e))
    return check_clip(item, require_caption)


class Manifest(Sequence):
    """A CSV or Parquet manifest of clip paths and captions, read row by row (WebVid, Panda-70M style).

    Paths are local, s3://, or relative to the manifest's folder. As a sequence: the rows' names,
    ``MANIFEST#ROW`` (row from 0), so that ``write_part`` splits it by rows.
    """

    def __init__(self, url: str, path_column: str = "path", caption_column: str | None = "caption"):
        self.url, self.path_column, self.caption_column = url, path_column, caption_column
        self.name = url.rstrip("/").rsplit("/", 1)[-1]
        self.folder = url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."
        self.rows = sum(1 for _ in self._rows())  # one pass (a Parquet file's count is in its footer)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.rows))]
        return f"{self.name}#{range(self.rows)[i]}"

    def _check(self, have: list[str]) -> None:
        missing = [c for c in (self.path_column, self.caption_column) if c and c not in have]
        if missing:
            raise UserError(f"manifest {self.url}: no column {', '.join(map(repr, missing))} among {have}: name "
                            "them with --path-column and --caption-column (--caption-column '' for none)")

    def _rows(self) -> Iterator[tuple[str, str | None]]:
        """(clip path, caption) of every row, streamed."""
        if self.url.lower().endswith(".csv"):
            with contextlib.closing(objects.open_stream(self.url)) as f:
                reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
                self._check(list(reader.fieldnames or []))
                for row in reader:
                    yield row[self.path_column], row.get(self.caption_column) if self.caption_column else None
            return
        import pyarrow.parquet as pq  # noqa: PLC0415 - only Parquet inputs need it

        with contextlib.closing(objects.open_seekable(self.url)) as f, pq.ParquetFile(f) as pf:
            self._check(pf.schema_arrow.names)
            wanted = [c for c in (self.path_column, self.caption_column) if c]
            for batch in pf.iter_batches(batch_size=1024, columns=wanted):
                cols = [batch.column(c).to_pylist() for c in wanted]
                for i in range(batch.num_rows):
                    yield cols[0][i], cols[1][i] if self.caption_column else None

    def items(self, chosen: range) -> Iterator[tuple[str, dict[str, Any] | str]]:
        """(name, {"video": bytes, "caption": ...}) for the chosen rows; a clip that cannot be read is a rejection."""
        for row, (path, caption) in enumerate(self._rows()):
            if row < chosen.start:
                continue
            if row >= chosen.stop:
                return
            url = path if objects.is_remote(path) or os.path.isabs(path) else objects.join(self.folder, path)
            try:
                yield self[row], {"video": objects.read_bytes(url), "caption": (caption or "").strip()}
            except Exception as e:  # noqa: BLE001 - named, counted, the part goes on
                yield self[row], rejection(MISSING_FILE, f"{url}: {reason(e)}")


def write_video_shards(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike], out: str, *,
                       root: str | os.PathLike | None = None, size_limit: int | str = "64mb",
                       overwrite: bool = False, workers: int = 1, part: Part | None = None,
                       path_column: str = "path", caption_column: str | None = "caption",
                       require_caption: bool = False, progress: bool = True) -> tuple[int, list[tuple[str, str]]]:
    """Write the videos to MDS shards at ``out``; returns (samples written, [(name, reason)] rejected).

    ``paths_or_dir``: a folder (searched recursively), a list of files, named relative to ``root``
    (default: the folder, or the files' common parent folder), or a .csv / .parquet manifest (local
    or s3://) with ``path_column`` and ``caption_column``. ``part``: only that part of the files or
    rows, into its own folder under ``out`` (``tools/parts.py``).
    """
    from atoken.data_pipeline.video import VIDEO_COLUMNS, VIDEO_EXTENSIONS  # noqa: PLC0415 - CLI module: torch and the model only when run (--help stays light)

    if isinstance(paths_or_dir, (str, os.PathLike)) and str(paths_or_dir).lower().endswith(MANIFEST_EXTENSIONS):
        manifest = Manifest(str(paths_or_dir), path_column, caption_column)
        names: Sequence[str] = manifest
        items, check = manifest.items, functools.partial(check_clip, require_caption=require_caption)
    else:
        paths, names = resolve_inputs(paths_or_dir, VIDEO_EXTENSIONS, root)
        items = lambda chosen: ((names[i], paths[i]) for i in chosen)  # noqa: E731 - the same shape as Manifest.items, in one line
        check = functools.partial(check_video, require_caption=require_caption)

    def write(chosen: range, target: str, overwrite: bool = True) -> tuple[int, list[tuple[str, str]]]:
        return write_samples(items(chosen), target, VIDEO_COLUMNS, check, desc="videos", total=len(chosen),
                             size_limit=size_limit, overwrite=overwrite, workers=workers, progress=progress)

    if part is None:
        return write(range(len(names)), out, overwrite)
    return write_part(out, part, names, write)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="atoken-make-video-shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="folder of videos (and optional <stem>.txt captions), searched recursively, or a "
                                  ".csv / .parquet manifest of clip paths and captions (local or s3://)")
    add_common_args(ap)
    add_part_args(ap)
    ap.add_argument("--path-column", default="path", help="manifest: the clip path column (default: path)")
    ap.add_argument("--caption-column", default="caption",
                    help="manifest: the caption column (default: caption; '' for none)")
    ap.add_argument("--require-captions", action="store_true", help="reject clips without a caption")
    args = ap.parse_args(argv)
    try:
        part = part_from(args.part)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_cli(functools.partial(write_video_shards, args.input, args.out, size_limit=args.size_limit,
                                     overwrite=args.overwrite, workers=args.workers, part=part,
                                     path_column=args.path_column, caption_column=args.caption_column or None,
                                     require_caption=args.require_captions, progress=not args.no_progress),
                   empty_ok=part is not None)


if __name__ == "__main__":
    sys.exit(main())

"""The input forms the image writer reads, local or s3://, each as a stream of (name, item).

- ``images``: a folder of image files (``<stem>.txt`` captions beside them);
- ``webdataset``: ``*.tar`` shards as img2dataset writes them: ``KEY.jpg`` (or another image
  extension), ``KEY.txt`` caption and ``KEY.json`` metadata under one key (WebDataset's rule: the key
  is the member path up to the first '.' of its file name); the caption is the .txt, else the
  json's "caption". Read with ``tarfile`` in streaming mode (``r|*``), one key's members in memory.
- ``parquet``: ``*.parquet`` files as the Hugging Face Hub stores image datasets: an image column
  (a struct whose ``bytes`` field holds the encoded file, as ``datasets.Image`` writes it, or a plain
  binary column) and a caption column; read ``rows_per_batch`` rows at a time (``iter_batches``).

An item is a dict {"image": bytes, "caption": str | None, "label": int}, or a string: the reason
the reader rejected it (``rejection``). Sample names say where each came from: ``00000.tar/KEY``,
``train-00000.parquet#ROW`` (row within the file, from 0), or the image's path in the folder.
Nothing is extracted to disk.
"""
from __future__ import annotations

import contextlib
import json
import os
import tarfile
from collections.abc import Iterator
from typing import Any

from atoken.data_pipeline import objects
from atoken.data_pipeline.images import IMAGE_EXTENSIONS
from atoken.model.errors import UserError

from .shard_writer import reason

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
PARQUET_EXTENSIONS = (".parquet",)

# Rejection categories: every rejection reason starts with one, then ": " and the detail.
UNDECODABLE = "undecodable"
NO_IMAGE = "no image"
TOO_SMALL = "below --min-side"
NO_CAPTION = "no caption"
TRUNCATED = "truncated tar member"
NO_COLUMNS = "parquet file without the named columns"
DAMAGED = "damaged input file"
MISSING_FILE = "missing file"  # a video manifest's row whose clip cannot be read
CATEGORIES = (UNDECODABLE, NO_IMAGE, TOO_SMALL, NO_CAPTION, TRUNCATED, NO_COLUMNS, DAMAGED, MISSING_FILE)

Item = tuple[str, "dict[str, Any] | str"]


def rejection(category: str, detail: str) -> str:
    return f"{category}: {detail}"


def category(why: str) -> str:
    """The category of a rejection reason (older writers' reasons: their exception name)."""
    return why.split(":", 1)[0]


def _has(url: str, extensions: tuple[str, ...]) -> bool:
    return url.lower().endswith(extensions)


def detect_form(files: list[str], where: str) -> str:
    """"webdataset", "parquet" or "images", from the files a folder or prefix holds.

    Tars win: img2dataset writes a ``.parquet`` of metadata (and ``_stats.json``) beside each tar.
    """
    if any(_has(f, TAR_EXTENSIONS) for f in files):
        return "webdataset"
    if any(_has(f, PARQUET_EXTENSIONS) for f in files):
        return "parquet"
    if any(_has(f, IMAGE_EXTENSIONS) for f in files):
        return "images"
    raise UserError(f"{where} holds no inputs: image files ({', '.join(IMAGE_EXTENSIONS)}), WebDataset "
                    f"shards ({', '.join(TAR_EXTENSIONS)}) or Parquet files (.parquet)")


FORM_EXTENSIONS = {"webdataset": TAR_EXTENSIONS, "parquet": PARQUET_EXTENSIONS, "images": IMAGE_EXTENSIONS}


def list_inputs(where: str) -> tuple[str, list[str], list[str]]:
    """(form, input files, their names relative to ``where``), sorted by name."""
    files = objects.list_files(where)
    form = detect_form(files, where)
    root = objects.join(where, "")
    inputs = [f for f in files if _has(f, FORM_EXTENSIONS[form])]
    names = [f[len(root):] if f.startswith(root) else os.path.relpath(f, where) for f in inputs]
    order = sorted(range(len(inputs)), key=names.__getitem__)
    return form, [inputs[i] for i in order], [names[i] for i in order]


def _split_key(member: str) -> tuple[str, str]:
    """WebDataset's key and extension: ``a/b/000001.jpg`` -> (``a/b/000001``, ``jpg``)."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_item(members: dict[str, bytes]) -> dict[str, Any] | str:
    image = next((ext for ext in members if f".{ext}" in IMAGE_EXTENSIONS), None)
    if image is None:
        return rejection(NO_IMAGE, f"no image member (has: {', '.join('.' + e for e in sorted(members))})")
    caption = members["txt"].decode("utf-8", "replace").strip() if "txt" in members else None
    if not caption and "json" in members:
        try:
            meta = json.loads(members["json"])
            caption = str(meta.get("caption") or "").strip() if isinstance(meta, dict) else None
        except ValueError:
            pass  # damaged metadata only: the caption is looked for, the sample does not depend on it
    return {"image": members[image], "caption": caption or None, "label": -1}


def read_webdataset(url: str, name: str) -> Iterator[Item]:
    """(``name/KEY``, item) for each key of one tar, streamed; a truncated member rejects its key and
    ends the file (nothing after it can be located), a file that is no tar is one rejection."""
    key, members = None, {}
    try:
        with contextlib.closing(objects.open_stream(url)) as raw, tarfile.open(fileobj=(f := _Tail(raw)),
                                                                              mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                if k != key:
                    if key is not None:
                        yield f"{name}/{key}", _tar_item(members)
                    key, members = k, {}
                try:
                    members[ext] = tar.extractfile(member).read()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    yield f"{name}/{key}", rejection(TRUNCATED, f"{member.name}: {reason(e)}")
                    key = None
                    return
            if key is not None:
                last, key = key, None  # yielded: an error from here on must not yield it again
                yield f"{name}/{last}", _tar_item(members)
            # NOTE: tarfile's stream mode ends quietly at a damaged or cut header after the first one;
            # an uncompressed tar must end in zeros only, at least the two blocks of its end marker.
            after = f.after(tar.offset) if not url.lower().endswith((".gz", ".tgz")) else bytes(1024)
            if after is None or any(after) or len(after) < 2 * tarfile.BLOCKSIZE:
                yield name, rejection(DAMAGED, f"unreadable or cut tar header at byte {tar.offset}: the rest "
                                      "of the file is not read")
    except (tarfile.TarError, EOFError, OSError) as e:
        if key is not None:  # the header after a complete key is cut: that key is whole, yield it
            yield f"{name}/{key}", _tar_item(members)
        yield name, rejection(DAMAGED, f"{reason(e)} (nothing after this point of the tar is read)")
    except Exception as e:  # noqa: BLE001 - an unreadable input (S3 error, ...) is named, the part goes on
        yield name, rejection(DAMAGED, reason(e))


class _Tail:
    """A file read through, counting bytes and keeping the last ``keep`` of them: what a tar reader
    left unread can be checked afterwards."""

    def __init__(self, f, keep: int = 1 << 16):
        self.f, self.pos, self.tail, self.keep = f, 0, bytearray(), keep

    def read(self, n: int = -1) -> bytes:
        data = self.f.read() if n is None or n < 0 else self.f.read(n)
        self.pos += len(data)
        self.tail += data
        del self.tail[:-self.keep]
        return data

    def after(self, offset: int) -> bytes | None:
        """The bytes from ``offset`` to the end of the file (reading the rest), or None when over ``keep``."""
        while self.read(self.keep):
            if self.pos - offset > self.keep:
                return None
        start = self.pos - len(self.tail)
        return bytes(self.tail[offset - start:]) if offset >= start else None


def read_parquet(url: str, name: str, image_column: str = "image", caption_column: str | None = "text",
                 label_column: str | None = None, rows_per_batch: int = 64) -> Iterator[Item]:
    """(``name#ROW``, item) for each row of one Parquet file, ``rows_per_batch`` rows in memory."""
    import pyarrow.parquet as pq  # noqa: PLC0415 - only Parquet inputs need it

    row = 0
    try:
        with contextlib.closing(objects.open_seekable(url)) as f, pq.ParquetFile(f) as pf:
            have = pf.schema_arrow.names
            wanted = [c for c in (image_column, caption_column, label_column) if c]
            missing = [c for c in wanted if c not in have]
            if missing:
                yield name, rejection(NO_COLUMNS, f"no column {', '.join(map(repr, missing))} among {have}; its "
                                      f"{pf.metadata.num_rows} rows are left out (name the columns with "
                                      "--image-column, --caption-column, --label-column)")
                return
            for batch in pf.iter_batches(batch_size=rows_per_batch, columns=wanted):
                cols = {c: batch.column(c).to_pylist() for c in wanted}
                for i in range(batch.num_rows):
                    yield f"{name}#{row}", _parquet_item(cols, i, image_column, caption_column, label_column)
                    row += 1
    except Exception as e:  # noqa: BLE001 - a damaged file is named and skipped from here on, the part goes on
        where = f"from row {row} on" if row else "no row"
        yield name, rejection(DAMAGED, f"{reason(e)} ({where} read)")


def _parquet_item(cols: dict[str, list], i: int, image_column: str, caption_column: str | None,
                  label_column: str | None) -> dict[str, Any] | str:
    image = cols[image_column][i]
    data = image.get("bytes") if isinstance(image, dict) else image  # datasets.Image: {bytes, path}
    if not data:
        path = image.get("path") if isinstance(image, dict) else None
        return rejection(NO_IMAGE, "no image bytes" + (f" (only a path: {path!r})" if path else ""))
    caption = cols[caption_column][i] if caption_column else None
    label = cols[label_column][i] if label_column else None
    return {"image": bytes(data), "caption": str(caption).strip() if caption is not None else None,
            "label": -1 if label is None else int(label)}

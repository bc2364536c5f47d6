"""The loop every shard writer shares: check each input (in worker processes), write the good ones
to MDS shards in sorted name order, list the rejected ones with their reason.

A modality's writer supplies ``check(path) -> (sample dict, "")`` or ``(None, reason)``, and its MDS
columns; ``write_shards`` does the rest (progress bar, output to a folder or s3://, counts).
An s3:// output is uploaded by MDSWriter itself (boto3: S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from atoken.data_pipeline.workers import worker_context, worker_init
from atoken.model.errors import UserError

Check = Callable[[Path], tuple[dict[str, Any] | None, str]]


def list_files(folder: str | os.PathLike, extensions: Iterable[str]) -> list[Path]:
    """Files under ``folder`` (recursive) with one of ``extensions``, sorted by relative path."""
    root, exts = Path(folder), tuple(e.lower() for e in extensions)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {str(root)!r} does not exist or is not a folder")
    return sorted((p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file()),
                  key=lambda p: p.relative_to(root).as_posix())


def sidecar_caption(path: Path) -> str:
    """The caption of an input: the text of ``<stem>.txt`` beside it (stripped), or "" if none."""
    sidecar = path.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""


def reason(e: BaseException) -> str:
    """A one-line rejection reason for an exception."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def resolve_inputs(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike], extensions: Iterable[str],
                   root: str | os.PathLike | None = None) -> tuple[list[Path], list[str]]:
    """(paths, names) sorted by name; names are relative to ``root`` (default: the folder, or the
    files' common parent folder)."""
    exts = tuple(extensions)
    if isinstance(paths_or_dir, (str, os.PathLike)):
        root = Path(paths_or_dir) if root is None else Path(root)
        paths = list_files(paths_or_dir, exts)
        if not paths:
            raise ValueError(f"no input files ({', '.join(exts)}) under {str(paths_or_dir)!r}")
    else:
        paths = [Path(p) for p in paths_or_dir]
        if not paths:
            raise ValueError("no input files given")
        root = Path(root) if root is not None else Path(os.path.commonpath([p.absolute().parent for p in paths]))
    names = [p.absolute().relative_to(root.absolute()).as_posix() for p in paths]
    order = sorted(range(len(paths)), key=names.__getitem__)
    return [paths[i] for i in order], [names[i] for i in order]


def write_shards(paths: list[Path], names: list[str], out: str, columns: dict[str, str], check: Check, *,
                 desc: str, size_limit: int | str = "64mb", overwrite: bool = False, workers: int = 1,
                 progress: bool = True) -> tuple[int, list[tuple[str, str]]]:
    """Write ``check(path)``'s sample (plus ``name``) for every input that passes, in order.

    Returns (samples written, [(name, reason)] rejected). ``check`` must be picklable (a module-level
    function or a functools.partial of one) when ``workers`` > 1.
    """
    return write_samples(zip(names, paths, strict=True), out, columns, check, desc=desc, total=len(paths),
                         size_limit=size_limit, overwrite=overwrite, workers=workers, progress=progress)


def write_samples(items: Iterable[tuple[str, Any]], out: str, columns: dict[str, str], check: Callable, *,
                  desc: str, total: int | None = None, size_limit: int | str = "64mb", overwrite: bool = False,
                  workers: int = 1, progress: bool = True) -> tuple[int, list[tuple[str, str]]]:
    """``write_shards`` over a stream of (name, item): ``check(item)`` makes the sample; an item that
    is a string is a rejection reason already (its reader found it damaged), passed through.

    Items are consumed as they are checked, at most a few per worker ahead: memory stays bounded
    however long the stream.
    """
    if "://" not in out and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"output {out!r} is an existing file, not a folder: choose another output path")
    from streaming import MDSWriter  # noqa: PLC0415 - streaming takes seconds to import: the CLIs' --help stays fast

    written, rejected = 0, []
    pool = None
    if workers > 1:  # not fork: MDSWriter uploads from threads (data_pipeline/workers.py)
        pool = ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=worker_init())
    try:
        # Checking (decoding, rendering: the slow part) may run in worker processes, in order.
        checked = ordered_map(functools.partial(_check_or_pass, check), items, pool, ahead=8 * workers)
        with MDSWriter(columns=columns, out=out, size_limit=size_limit, exist_ok=overwrite) as writer:
            for name, (sample, why) in tqdm(checked, total=total, desc=desc, unit="sample", disable=not progress):
                if sample is None:
                    rejected.append((name, why))
                    continue
                writer.write({**sample, "name": name})
                written += 1
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return written, rejected


def _check_or_pass(check: Callable, item: Any) -> tuple[dict[str, Any] | None, str]:
    return (None, item) if isinstance(item, str) else check(item)


def ordered_map(fn: Callable, items: Iterable[tuple[str, Any]], pool: ProcessPoolExecutor | None,
                ahead: int) -> Iterator[tuple[str, Any]]:
    """(name, fn(item)) for each (name, item), in order; with a pool, at most ``ahead`` in flight
    (``Executor.map`` would read the whole input first)."""
    if pool is None:
        yield from ((name, fn(item)) for name, item in items)
        return
    window: collections.deque = collections.deque()
    for name, item in items:
        window.append((name, pool.submit(fn, item)))
        if len(window) >= ahead:
            done_name, future = window.popleft()
            yield done_name, future.result()
    while window:
        done_name, future = window.popleft()
        yield done_name, future.result()


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("out", help="output: a local folder or s3://bucket/prefix")
    ap.add_argument("--size-limit", default="64mb", help="shard size limit, e.g. 64mb (default)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    ap.add_argument("--workers", type=int, default=1, help="worker processes checking inputs (default 1)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(write: Callable[[], tuple[int, list[tuple[str, str]]]], empty_ok: bool = False) -> int:
    """Run a writer for a CLI: clear errors (exit 2), every rejection listed, the final counts; exit 1
    if nothing was written, unless ``empty_ok`` (a part of a split run may hold only rejected inputs)."""
    try:
        written, rejected = write()
    except (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:
        hint = " (pass --overwrite to replace it)" if isinstance(e, FileExistsError) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    for name, why in rejected:
        print(f"rejected {name}: {why}")
    print(f"wrote {written} samples, rejected {len(rejected)}")
    return 0 if written or empty_ok else 1

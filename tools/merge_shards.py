"""Merge the parts of a split conversion (``tools/parts.py``) into one MDS dataset.

    atoken-merge-shards OUT            # OUT: the folder or s3:// prefix the --part runs wrote to

Refuses, naming them, parts missing or unfinished (no ``part.json``); else writes ``OUT/index.json``
with streaming's own ``merge_index`` (the shards stay in their part folders) and the rejection totals
in ``OUT/rejections.json`` (per part and in all, by reason; each rejected sample's name and reason are
in its part's part.json). Train with ``data.streams.NAME.remote=OUT``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

from atoken.data_pipeline import objects
from atoken.model.errors import UserError, cli

from .parts import MARKER, PART_DIR, Part

REJECTIONS = "rejections.json"
INDEX = "index.json"


def merge_parts(out: str) -> dict:
    """Write ``out/index.json`` over every part and ``out/rejections.json``; returns the totals."""
    from streaming.base.util import merge_index  # noqa: PLC0415 - streaming is slow to import

    files = objects.list_files(out)
    root = objects.join(out, "")
    rel = [f[len(root):] if f.startswith(root) else os.path.relpath(f, out) for f in files]
    rel = [r.replace(os.sep, "/") for r in rel]
    folders = {r.split("/")[0] for r in rel if "/" in r and PART_DIR.match(r.split("/")[0])}
    if not folders:
        raise UserError(f"{out}: no parts (part-IIIII-of-NNNNN folders) to merge: write them with --part I/N")
    counts = sorted({int(PART_DIR.match(f)[2]) for f in folders})
    if len(counts) > 1:
        raise UserError(f"{out} holds parts of {' and of '.join(map(str, counts))} parts: keep one split (remove "
                        "the other's part folders) and merge again")
    parts = [Part(i, counts[0]) for i in range(counts[0])]
    missing = [p.folder for p in parts if p.folder not in folders]
    unfinished = [p.folder for p in parts if p.folder in folders and f"{p.folder}/{MARKER}" not in rel]
    if missing or unfinished:
        what = ([f"missing: {', '.join(missing)}"] if missing else []) + (
            [f"unfinished (no {MARKER}): {', '.join(unfinished)}"] if unfinished else [])
        raise UserError(f"{out}: cannot merge, parts {'; '.join(what)}: run those parts (again) first")
    summaries = [json.loads(objects.read_bytes(objects.join(out, p.folder, MARKER))) for p in parts]
    indexes = [objects.join(out, p.folder, INDEX) for p in parts if f"{p.folder}/{INDEX}" in rel]
    if not objects.is_remote(out) and os.path.exists(os.path.join(out, INDEX)):
        os.remove(os.path.join(out, INDEX))  # a merge before this one: merge_index will not move over it
    merge_index(indexes, out, keep_local=not objects.is_remote(out))
    totals = collections.Counter()
    for s in summaries:
        totals.update(s["rejected"])
    report = {"parts": len(parts), "samples": sum(s["samples"] for s in summaries),
              "rejected": sum(totals.values()), "rejected_by_reason": dict(sorted(totals.items())),
              "per_part": [{"part": p.folder, "samples": s["samples"], "rejected": s["rejected"]}
                           for p, s in zip(parts, summaries, strict=True)]}
    objects.write_bytes(objects.join(out, REJECTIONS), json.dumps(report, indent=1).encode())
    return report


@cli
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="atoken-merge-shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the OUT the parts were written to: a local folder or s3://bucket/prefix")
    args = ap.parse_args(argv)
    report = merge_parts(args.out)
    for name, n in report["rejected_by_reason"].items():
        print(f"rejected {n}: {name}")
    print(f"merged {report['parts']} parts: {report['samples']} samples, rejected {report['rejected']} "
          f"(each listed in its part's {MARKER}; totals in {objects.join(args.out, REJECTIONS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One conversion split into parts across a cluster, and the merge of the parts into one dataset.

    atoken-make-image-shards INPUT OUT --part 0/2      # on one machine (or Slurm array task 0)
    atoken-make-image-shards INPUT OUT --part 1/2      # on another
    atoken-merge-shards OUT                            # one index.json over both, totals beside it

Part I of N (I from 0) takes the I-th of N contiguous runs of the sorted input files (sizes differ by
at most one file; the merged dataset is in the same order as one unsplit run) and writes an MDS
dataset under ``OUT/part-IIIII-of-NNNNN/``. Without ``--part``, a Slurm array task takes part
``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``.

A part is complete when its ``part.json`` exists: it is written last, and holds the part's sample
count and every rejection (name, reason), counted by category. A rerun skips a complete part and
redoes an unfinished one from scratch (its folder removed first), never appending to it.
``atoken-merge-shards`` (``tools/merge_shards.py``) then writes the one index over the parts.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence

from atoken.data_pipeline import objects
from atoken.model.errors import UserError

from .sources import category

MARKER = "part.json"
PART_DIR = re.compile(r"^part-(\d{5})-of-(\d{5})$")

Written = tuple[int, list[tuple[str, str]]]


@dataclasses.dataclass(frozen=True)
class Part:
    index: int  # from 0
    count: int

    @property
    def folder(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, n: int) -> range:
        """This part's inputs among ``n`` sorted ones: a contiguous run, sizes within one of each other."""
        return range(self.index * n // self.count, (self.index + 1) * n // self.count)


def parse_part(text: str) -> Part:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m[1]) < int(m[2]) or int(m[2]) > 99999:
        raise UserError(f"--part {text!r}: expected I/N with 0 <= I < N <= 99999, e.g. --part 0/8")
    return Part(int(m[1]), int(m[2]))


def part_from(arg: str | None, env: dict[str, str] | os._Environ = os.environ) -> Part | None:
    """``--part`` if given, else the Slurm array task's part, else None (one unsplit run)."""
    if arg:
        return parse_part(arg)
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return parse_part(f"{int(env['SLURM_ARRAY_TASK_ID']) - first}/{env['SLURM_ARRAY_TASK_COUNT']}")
    return None


def add_part_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--part", metavar="I/N",
                    help="convert only part I of N (I from 0) of the sorted input files, into OUT/part-IIIII-of-"
                         "NNNNN/; default in a Slurm array job: the array task's part. Then: atoken-merge-shards OUT")


def write_part(out: str, part: Part, names: Sequence[str], write: Callable[[range, str], Written]) -> Written:
    """Run ``write(selected input indices, part folder)`` for a part unless it is complete; mark it complete."""
    target = objects.join(out, part.folder)
    marker = objects.join(target, MARKER)
    if objects.exists(marker):
        done = json.loads(objects.read_bytes(marker))
        print(f"part {part} is complete already ({marker}): skipping it")
        return done["samples"], [(r["name"], r["reason"]) for r in done["rejections"]]
    objects.remove_tree(target)  # an unfinished earlier try: redone from scratch, never appended to
    chosen = part.select(len(names))
    written, rejected = write(chosen, target)
    summary = {"part": part.index, "parts": part.count, "inputs": [names[i] for i in chosen], "samples": written,
               "rejected": dict(sorted(collections.Counter(category(why) for _, why in rejected).items())),
               "rejections": [{"name": n, "reason": why} for n, why in rejected]}
    objects.write_bytes(marker, json.dumps(summary, indent=1).encode())  # last: the part is complete
    return written, rejected

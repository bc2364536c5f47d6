"""What the benchmark scripts share: the fixed mixed-resolution batch, the device description, the
git state, and /proc readers. The scripts run as files (``python benchmarks/x.py`` or torchrun),
so this folder is on ``sys.path`` and they ``import common``."""
from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import numpy as np
import torch

from atoken.data_pipeline.images import sample_resolution, training_size
from atoken.model import PackedBatch, patchify
from atoken.model.config import PATCH_HW

# (height, width) aspect ratios of the source photos the resolution policy resizes.
ASPECTS = [(1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16)]


def image_sizes(tokens: int, seed: int, min_res: int, max_res: int) -> list[tuple[int, int]]:
    """(height, width) of images of exactly ``tokens`` patches in all, at the training resolution
    policy (``data_pipeline.images``: a longer side uniform over [min_res, max_res] in steps of 16,
    the aspect ratio kept). Greedy, like the packer; the last gap is filled by one image of the
    remaining patches (as square as the count divides), so every DP rank does equal work."""
    rng = np.random.default_rng(seed)
    max_res = min(max_res, PATCH_HW * math.isqrt(tokens))  # one image must fit
    min_res = min(min_res, max_res)
    sizes, used, misses = [], 0, 0
    while used < tokens and misses < 50:
        a, b = ASPECTS[rng.integers(len(ASPECTS))]
        h, w = training_size(4096 * a // max(a, b), 4096 * b // max(a, b), sample_resolution(rng, min_res, max_res))
        n = (h // PATCH_HW) * (w // PATCH_HW)
        if used + n > tokens:
            misses += 1
            continue
        sizes.append((h, w))
        used += n
    if used < tokens:
        r = tokens - used
        ph = max(d for d in range(1, math.isqrt(r) + 1) if r % d == 0)
        sizes.append((PATCH_HW * ph, PATCH_HW * (r // ph)))
    return sizes


def packed_batch(sizes: list[tuple[int, int]], seed: int) -> PackedBatch:
    """Random-pixel images of these sizes, packed."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for h, w in sizes:
        f, c, grid = patchify(torch.rand(3, h, w, generator=g) * 2 - 1)
        parts.append((f, c, grid, "image", 1))
    return PackedBatch.cat(parts, names=[f"{h}x{w}" for h, w in sizes])


def resolve_device(name: str) -> torch.device:
    """A script's ``--device``: "auto" is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_info() -> dict:
    return {"type": "cpu", "name": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def device_slug(info: dict) -> str:
    """``cpu`` or the GPU's name in lower case, for result file names."""
    return "cpu" if info["type"] == "cpu" else re.sub(r"[^a-z0-9]+", "_", info["name"].lower()).strip("_")


def git_state() -> dict:
    """The atoken commit the numbers come from, and whether the work tree had changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout)
    except OSError:
        commit, dirty = None, None
    return {"atoken_commit": commit, "atoken_worktree_dirty": dirty}


def proc_status_bytes(field: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def write_report(report: dict, out: str | None, default_name: str) -> Path:
    """Write ``report`` as JSON to ``out``, or to ``results/<default_name>`` beside the scripts."""
    path = Path(out) if out else Path(__file__).resolve().parent / "results" / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path

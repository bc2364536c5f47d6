"""Streaming image-reconstruction dataset: one MDS sample -> one patchified image at a sampled size.

Each sample's resolution is drawn from (seed, epoch, global sample index), so a resumed run, or any
number of DataLoader workers, sees identical tensors. An undecodable sample does not raise: it comes
back as a marker dict (``is_bad``) carrying the error and its shard and index, so the main process,
not a DataLoader worker whose counters nobody sees, counts and logs it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

import numpy as np
from streaming import StreamingDataset

from ..model.packed import IMAGE
from ..model.patches import patchify
from .config import DataConfig
from .images import open_rgb, resize_for_training, sample_resolution


def resolve_location(remote: str, local: str | None) -> tuple[str | None, str]:
    """(remote, local) for StreamingDataset: a local ``remote`` without cache dir is read in place;
    a URL without one is cached under $TMPDIR/atoken-mds/<hash of the URL>.

    NOTE: the default cache path is deterministic so that all local ranks of a node agree on it (as
    streaming requires) and a restarted job reuses the shards already downloaded.
    """
    if local is None:
        if "://" not in remote:
            return None, remote
        local = os.path.join(tempfile.gettempdir(), "atoken-mds", hashlib.sha1(remote.encode()).hexdigest()[:16])
    return remote, local


def is_bad(sample: dict[str, Any]) -> bool:
    return "error" in sample


class ImageDataset(StreamingDataset):
    """MDS image shards (columns: ``images.IMAGE_COLUMNS``) -> patchified samples.

    ``dataset[idx]`` (global sample index) returns
      {"features": [n, 3072] float32 in [-1, 1], "coords": [n, 4] int64, "grid": (1, h, w, 1),
       "frames": 1, "modality": "image", "name": str, "idx": int}
    or, for an undecodable sample,
      {"error": str, "name": str, "idx": int, "shard": shard file name, "index_in_shard": int}.
    """

    def __init__(self, cfg: DataConfig, **streaming_kwargs):
        remote, local = resolve_location(cfg.remote, cfg.local)
        # batch_size=1: the DataLoader hands out single samples, and streaming needs the same number
        # to lay out its per-worker order (and to resume it).
        super().__init__(remote=remote, local=local, shuffle=cfg.shuffle, shuffle_seed=cfg.seed,
                         batch_size=1, **streaming_kwargs)
        self.cfg = cfg
        self._epoch = 0  # set per process (worker) when an epoch starts; 0 for random access

    def _resume_incr_epoch(self) -> tuple[int, int]:
        # NOTE: streaming decides the epoch (fresh or resumed) here, in each worker process, and does
        # not keep it; we keep it to key the resolution draw. Private hook of streaming 0.13.
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._epoch = epoch
        return epoch, sample_in_epoch

    def locate(self, idx: int) -> tuple[str, int]:
        """Global sample index -> (shard file name, index within that shard)."""
        shard_id, in_shard = self.spanner[idx]
        raw = getattr(self.shards[shard_id], "raw_data", None)
        return (raw.basename if raw is not None else f"shard {shard_id}"), int(in_shard)

    def get_item(self, idx: int, retry: int = 7) -> dict[str, Any]:
        # Errors reading the shard itself (missing file, failed download) still raise: those are
        # infrastructure failures, not a bad sample.
        raw = super().get_item(idx, retry)
        name = str(raw.get("name", idx))
        try:
            rng = np.random.default_rng([self.cfg.seed, self._epoch, idx])
            target = sample_resolution(rng, self.cfg.min_res, self.cfg.max_res)
            features, coords, grid = patchify(resize_for_training(open_rgb(raw["image"]), target))
        except Exception as e:  # noqa: BLE001 - any decode failure marks the sample bad
            shard, in_shard = self.locate(idx)
            return {"error": f"{type(e).__name__}: {e}", "name": name, "idx": idx, "shard": shard,
                    "index_in_shard": in_shard}
        return {"features": features, "coords": coords, "grid": grid, "frames": 1, "modality": IMAGE,
                "name": name, "idx": idx}

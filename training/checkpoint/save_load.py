"""Save every rank's part of a checkpoint atomically, and load it back (at the saved layout, or at
another through reshard.py)."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from .layout import (
    LAYOUT,
    STAGING,
    UNIVERSAL,
    atomic_write,
    client_state,
    current_layout,
    dp_rank,
    ema_file,
    rank_file,
    read_layout,
    tag_for,
    tp_rank_size,
)
from .reshard import check_same_model, load_ema_resharded, load_resharded, universal_checkpoint_info
from .rng import rng_state, set_rng_state

log = logging.getLogger(__name__)


def save(engine, ema, generators: dict[str, torch.Generator], client: dict, ckpt_dir: Path, step: int,
         keep: int) -> Path:
    """Every rank calls this and writes its own part. ``generators``: the run's own RNG streams
    (saved per rank). Returns the final checkpoint path."""
    rank, tag = dist.get_rank(), tag_for(step)
    staging = ckpt_dir / STAGING
    layout = current_layout(engine)
    if rank == 0 and staging.exists():
        shutil.rmtree(staging)  # half-written saves of a run that crashed before
    dist.barrier()
    # DeepSpeed stores this in the model-states files; ds_to_universal reads it to merge TP shards.
    engine.module.universal_checkpoint_info = universal_checkpoint_info(layout)
    engine.save_checkpoint(str(staging), tag=tag, client_state=client, save_latest=False)
    part = staging / tag
    # DeepSpeed keeps the client state of one DP rank per TP rank (ZeRO 1/2); every rank keeps its own
    # here, with its RNG (a data loader's position may differ per rank). This copy is what is read back.
    torch.save({"rng": rng_state(generators), "client": client}, part / rank_file(rank))
    tp_rank, d = tp_rank_size(engine)[0], dp_rank(engine)
    if layout.zero_stage == 3 or d == 0:  # ZeRO-3: every rank holds a distinct EMA partition
        torch.save(ema.state_dict(), part / ema_file(layout.zero_stage, tp_rank, d))
    if rank == 0:
        (part / LAYOUT).write_text(layout.to_json())
    dist.barrier()
    final = ckpt_dir / tag
    if rank == 0:
        if final.exists():  # a complete save of this step that ``latest`` never named: replace it
            shutil.rmtree(final)
        shutil.rmtree(ckpt_dir / UNIVERSAL / tag, ignore_errors=True)  # ... and its universal form
        os.replace(part, final)
        shutil.rmtree(staging, ignore_errors=True)  # emptied by the rename; a normal run leaves none
        atomic_write(ckpt_dir / "latest", tag + "\n")
        _prune(ckpt_dir, keep)
        log.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def _prune(ckpt_dir: Path, keep: int) -> None:
    tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old)
    for uc in (ckpt_dir / UNIVERSAL).glob("step_*"):  # universal forms of pruned checkpoints
        if not (ckpt_dir / uc.name).is_dir():
            shutil.rmtree(uc)


def load(engine, ema, generators: dict[str, torch.Generator], path: Path) -> dict:
    """Load model, optimizer, scheduler, EMA and this rank's RNG, at the saved layout or another.
    Every rank calls this. Returns the client state: this rank's own at the saved (tp, dp), else
    global rank 0's."""
    saved, now = read_layout(path), current_layout(engine)
    if saved.sharding() == now.sharding():
        load_path, ds_state = engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        tp_rank = tp_rank_size(engine)[0]
        ema.load_state_dict(torch.load(path / ema_file(now.zero_stage, tp_rank, dp_rank(engine)),
                                       map_location="cpu"))
    else:
        log.warning("checkpoint %s was saved at tp=%d dp=%d ZeRO-%d; resuming at tp=%d dp=%d ZeRO-%d through "
                    "a universal checkpoint", path, *saved.sharding(), *now.sharding())
        check_same_model(saved, now)
        ds_state = load_resharded(engine, path, saved, now)
        load_ema_resharded(engine, ema, path, saved, now)
    own = path / rank_file(dist.get_rank())
    if saved.sharding()[:2] == now.sharding()[:2] and own.exists():
        own = torch.load(own, weights_only=False)
        set_rng_state(own["rng"], generators)
        client = own["client"]
    else:
        log.warning("no RNG state for rank %d in %s (saved at another layout): RNG streams continue from "
                    "this run's seeds, and the client state is TP rank 0 / DP rank 0's", dist.get_rank(), path)
        client = client_state(path, 0)
    if "ds_config" in ds_state and ds_state["ds_config"].get("train_batch_size") != engine.train_batch_size():
        log.warning("global batch changed from %s to %s micro-batches (DP x micro-batches per step)",
                    ds_state["ds_config"].get("train_batch_size"), engine.train_batch_size())
    log.info("resumed from %s at step %d", path, client["step"])
    return client

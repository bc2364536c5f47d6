"""Save every rank's part of a checkpoint (a snapshot on the step, the files written in the
background, committed atomically and durably: writer.py), and load it back (at the saved layout,
or at another through reshard.py)."""
from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from .deepspeed_internals import snapshotting
from .export import tp_rank_ema
from .layout import (
    LAYOUT,
    STAGING,
    UNIVERSAL,
    client_state,
    current_layout,
    ema_file,
    ema_names,
    rank_file,
    read_layout,
    tag_for,
)
from .reshard import check_same_model, load_ema_resharded, load_resharded, universal_checkpoint_info
from .rng import rng_state, set_rng_state
from .writer import Writer, atomic_write, fsync_dir, snapshot

log = logging.getLogger(__name__)


def save(engine, ema, dims, generators: dict[str, torch.Generator], client: dict, ckpt_dir: Path, step: int,
         keep: int, writer: Writer) -> Path:
    """Every rank calls this and writes its own part. ``dims``: the trainer's ``ParallelDims``;
    ``generators``: the run's own RNG streams (saved per rank). Blocks only while the state is
    snapshotted (and first for a previous write still in flight); ``writer`` writes and commits it.
    Returns the path the checkpoint will have once committed."""
    rank, tag = dist.get_rank(), tag_for(step)
    writer.wait()  # one write in flight at most; a failed one stops the run here
    staging = ckpt_dir / STAGING
    layout = current_layout(engine, dims)
    if rank == 0 and staging.exists():
        shutil.rmtree(staging)  # half-written saves of a run that crashed before
    dist.barrier()
    take = functools.partial(snapshot, buffers=writer.buffers)
    # DeepSpeed stores this in the model-states files; ds_to_universal reads it to merge TP shards.
    engine.module.universal_checkpoint_info = universal_checkpoint_info(layout)
    with snapshotting(engine, take) as files:  # DeepSpeed's own files, as it would write them
        engine.save_checkpoint(str(staging), tag=tag, client_state=client, save_latest=False)
    part = staging / tag
    files = [(Path(path), state) for path, state in files]
    # DeepSpeed keeps the client state of one DP rank per TP rank (ZeRO 1/2); every rank keeps its own
    # here, with its RNG (a data loader's position may differ per rank). This copy is what is read back.
    files.append((part / rank_file(rank), take({"rng": rng_state(generators), "client": client})))
    # The EMA, written by every rank: under ZeRO-3 its own partitions; under ZeRO 1/2 (where every DP
    # rank holds all of it) its share of the names, so no rank writes the whole EMA alone.
    shadow = ema.state_dict()
    if layout.zero_stage != 3:
        shadow = {n: shadow[n] for n in ema_names({n: s for n, (s, _) in layout.params.items()}, dims.dp,
                                                  dims.dp_rank)}
    files.append((part / ema_file(dims.tp_rank, dims.dp_rank), take(shadow)))
    if rank == 0:
        files.append((part / LAYOUT, layout.to_json()))
    writer.submit(tag, files, functools.partial(_commit, ckpt_dir, tag, keep) if rank == 0 else None)
    return ckpt_dir / tag


def _commit(ckpt_dir: Path, tag: str, keep: int) -> None:
    """Rank 0, once every rank's files are durable: rename the staging directory into place, make
    the rename durable, then move ``latest`` (atomic_write: durable too), then prune."""
    staging, final = ckpt_dir / STAGING, ckpt_dir / tag
    if final.exists():  # a complete save of this step that ``latest`` never named: replace it
        shutil.rmtree(final)
    shutil.rmtree(ckpt_dir / UNIVERSAL / tag, ignore_errors=True)  # ... and its universal form
    os.replace(staging / tag, final)
    fsync_dir(ckpt_dir)
    atomic_write(ckpt_dir / "latest", tag + "\n")
    shutil.rmtree(staging, ignore_errors=True)  # emptied by the rename; a normal run leaves none
    _prune(ckpt_dir, tag, keep)
    log.info("saved checkpoint %s", final)


def _prune(ckpt_dir: Path, newest: str, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``newest`` (the one ``latest`` now names). Later
    tags are saves that a crash kept ``latest`` from naming: left for the next save of their step."""
    tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name <= newest)
    for old in tags[:-keep]:
        shutil.rmtree(old)
    for uc in (ckpt_dir / UNIVERSAL).glob("step_*"):  # universal forms of pruned checkpoints
        if not (ckpt_dir / uc.name).is_dir():
            shutil.rmtree(uc)


def load(engine, ema, dims, generators: dict[str, torch.Generator], path: Path) -> dict:
    """Load model, optimizer, scheduler, EMA and this rank's RNG, at the saved layout or another.
    Every rank calls this (with no write in flight: ``Writer.wait`` first). Returns the client
    state: this rank's own at the saved (tp, dp), else global rank 0's."""
    saved, now = read_layout(path), current_layout(engine, dims)
    if saved.sharding() == now.sharding():
        load_path, ds_state = engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        if now.zero_stage == 3:
            ema.load_state_dict(torch.load(path / ema_file(dims.tp_rank, dims.dp_rank), map_location="cpu"))
        else:
            ema.load_state_dict(tp_rank_ema(path, saved, dims.tp_rank))
    else:
        log.warning("checkpoint %s was saved at tp=%d dp=%d ZeRO-%d; resuming at tp=%d dp=%d ZeRO-%d through "
                    "a universal checkpoint", path, *saved.sharding(), *now.sharding())
        check_same_model(saved, now)
        ds_state = load_resharded(engine, dims, path, saved, now)
        load_ema_resharded(ema, dims, path, saved, now)
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

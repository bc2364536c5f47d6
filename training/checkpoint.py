"""Sharded, atomic checkpoints of everything resumable, and ``--resume auto``.

Layout of ``<run_dir>/checkpoints``::

    latest                  one line: the newest complete tag (replaced atomically, written last)
    step_00000100/          one complete checkpoint (DeepSpeed's files, one per rank, plus ours)
        mp_rank_00_model_states.pt          model + our client state (step, data, config)
        *_optim_states.pt                   optimizer shards, one per data-parallel rank
        ema_mp_rank_00.pt                   EMA weights of this tensor-parallel rank
        rng_rank_00000.pt                   per-rank RNG (torch, numpy, python)
    .staging/step_00000200/ a save in progress; renamed into place only when every rank is done

A crash mid-save leaves only a ``.staging`` directory, which ``latest`` never names.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STAGING = ".staging"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named by ``latest``, if that checkpoint is present."""
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{pointer} names {tag!r}, but {ckpt_dir / tag} is missing")
    return tag


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ema, client_state: dict, ckpt_dir: Path, step: int, keep: int) -> Path:
    """Every rank calls this. Returns the final checkpoint path."""
    rank = dist.get_rank()
    tag = tag_for(step)
    staging = ckpt_dir / STAGING
    if rank == 0 and (staging / tag).exists():
        shutil.rmtree(staging / tag)  # a save of this step that crashed before
    dist.barrier()
    engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
    part = staging / tag
    torch.save(rng_state(), part / f"rng_rank_{rank:05d}.pt")
    if engine.data_parallel_group is None or dist.get_rank(engine.data_parallel_group) == 0:
        mp_rank = engine.mpu.get_model_parallel_rank() if engine.mpu else 0
        torch.save(ema.state_dict(), part / f"ema_mp_rank_{mp_rank:02d}.pt")
    dist.barrier()
    final = ckpt_dir / tag
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(part, final)
        _atomic_write(ckpt_dir / "latest", tag + "\n")
        _prune(ckpt_dir, keep)
        log.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def _prune(ckpt_dir: Path, keep: int) -> None:
    tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old)


def resolve(resume: str, ckpt_dir: Path) -> Path | None:
    """The checkpoint directory to resume from, or None for a fresh start."""
    if resume == "auto":
        tag = latest_tag(ckpt_dir) if ckpt_dir.exists() else None
        return ckpt_dir / tag if tag else None
    if resume == "none":
        if ckpt_dir.exists() and latest_tag(ckpt_dir):
            raise FileExistsError(f"{ckpt_dir} already holds checkpoints; use checkpoint.resume=auto "
                                  "to continue, or another run_dir")
        return None
    path = Path(resume)
    if not (path / "mp_rank_00_model_states.pt").exists():
        raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a checkpoint directory "
                                "(no mp_rank_00_model_states.pt)")
    return path


def load(engine, ema, path: Path) -> dict:
    """Load model, optimizer, scheduler, EMA and this rank's RNG. Returns the client state."""
    load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    mp_rank = engine.mpu.get_model_parallel_rank() if engine.mpu else 0
    ema.load_state_dict(torch.load(path / f"ema_mp_rank_{mp_rank:02d}.pt", map_location="cpu"))
    rng_file = path / f"rng_rank_{dist.get_rank():05d}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("no RNG state for rank %d in %s (resumed at another world size)", dist.get_rank(), path)
    log.info("resumed from %s at step %d", path, client_state["step"])
    return client_state

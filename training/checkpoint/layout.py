"""Where a checkpoint's parts live and how its state is split: tags, file names, the ``latest``
pointer, the parallel ``Layout`` (tp, dp, ZeRO stage, per parameter its TP split), ZeRO-3's flat
partitions, and the one way to find a checkpoint from a path."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from atoken.model.errors import UserError

from ..shards import partition_dim

STAGING = ".staging"
UNIVERSAL = ".universal"
LAYOUT = "layout.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    """Global rank ``rank``'s RNG and its own copy of the client state."""
    return f"rank_{rank:05d}.pt"


def ema_file(stage: int, tp_rank: int, dp_rank_: int) -> str:
    return f"ema_zero_pp_rank_{dp_rank_}_mp_rank_{tp_rank:02d}.pt" if stage == 3 else f"ema_mp_rank_{tp_rank:02d}.pt"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------ finding a checkpoint

def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named by ``latest``, if that checkpoint is present."""
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise UserError(f"{pointer} names {tag!r}, but {ckpt_dir / tag} is missing: point it at a complete "
                        "checkpoint there, or pass checkpoint.resume=<a checkpoints/step_* directory>")
    return tag


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and ((path / LAYOUT).exists() or any(path.glob("*model_states.pt")))


def find(path: str | Path) -> Path | None:
    """The complete checkpoint a path means: a run directory or its ``checkpoints/`` (the one
    ``latest`` names), or a ``checkpoints/step_*`` directory itself; None if there is none."""
    p = Path(path)
    for ckpt_dir in (p / "checkpoints", p):
        tag = latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
        if tag is not None:
            return ckpt_dir / tag
    return p if is_checkpoint(p) else None


def resolve(resume: str, ckpt_dir: Path) -> Path | None:
    """``checkpoint.resume`` -> the checkpoint directory to resume from, or None for a fresh start."""
    if resume == "auto":
        tag = latest_tag(ckpt_dir) if ckpt_dir.exists() else None
        return ckpt_dir / tag if tag else None
    if resume == "none":
        if ckpt_dir.exists() and latest_tag(ckpt_dir):
            raise UserError(f"{ckpt_dir} already holds checkpoints; use checkpoint.resume=auto "
                            "to continue, or another run_dir")
        return None
    path = Path(resume)
    if not is_checkpoint(path):
        raise UserError(f"checkpoint.resume={resume!r} is not a checkpoint directory (no {LAYOUT} or "
                        "*model_states.pt): pass a checkpoints/step_* directory, auto or none")
    return path


def client_state(ckpt: Path, rank: int = 0) -> dict:
    """The client state (step, data position, run config) global rank ``rank`` saved: the one way
    it is read back (every rank keeps its own copy in its ``rank_NNNNN.pt``)."""
    return torch.load(ckpt / rank_file(rank), map_location="cpu", weights_only=False)["client"]


# ------------------------------------------------------------------ the parallel layout

@dataclass
class Layout:
    """How a run's state is split. ``params``: name -> (TP-local shape, TP split dim or None)."""
    tp: int
    dp: int
    zero_stage: int
    params: dict[str, tuple[list[int], int | None]]

    def sharding(self) -> tuple[int, int, int]:
        return self.tp, self.dp, self.zero_stage

    def full_shape(self, name: str) -> list[int]:
        shape, dim = self.params[name]
        shape = list(shape)
        if dim is not None:
            shape[dim] *= self.tp
        return shape

    def to_json(self) -> str:
        return json.dumps({"tp": self.tp, "dp": self.dp, "zero_stage": self.zero_stage,
                           "params": {n: {"shape": s, "partition_dim": d} for n, (s, d) in self.params.items()}},
                          indent=1)

    @classmethod
    def read(cls, ckpt: Path) -> Layout:
        d = json.loads((ckpt / LAYOUT).read_text())
        return cls(d["tp"], d["dp"], d["zero_stage"],
                   {n: (p["shape"], p["partition_dim"]) for n, p in d["params"].items()})


def tp_rank_size(engine) -> tuple[int, int]:
    from deepspeed.utils.bwc import (  # noqa: PLC0415 - DeepSpeed picks its accelerator on import: after distributed.init()
        bwc_tensor_model_parallel_rank,
        bwc_tensor_model_parallel_world_size,
    )

    return bwc_tensor_model_parallel_rank(engine.mpu), bwc_tensor_model_parallel_world_size(engine.mpu)


def dp_rank(engine) -> int:
    return dist.get_rank(engine.data_parallel_group) if engine.data_parallel_group is not None else 0


def current_layout(engine) -> Layout:
    params = {n: (list(getattr(p, "ds_shape", p.shape)), partition_dim(p))
              for n, p in engine.module.named_parameters() if p.requires_grad}
    return Layout(tp_rank_size(engine)[1], engine.dp_world_size, engine.zero_optimization_stage(), params)


def read_layout(ckpt: Path) -> Layout:
    """A checkpoint's layout; checkpoints written before ``layout.json`` existed were one TP rank."""
    if (ckpt / LAYOUT).exists():
        return Layout.read(ckpt)
    from deepspeed.checkpoint.constants import PARAM_SHAPES  # noqa: PLC0415 - DeepSpeed picks its accelerator on import: after distributed.init()

    files = sorted(ckpt.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt} is not a checkpoint (no *model_states.pt)")
    states = torch.load(files[0], map_location="cpu", weights_only=False)
    if states.get("mp_world_size", 1) != 1:
        raise ValueError(f"{ckpt} has no {LAYOUT} and more than one TP rank: its layout is unknown")
    stage = states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    params = {n: (list(s), None) for g in states[PARAM_SHAPES] for n, s in g.items()}
    return Layout(1, states["dp_world_size"], stage, params)


# ------------------------------------------------------------------ ZeRO-3's flat partitions

def unpartition(parts: list[torch.Tensor], shape: list[int]) -> torch.Tensor:
    """ZeRO-3's flat DP partitions [ceil(numel / dp)] each -> the tensor (padding dropped)."""
    return torch.cat([p.reshape(-1) for p in parts])[:math.prod(shape)].view(shape)


def partition(t: torch.Tensor, dp: int, rank: int) -> torch.Tensor:
    """A tensor -> DP rank ``rank``'s flat ZeRO-3 partition (zero-padded to ``dp`` equal parts)."""
    flat = t.reshape(-1)
    size = math.ceil(flat.numel() / dp)
    return torch.nn.functional.pad(flat, (0, size * dp - flat.numel()))[rank * size:(rank + 1) * size]

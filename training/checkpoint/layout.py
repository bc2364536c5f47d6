"""Where a checkpoint's parts live and how its state is split: tags, file names, the ``latest``
pointer, the parallel ``Layout`` (tp, dp, ZeRO stage, per parameter its TP split), ZeRO-3's flat
partitions, and the one way to find a checkpoint from a path."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from atoken.model.errors import UserError

from ..shards import partition_dim
from .deepspeed_internals import MODEL_STATES_GLOB, local_shape

STAGING = ".staging"
UNIVERSAL = ".universal"
LAYOUT = "layout.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    """Global rank ``rank``'s RNG and its own copy of the client state."""
    return f"rank_{rank:05d}.pt"


def ema_file(tp_rank: int, dp_rank: int) -> str:
    """(``dp_rank``, ``tp_rank``)'s part of the EMA: under ZeRO-3 its partitions, under ZeRO 1/2 its
    share of the parameters by name (``ema_names``), so that no rank writes the whole EMA alone."""
    return f"ema_zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}.pt"


def legacy_ema_file(tp_rank: int) -> str:
    """ZeRO 1/2 checkpoints written before the EMA was shared out: DP rank 0 held it whole."""
    return f"ema_mp_rank_{tp_rank:02d}.pt"


def ema_names(shapes: dict[str, list[int]], dp: int, dp_rank: int) -> list[str]:
    """The EMA tensors DP rank ``dp_rank`` writes under ZeRO 1/2 (every rank holds them all): the
    names dealt out largest first, each to the rank with the fewest elements so far."""
    load, mine = [0] * dp, []
    for name in sorted(shapes, key=lambda n: (-math.prod(shapes[n]), n)):
        r = load.index(min(load))
        load[r] += math.prod(shapes[name])
        if r == dp_rank:
            mine.append(name)
    return mine


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
    return path.is_dir() and ((path / LAYOUT).exists() or any(path.glob(MODEL_STATES_GLOB)))


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


def current_layout(engine, dims) -> Layout:
    """The layout of the running trainer: tp and dp from its ``ParallelDims``, the ZeRO stage from
    the engine (whose config set it), per parameter its TP-local shape (not ZeRO-3's partition) and
    split dim."""
    params = {n: (local_shape(p), partition_dim(p))
              for n, p in engine.module.named_parameters() if p.requires_grad}
    return Layout(dims.tp, dims.dp, engine.zero_optimization_stage(), params)


def read_layout(ckpt: Path) -> Layout:
    """A checkpoint's layout; checkpoints written before ``layout.json`` existed were one TP rank."""
    if (ckpt / LAYOUT).exists():
        return Layout.read(ckpt)
    from deepspeed.checkpoint.constants import PARAM_SHAPES  # noqa: PLC0415 - DeepSpeed picks its accelerator on import: after distributed.init()

    files = sorted(ckpt.glob(MODEL_STATES_GLOB))
    if not files:
        raise FileNotFoundError(f"{ckpt} is not a checkpoint (no {MODEL_STATES_GLOB})")
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

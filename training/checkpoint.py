"""Sharded, atomic checkpoints of everything resumable; ``--resume auto``; resume at another layout.

Layout of ``<run_dir>/checkpoints`` (``TT`` a tensor-parallel rank, ``D`` a data-parallel rank)::

    latest                  one line: the newest complete tag (replaced atomically, written last)
    step_00000100/          one complete checkpoint; every rank writes its own part of it
        layout.json                             how the state is split: tp, dp, ZeRO stage, and per
                                                parameter its TP-local shape and TP split dim
        mp_rank_TT_model_states.pt              ZeRO 1/2: TP rank TT's weights + our client state
        zero_pp_rank_D_mp_rank_TT_model_states.pt  ZeRO-3: the same, weights partitioned over D
        [zero_pp_rank_D_]mp_rank_TT_optim_states.pt  optimizer shard of (D, TT) (DeepSpeed's files)
        ema_mp_rank_TT.pt                       ZeRO 1/2: EMA of TP rank TT's weights
        ema_zero_pp_rank_D_mp_rank_TT.pt        ZeRO-3: EMA partition of (D, TT), split like the weights
        rank_NNNNN.pt                           global rank NNNNN's RNG (torch, numpy, python, our
                                                generators) and its own copy of the client state
    .staging/step_00000200/ a save in progress; renamed into place only when every rank is done
    .universal/step_00000100/  DeepSpeed's universal form of that checkpoint, made by the first resume
                            at another layout (kept for the next one; pruned with the checkpoint)

A crash mid-save leaves only a ``.staging`` directory, which ``latest`` never names and the next
save clears. Resuming at the saved (tp, dp, ZeRO stage) loads DeepSpeed's shards as they are.
At another layout (DP 2 -> 1, TP 2 -> 1 or 1 -> 2, another ZeRO stage) ``load`` converts the
checkpoint once with DeepSpeed's ``ds_to_universal`` (whole tensors of fp32 weights and Adam moments,
TP shards merged by the split dims recorded at save), cuts each TP rank's slices from it, and loads
them with DeepSpeed's universal loader, which re-partitions them over the new DP ranks. The EMA is
merged and re-split the same way. Nothing to configure: the saved layout is read from the checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from atoken.model.errors import UserError

log = logging.getLogger(__name__)

STAGING = ".staging"
UNIVERSAL = ".universal"
LAYOUT = "layout.json"
ADAM_STATES = ("fp32", "exp_avg", "exp_avg_sq")  # what a universal checkpoint holds per parameter


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------ the parallel layout

def partition_dim(p: torch.nn.Parameter) -> int | None:
    """The dim a parameter is split along over the TP ranks (megatron's attributes), None if whole.
    Split into ``tp`` contiguous chunks: megatron's strided splits (``partition_stride`` > 1) are not
    supported."""
    if not getattr(p, "tensor_model_parallel", False):
        return None
    if getattr(p, "partition_stride", 1) != 1:
        raise ValueError(f"parameter of shape {tuple(p.shape)} has partition_stride {p.partition_stride}: only "
                         "contiguous tensor-parallel splits can be checkpointed")
    return p.partition_dim


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
    def read(cls, ckpt: Path) -> "Layout":
        d = json.loads((ckpt / LAYOUT).read_text())
        return cls(d["tp"], d["dp"], d["zero_stage"],
                   {n: (p["shape"], p["partition_dim"]) for n, p in d["params"].items()})


def tp_rank_size(engine) -> tuple[int, int]:
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank, bwc_tensor_model_parallel_world_size

    return bwc_tensor_model_parallel_rank(engine.mpu), bwc_tensor_model_parallel_world_size(engine.mpu)


def dp_rank(engine) -> int:
    return dist.get_rank(engine.data_parallel_group) if engine.data_parallel_group is not None else 0


def current_layout(engine) -> Layout:
    params = {n: (list(getattr(p, "ds_shape", p.shape)), partition_dim(p))
              for n, p in engine.module.named_parameters() if p.requires_grad}
    return Layout(tp_rank_size(engine)[1], engine.dp_world_size, engine.zero_optimization_stage(), params)


def universal_checkpoint_info(layout: Layout) -> dict:
    """What ``ds_to_universal`` needs to merge TP shards (``model.universal_checkpoint_info``):
    row-parallel weights are joined on dim 1, column-parallel ones on dim 0 (its default), and
    replicated parameters are averaged over the TP ranks (identical in exact arithmetic; on GPUs
    nondeterministic kernels can leave them a few ulps apart, where a strict copy would refuse)."""
    from deepspeed.checkpoint import constants as c

    other = {dim for _, dim in layout.params.values()} - {None, 0, 1}
    if other:
        raise ValueError(f"tensor-parallel split dims {sorted(other)} are not supported (only 0 and 1)")

    def names(split_dim):
        return [f"^{re.escape(n)}$" for n, (_, dim) in layout.params.items() if dim == split_dim]

    return {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            c.PARAMETER_TO_AVERAGE_PATTERNS: names(None), c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: names(1)}


# ------------------------------------------------------------------ RNG

def rng_state(generators: dict[str, torch.Generator]) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "generators": {k: g.get_state() for k, g in generators.items()}}


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])


# ------------------------------------------------------------------ per-rank files

def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _ema_file(stage: int, tp_rank: int, dp_rank_: int) -> str:
    return f"ema_zero_pp_rank_{dp_rank_}_mp_rank_{tp_rank:02d}.pt" if stage == 3 else f"ema_mp_rank_{tp_rank:02d}.pt"


def _unpartition(parts: list[torch.Tensor], shape: list[int]) -> torch.Tensor:
    """ZeRO-3's flat DP partitions [ceil(numel / dp)] each -> the tensor (padding dropped)."""
    return torch.cat([p.reshape(-1) for p in parts])[:math.prod(shape)].view(shape)


def _partition(t: torch.Tensor, dp: int, rank: int) -> torch.Tensor:
    """A tensor -> DP rank ``rank``'s flat ZeRO-3 partition (zero-padded to ``dp`` equal parts)."""
    flat = t.reshape(-1)
    size = math.ceil(flat.numel() / dp)
    return torch.nn.functional.pad(flat, (0, size * dp - flat.numel()))[rank * size:(rank + 1) * size]


def merge_tp(shards: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    """One parameter's TP shards -> the whole tensor; replicated ones are averaged (see above)."""
    if dim is None:
        return shards[0] if len(shards) == 1 else sum(s.double() for s in shards).div(len(shards)).to(shards[0])
    return torch.cat(shards, dim=dim)


def _tp_slice(t: torch.Tensor, dim: int | None, tp: int, tp_rank: int) -> torch.Tensor:
    return t if dim is None else t.chunk(tp, dim=dim)[tp_rank]


def _ema_shards(ckpt: Path, layout: Layout) -> list[dict[str, torch.Tensor]]:
    """Per TP rank, its EMA tensors at their TP-local shapes (ZeRO-3 partitions joined)."""
    out = []
    for t in range(layout.tp):
        if layout.zero_stage != 3:
            out.append(torch.load(ckpt / _ema_file(1, t, 0), map_location="cpu"))
            continue
        parts = [torch.load(ckpt / _ema_file(3, t, d), map_location="cpu") for d in range(layout.dp)]
        out.append({n: _unpartition([p[n] for p in parts], layout.params[n][0]) for n in parts[0]})
    return out


def _raw_shards(ckpt: Path, layout: Layout) -> list[dict[str, torch.Tensor]]:
    """Per TP rank, its training weights at their TP-local shapes (fp32)."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_SHAPES

    out = []
    for t in range(layout.tp):
        if layout.zero_stage != 3:  # every DP rank holds the whole weights: DeepSpeed saved them
            states = torch.load(ckpt / f"mp_rank_{t:02d}_model_states.pt", map_location="cpu", weights_only=False)
            out.append({k: v.float() for k, v in states["module"].items()})
            continue
        # ZeRO-3: the fp32 master partitions live in the optimizer shards, in the order of param_shapes.
        shapes = torch.load(ckpt / f"zero_pp_rank_0_mp_rank_{t:02d}_model_states.pt", map_location="cpu",
                            weights_only=False)[PARAM_SHAPES]
        flats = [torch.load(ckpt / f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt", map_location="cpu",
                            weights_only=False, mmap=True)[OPTIMIZER_STATE_DICT]["fp32_flat_groups"]
                 for d in range(layout.dp)]
        state = {}
        for group, group_shapes in enumerate(shapes):
            offset = 0
            for name, shape in group_shapes.items():
                size = math.ceil(math.prod(shape) / layout.dp)
                state[name] = _unpartition([f[group][offset:offset + size] for f in flats], list(shape))
                offset += size
        out.append(state)
    return out


def consolidate(ckpt: Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The whole model's weights from a checkpoint at any layout (ZeRO 1/2/3, any TP and DP): keys
    and shapes as a plain single-process ``AToken``'s state dict. ``weights``: "ema" or "raw"."""
    layout = read_layout(ckpt)
    shards = _ema_shards(ckpt, layout) if weights == "ema" else _raw_shards(ckpt, layout)
    return {n: merge_tp([s[n] for s in shards], layout.params[n][1]) for n in shards[0]}


def read_layout(ckpt: Path) -> Layout:
    """A checkpoint's layout; checkpoints written before ``layout.json`` existed were one TP rank."""
    if (ckpt / LAYOUT).exists():
        return Layout.read(ckpt)
    from deepspeed.checkpoint.constants import PARAM_SHAPES

    files = sorted(ckpt.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt} is not a checkpoint (no *model_states.pt)")
    states = torch.load(files[0], map_location="cpu", weights_only=False)
    if states.get("mp_world_size", 1) != 1:
        raise ValueError(f"{ckpt} has no {LAYOUT} and more than one TP rank: its layout is unknown")
    stage = states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    params = {n: (list(s), None) for g in states[PARAM_SHAPES] for n, s in g.items()}
    return Layout(1, states["dp_world_size"], stage, params)


# ------------------------------------------------------------------ save

def save(engine, ema, generators: dict[str, torch.Generator], client_state: dict, ckpt_dir: Path, step: int,
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
    engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
    part = staging / tag
    # DeepSpeed keeps the client state of one DP rank per TP rank (ZeRO 1/2); every rank keeps its own
    # here, with its RNG (a data loader's position may differ per rank).
    torch.save({"rng": rng_state(generators), "client": client_state}, part / rank_file(rank))
    tp_rank, d = tp_rank_size(engine)[0], dp_rank(engine)
    if layout.zero_stage == 3 or d == 0:  # ZeRO-3: every rank holds a distinct EMA partition
        torch.save(ema.state_dict(), part / _ema_file(layout.zero_stage, tp_rank, d))
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
        _atomic_write(ckpt_dir / "latest", tag + "\n")
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


# ------------------------------------------------------------------ resolve

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


def resolve(resume: str, ckpt_dir: Path) -> Path | None:
    """The checkpoint directory to resume from, or None for a fresh start."""
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


# ------------------------------------------------------------------ load

def load(engine, ema, generators: dict[str, torch.Generator], path: Path) -> dict:
    """Load model, optimizer, scheduler, EMA and this rank's RNG, at the saved layout or another.
    Every rank calls this. Returns the client state."""
    saved, now = read_layout(path), current_layout(engine)
    if saved.sharding() == now.sharding():
        load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        tp_rank = tp_rank_size(engine)[0]
        ema.load_state_dict(torch.load(path / _ema_file(now.zero_stage, tp_rank, dp_rank(engine)),
                                       map_location="cpu"))
    else:
        log.warning("checkpoint %s was saved at tp=%d dp=%d ZeRO-%d; resuming at tp=%d dp=%d ZeRO-%d through "
                    "a universal checkpoint", path, *saved.sharding(), *now.sharding())
        _check_same_model(saved, now)
        client_state = _load_resharded(engine, path, saved, now)
        _load_ema_resharded(engine, ema, path, saved, now)
    own = path / rank_file(dist.get_rank())
    if saved.sharding()[:2] == now.sharding()[:2] and own.exists():
        own = torch.load(own, weights_only=False)
        set_rng_state(own["rng"], generators)
        client_state = {**client_state, **own["client"]}
    else:
        log.warning("no RNG state for rank %d in %s (saved at another layout): RNG streams continue from "
                    "this run's seeds, and the client state is TP rank 0 / DP rank 0's", dist.get_rank(), path)
    if "ds_config" in client_state and client_state["ds_config"].get("train_batch_size") != engine.train_batch_size():
        log.warning("global batch changed from %s to %s micro-batches (DP x grad_accum)",
                    client_state["ds_config"].get("train_batch_size"), engine.train_batch_size())
    log.info("resumed from %s at step %d", path, client_state["step"])
    return client_state


def _check_same_model(saved: Layout, now: Layout) -> None:
    if set(saved.params) != set(now.params):
        raise KeyError(f"checkpoint and model differ: missing {sorted(set(now.params) - set(saved.params))[:5]}, "
                       f"unexpected {sorted(set(saved.params) - set(now.params))[:5]}")
    bad = [n for n in now.params if saved.full_shape(n) != now.full_shape(n)]
    if bad:
        raise ValueError(f"checkpoint and model shapes differ for {bad[:5]} ({len(bad)} in all), e.g. "
                         f"{saved.full_shape(bad[0])} vs {now.full_shape(bad[0])}")


def _source_id(ckpt: Path) -> str:
    """Which checkpoint (and which save of it) a universal form was made from."""
    files = sorted(ckpt.glob("*model_states.pt"))
    return json.dumps([str(ckpt.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def to_universal(ckpt: Path) -> Path:
    """DeepSpeed's universal form of checkpoint ``ckpt``, in ``<its parent>/.universal/<its tag>``:
    made once (atomically, by one process; ``load`` does it on rank 0), reused while ``ckpt`` is
    unchanged. Run it ahead of a resume at another layout to keep the other ranks from waiting on it:
    ``python -c "from atoken.training.checkpoint import to_universal; to_universal(Path(CKPT))"``.
    """
    from deepspeed.checkpoint import ds_to_universal

    out = ckpt.parent / UNIVERSAL / ckpt.name
    source = _source_id(ckpt)
    if (out / "source.json").exists() and (out / "source.json").read_text() == source:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # inject_missing_state: saves from before ``universal_checkpoint_info`` was set (all at TP=1).
    args = Namespace(input_folder=str(ckpt), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    (tmp.parent / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer: ours is ``latest``
    (tmp / "source.json").write_text(source)
    shutil.rmtree(out, ignore_errors=True)  # made from an earlier save of this tag
    os.replace(tmp, out)
    log.info("converted %s to a universal checkpoint in %s", ckpt, out)
    return out


def _read_universal(path: Path, shape: list[int]) -> torch.Tensor:
    """One state tensor of a universal checkpoint (a dict from ZeRO 1/2 and TP merges, a flat tensor
    from plain ZeRO-3) at the parameter's whole shape."""
    from deepspeed.checkpoint.constants import PARAM

    t = torch.load(path, map_location="cpu", weights_only=False)
    return (t[PARAM] if isinstance(t, dict) else t).reshape(shape)


def _write_view(uc: Path, view: Path, saved: Layout, now: Layout, tp_rank: int) -> None:
    """The part of universal checkpoint ``uc`` that TP rank ``tp_rank`` of layout ``now`` holds, in
    DeepSpeed's universal format with tensors already at this rank's shapes. DeepSpeed's loader then
    only re-partitions them over the DP ranks, identically for ZeRO 1, 2 and 3 (its own TP slicing
    needs AutoTP's metadata and groups)."""
    from deepspeed import __version__
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM, PARAM_GROUPS

    tmp = view.with_name(view.name + ".tmp")
    for stale in (tmp, view):  # left by a load that crashed
        shutil.rmtree(stale, ignore_errors=True)
    zero = tmp / "zero"
    optim = torch.load(uc / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    if OPTIMIZER_STATE_DICT in optim:  # saved at ZeRO-3: the step is kept once
        step = optim[OPTIMIZER_STATE_DICT]["state"][0]["step"]
    else:  # ZeRO 1/2: per parameter
        step = torch.load(next((uc / "zero").glob("*/step.pt")), weights_only=False)
    for name, (_, dim) in now.params.items():
        (zero / name).mkdir(parents=True)
        for key in ADAM_STATES:
            full = _read_universal(uc / "zero" / name / f"{key}.pt", saved.full_shape(name))
            torch.save({PARAM: _tp_slice(full, dim, now.tp, tp_rank).clone()}, zero / name / f"{key}.pt")
        torch.save(step, zero / name / "step.pt")
    # The optimizer's global state, readable by both loaders (ZeRO 1/2 and ZeRO-3 read it differently).
    groups = optim[PARAM_GROUPS]
    common = {k: v for k, v in optim.items() if k not in (OPTIMIZER_STATE_DICT, "fp32_flat_groups")}
    common.setdefault("ds_version", __version__)
    common[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, PARAM_GROUPS: groups}
    torch.save(common, zero / "optimizer_state.pt")
    # Scheduler, step counters and our client state: any source rank's model-states file (the weights
    # in it are not read), as the only one, named as the current ZeRO stage's loader looks for it.
    states = torch.load(sorted(uc.glob("*model_states.pt"))[0], map_location="cpu", weights_only=False)
    states.update(module={}, mp_world_size=1)
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if now.zero_stage == 3 else "mp_rank_00_model_states.pt"
    torch.save(states, tmp / name)
    os.replace(tmp, view)


def _load_resharded(engine, path: Path, saved: Layout, now: Layout) -> dict:
    uc = path.parent / UNIVERSAL / path.name
    if dist.get_rank() == 0:
        to_universal(path)
    dist.barrier()
    tp_rank = tp_rank_size(engine)[0]
    view = uc / f"view_tp{now.tp}_rank{tp_rank:02d}"
    writer = dp_rank(engine) == 0  # one writer per TP rank
    if writer:
        _write_view(uc, view, saved, now, tp_rank)
    dist.barrier()
    optimizer = engine.optimizer.optimizer  # the torch optimizer inside DeepSpeed's ZeRO wrapper
    before = [dict(g) for g in optimizer.param_groups]
    engine._config.load_universal_checkpoint = True  # DeepSpeed reads its config flag at load time
    try:
        load_path, client_state = engine.load_checkpoint(str(view.parent), tag=view.name)
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint at {view}")
    # DeepSpeed's ZeRO-3 universal load gives every group group 0's hyperparameters (lr, weight decay)
    # and every group's Adam state one shared ``step`` tensor, which torch's Adam increments in place:
    # once per group and step. Put our hyperparameters back (the lr is the restored scheduler's) and
    # give each state its own step.
    if now.zero_stage == 3:
        for g, b, lr in zip(optimizer.param_groups, before, engine.lr_scheduler.get_last_lr()):
            g.update({k: v for k, v in b.items() if k != "params"}, lr=lr)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    dist.barrier()
    if writer:
        shutil.rmtree(view)
    return client_state


def _load_ema_resharded(engine, ema, path: Path, saved: Layout, now: Layout) -> None:
    """Merge the saved EMA shards to whole tensors, then cut this rank's part at the new layout."""
    shards = _ema_shards(path, saved)
    tp_rank, d = tp_rank_size(engine)[0], dp_rank(engine)
    state = {}
    for name, (_, dim) in now.params.items():
        t = _tp_slice(merge_tp([s[name] for s in shards], saved.params[name][1]), dim, now.tp, tp_rank)
        state[name] = _partition(t, now.dp, d) if now.zero_stage == 3 else t
    ema.load_state_dict(state)

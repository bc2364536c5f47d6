"""Resuming at another layout (DP 2 -> 1, TP 2 -> 1 or 1 -> 2, another ZeRO stage).

The checkpoint is converted once with DeepSpeed's ``ds_to_universal`` (whole tensors of fp32
weights and Adam moments, TP shards merged by the split dims recorded at save), each TP rank's
slices are cut from it, and DeepSpeed's universal loader re-partitions them over the new DP
ranks. The EMA is merged and re-split the same way.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..shards import merge, split
from .deepspeed_internals import (
    MODEL_STATES_GLOB,
    model_states_file,
    optimizer_common_state,
    run_ds_to_universal,
    torch_optimizer,
    universal_loading,
)
from .export import ema_shards
from .layout import UNIVERSAL, Layout, partition

log = logging.getLogger(__name__)

ADAM_STATES = ("fp32", "exp_avg", "exp_avg_sq")  # what a universal checkpoint holds per parameter


def universal_checkpoint_info(layout: Layout) -> dict:
    """What ``ds_to_universal`` needs to merge TP shards (``model.universal_checkpoint_info``, set
    before every save): row-parallel weights are joined on dim 1, column-parallel ones on dim 0 (its
    default), and replicated parameters are averaged over the TP ranks (as ``shards.merge``)."""
    from deepspeed.checkpoint import constants as c  # noqa: PLC0415 - DeepSpeed picks its accelerator on import: after distributed.init()

    other = {dim for _, dim in layout.params.values()} - {None, 0, 1}
    if other:
        raise ValueError(f"tensor-parallel split dims {sorted(other)} are not supported (only 0 and 1)")

    def names(split_dim):
        return [f"^{re.escape(n)}$" for n, (_, dim) in layout.params.items() if dim == split_dim]

    return {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            c.PARAMETER_TO_AVERAGE_PATTERNS: names(None), c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: names(1)}


def check_same_model(saved: Layout, now: Layout) -> None:
    if set(saved.params) != set(now.params):
        raise KeyError(f"checkpoint and model differ: missing {sorted(set(now.params) - set(saved.params))[:5]}, "
                       f"unexpected {sorted(set(saved.params) - set(now.params))[:5]}")
    bad = [n for n in now.params if saved.full_shape(n) != now.full_shape(n)]
    if bad:
        raise ValueError(f"checkpoint and model shapes differ for {bad[:5]} ({len(bad)} in all), e.g. "
                         f"{saved.full_shape(bad[0])} vs {now.full_shape(bad[0])}")


def _source_id(ckpt: Path) -> str:
    """Which checkpoint (and which save of it) a universal form was made from."""
    files = sorted(ckpt.glob(MODEL_STATES_GLOB))
    return json.dumps([str(ckpt.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def to_universal(ckpt: Path) -> Path:
    """DeepSpeed's universal form of checkpoint ``ckpt``, in ``<its parent>/.universal/<its tag>``:
    made once (atomically, by one process; ``load`` does it on rank 0), reused while ``ckpt`` is
    unchanged. Run it ahead of a resume at another layout to keep the other ranks from waiting on it:
    ``python -c "from atoken.training.checkpoint import to_universal; to_universal(Path(CKPT))"``.
    """
    out = ckpt.parent / UNIVERSAL / ckpt.name
    source = _source_id(ckpt)
    if (out / "source.json").exists() and (out / "source.json").read_text() == source:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    run_ds_to_universal(ckpt, tmp)
    (tmp.parent / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer: ours is ``latest``
    (tmp / "source.json").write_text(source)
    shutil.rmtree(out, ignore_errors=True)  # made from an earlier save of this tag
    os.replace(tmp, out)
    log.info("converted %s to a universal checkpoint in %s", ckpt, out)
    return out


def _read_universal(path: Path, shape: list[int]) -> torch.Tensor:
    """One state tensor of a universal checkpoint (a dict from ZeRO 1/2 and TP merges, a flat tensor
    from plain ZeRO-3) at the parameter's whole shape."""
    from deepspeed.checkpoint.constants import PARAM  # noqa: PLC0415 - DeepSpeed picks its accelerator on import: after distributed.init()

    t = torch.load(path, map_location="cpu", weights_only=False)
    return (t[PARAM] if isinstance(t, dict) else t).reshape(shape)


def _write_view(uc: Path, view: Path, saved: Layout, now: Layout, tp_rank: int) -> None:
    """The part of universal checkpoint ``uc`` that TP rank ``tp_rank`` of layout ``now`` holds, in
    DeepSpeed's universal format with tensors already at this rank's shapes. DeepSpeed's loader then
    only re-partitions them over the DP ranks, identically for ZeRO 1, 2 and 3 (its own TP slicing
    needs AutoTP's metadata and groups)."""
    from deepspeed import __version__  # noqa: PLC0415 - DeepSpeed picks its accelerator on import: after distributed.init()
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM, PARAM_GROUPS  # noqa: PLC0415 - DeepSpeed picks its accelerator on import: after distributed.init()

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
            torch.save({PARAM: split(full, dim, now.tp, tp_rank).clone()}, zero / name / f"{key}.pt")
        torch.save(step, zero / name / "step.pt")
    # The optimizer's global state, readable by both loaders (ZeRO 1/2 and ZeRO-3 read it differently).
    common = optimizer_common_state(optim, __version__)
    common[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, PARAM_GROUPS: optim[PARAM_GROUPS]}
    torch.save(common, zero / "optimizer_state.pt")
    # Scheduler, step counters and our client state: any source rank's model-states file (the weights
    # in it are not read), as the only one, named as the current ZeRO stage's loader looks for it.
    states = torch.load(sorted(uc.glob(MODEL_STATES_GLOB))[0], map_location="cpu", weights_only=False)
    states.update(module={}, mp_world_size=1)
    torch.save(states, tmp / model_states_file(now.zero_stage, 0, 0))
    os.replace(tmp, view)


def load_resharded(engine, dims, path: Path, saved: Layout, now: Layout) -> dict:
    """Weights, optimizer and scheduler of ``path`` (saved at ``saved``) into ``engine`` (at ``now``).
    Returns DeepSpeed's client state."""
    uc = path.parent / UNIVERSAL / path.name
    if dist.get_rank() == 0:
        to_universal(path)
    dist.barrier()
    tp_rank = dims.tp_rank
    view = uc / f"view_tp{now.tp}_rank{tp_rank:02d}"
    writer = dims.dp_rank == 0  # one writer per TP rank
    if writer:
        _write_view(uc, view, saved, now, tp_rank)
    dist.barrier()
    optimizer = torch_optimizer(engine)
    before = [dict(g) for g in optimizer.param_groups]
    with universal_loading(engine):
        load_path, client_state = engine.load_checkpoint(str(view.parent), tag=view.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint at {view}")
    # DeepSpeed's ZeRO-3 universal load gives every group group 0's hyperparameters (lr, weight decay)
    # and every group's Adam state one shared ``step`` tensor, which torch's Adam increments in place:
    # once per group and step. Put our hyperparameters back (the lr is the restored scheduler's) and
    # give each state its own step.
    if now.zero_stage == 3:
        for g, b, lr in zip(optimizer.param_groups, before, engine.lr_scheduler.get_last_lr(), strict=True):
            g.update({k: v for k, v in b.items() if k != "params"}, lr=lr)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    dist.barrier()
    if writer:
        shutil.rmtree(view)
    return client_state


def load_ema_resharded(ema, dims, path: Path, saved: Layout, now: Layout) -> None:
    """Merge the saved EMA shards to whole tensors, then cut this rank's part at the new layout."""
    shards = ema_shards(path, saved)
    tp_rank, d = dims.tp_rank, dims.dp_rank
    state = {}
    for name, (_, dim) in now.params.items():
        t = split(merge([s[name] for s in shards], saved.params[name][1]), dim, now.tp, tp_rank)
        state[name] = partition(t, now.dp, d) if now.zero_stage == 3 else t
    ema.load_state_dict(state)

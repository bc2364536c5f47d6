"""Every place the trainer reaches past DeepSpeed's (and torch's) public API, gathered here.

NOTE: these lean on DeepSpeed internals (attribute names, the layout of its files, a script's
``main``, its checkpoint-engine hook) and on private torch module hooks, that may change in any
release: setup.py pins the DeepSpeed version they were tested with (0.19.8). On an upgrade, re-run
tests/integration/test_checkpoint_dist.py and tests/integration/test_checkpoint_chaos.py and check each function below.
"""
from __future__ import annotations

import contextlib
import math
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# ------------------------------------------------------------------ DeepSpeed's file names

MODEL_STATES_GLOB = "*model_states.pt"  # every DeepSpeed checkpoint holds at least one


def model_states_file(zero_stage: int, tp_rank: int, dp_rank: int = 0) -> str:
    """DeepSpeed's weights + client state of (``dp_rank``, ``tp_rank``): one per TP rank under ZeRO
    1/2 (DP rank 0 writes it), one per rank under ZeRO-3 (the weights are partitioned over DP)."""
    if zero_stage == 3:
        return f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_model_states.pt"
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def optim_states_file(tp_rank: int, dp_rank: int) -> str:
    """DeepSpeed's ZeRO optimizer shard of (``dp_rank``, ``tp_rank``), at every ZeRO stage."""
    return f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"


# ------------------------------------------------------------------ the engine and its optimizer

def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO wrapper (``engine.optimizer.optimizer``)."""
    return engine.optimizer.optimizer


@contextlib.contextmanager
def snapshotting(engine, take: Callable[[object], object]):
    """Inside, ``engine.save_checkpoint`` writes no file: each state dict DeepSpeed would write
    goes through ``take`` (a copy off the live tensors) and is appended, as ``(path, copy)``, to
    the list this yields, for the caller to write (in the background, durably).

    DeepSpeed routes every checkpoint file through ``engine.checkpoint_engine`` (its pluggable
    ``CheckpointEngine``); the attribute is swapped for the duration. ``preserves_storage_sharing``
    is False so DeepSpeed does not clone the ZeRO-3 states itself: ``take`` copies once."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine  # noqa: PLC0415 - DeepSpeed picks its accelerator on import: after distributed.init()

    files: list[tuple[str, object]] = []

    class Snapshot(CheckpointEngine):
        def create(self, info):
            pass

        def save(self, state_dict, path: str):
            files.append((path, take(state_dict)))

        def load(self, path: str, map_location=None):
            raise RuntimeError("loading while snapshotting a checkpoint")

        def commit(self, info):
            return True

        def preserves_storage_sharing(self):
            return False

    previous = engine.checkpoint_engine
    engine.checkpoint_engine = Snapshot()
    try:
        yield files
    finally:
        engine.checkpoint_engine = previous


@contextlib.contextmanager
def universal_loading(engine):
    """``engine.load_checkpoint`` reads a universal checkpoint while inside. DeepSpeed reads the
    private config flag ``_config.load_universal_checkpoint`` at load time; there is no argument."""
    engine._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = False


# ------------------------------------------------------------------ ZeRO-3's partitioned parameters

def local_tensor(p: nn.Parameter) -> torch.Tensor:
    """What this rank holds of ``p``: the parameter itself, or under DeepSpeed ZeRO-3 its flat
    data-parallel partition ``ds_tensor`` [ceil(numel / dp)] (the parameter's own data is empty
    outside forward/backward)."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


def partitioned_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ZeRO-3 partitions (``ds_id`` marks them); none under ZeRO 1/2."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def is_partitioned(model: nn.Module) -> bool:
    """Whether ZeRO-3 partitions ``model``'s parameters."""
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


def local_shape(p: nn.Parameter) -> list[int]:
    """``p``'s shape on this rank before any ZeRO-3 partitioning (its ``ds_shape``): the TP-local one."""
    return list(getattr(p, "ds_shape", p.shape))


def release_gathered(params: list[nn.Parameter]) -> None:
    """ZeRO-3 keeps small ("persistent") parameters gathered between steps: drop those copies, so the
    next forward gathers them again from their partitions (after the partitions were written)."""
    held = [p for p in params if hasattr(p, "ds_tensor") and p.data.numel()]
    if held:
        held[0].partition(param_list=held, has_been_updated=False)


# ------------------------------------------------------------------ torch's private module hooks

def clear_load_state_dict_pre_hooks(module: nn.Module) -> None:
    """Drop the load hooks a module registered (megatron's linears add one that inserts
    ``_extra_state``): torch has no public way to remove a hook whose handle it did not return."""
    module._load_state_dict_pre_hooks.clear()


# ------------------------------------------------------------------ universal checkpoints

def run_ds_to_universal(src: Path, out: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` script, called through its ``main(args)``.
    ``inject_missing_state``: saves from before ``universal_checkpoint_info`` was set (all at TP=1)."""
    from deepspeed.checkpoint import ds_to_universal  # noqa: PLC0415 - DeepSpeed picks its accelerator on import: after distributed.init()

    ds_to_universal.main(Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=1,
                                   num_merge_workers=1, keep_temp_folder=False, strict=True,
                                   inject_missing_state=True))


def zero3_fp32_weights(ckpt: Path, tp_rank: int, dp: int) -> dict[str, torch.Tensor]:
    """TP rank ``tp_rank``'s fp32 master weights from a ZeRO-3 checkpoint at its TP-local shapes.

    DeepSpeed keeps them only in its optimizer shards: each DP rank's ``fp32_flat_groups``, one flat
    tensor per parameter group holding, in the order of the model states' ``param_shapes``, a
    ``ceil(numel / dp)`` partition of every parameter."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_SHAPES  # noqa: PLC0415 - DeepSpeed picks its accelerator on import: after distributed.init()

    from .layout import unpartition  # noqa: PLC0415 - layout imports this module (DeepSpeed's file names)

    shapes = torch.load(ckpt / model_states_file(3, tp_rank), map_location="cpu", weights_only=False)[PARAM_SHAPES]
    flats = [torch.load(ckpt / optim_states_file(tp_rank, d), map_location="cpu", weights_only=False,
                        mmap=True)[OPTIMIZER_STATE_DICT]["fp32_flat_groups"] for d in range(dp)]
    state = {}
    for group, group_shapes in enumerate(shapes):
        offset = 0
        for name, shape in group_shapes.items():
            size = math.ceil(math.prod(shape) / dp)
            state[name] = unpartition([f[group][offset:offset + size] for f in flats], list(shape))
            offset += size
    return state


def optimizer_common_state(optim: dict, ds_version: str) -> dict:
    """A universal checkpoint's ``optimizer_state.pt`` without its per-parameter tensors (the
    ``fp32_flat_groups`` a ZeRO-3 source leaves in it), as both of DeepSpeed's loaders read it."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT  # noqa: PLC0415 - DeepSpeed picks its accelerator on import: after distributed.init()

    common = {k: v for k, v in optim.items() if k not in (OPTIMIZER_STATE_DICT, "fp32_flat_groups")}
    common.setdefault("ds_version", ds_version)
    return common

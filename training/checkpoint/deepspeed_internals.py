"""Every place the checkpoint code reaches past DeepSpeed's public API, gathered here.

NOTE: these lean on DeepSpeed internals (attribute names, the layout of its files, a script's
``main``) that may change in any release: setup.py pins the DeepSpeed version they were tested with
(0.19.8). On an upgrade, re-run tests/integration/test_checkpoint_dist.py and check each function below.
"""
from __future__ import annotations

import contextlib
import math
from argparse import Namespace
from pathlib import Path

import torch

from .layout import unpartition


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO wrapper (``engine.optimizer.optimizer``)."""
    return engine.optimizer.optimizer


@contextlib.contextmanager
def universal_loading(engine):
    """``engine.load_checkpoint`` reads a universal checkpoint while inside. DeepSpeed reads the
    private config flag ``_config.load_universal_checkpoint`` at load time; there is no argument."""
    engine._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = False


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


    shapes = torch.load(ckpt / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt", map_location="cpu",
                        weights_only=False)[PARAM_SHAPES]
    flats = [torch.load(ckpt / f"zero_pp_rank_{d}_mp_rank_{tp_rank:02d}_optim_states.pt", map_location="cpu",
                        weights_only=False, mmap=True)[OPTIMIZER_STATE_DICT]["fp32_flat_groups"]
             for d in range(dp)]
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

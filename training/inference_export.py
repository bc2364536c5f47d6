"""A training checkpoint -> an inference directory (config.json + model.safetensors): what ``atoken-convert``
does, and the demo and the tests with it."""
from __future__ import annotations

from pathlib import Path

import torch

from atoken.model.errors import UserError
from atoken.model.inference_dir import save_inference_dir

from .checkpoint import CHECKPOINT, find_weights, read_weights
from .guards import check_finite_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the stored weights' dtype, by its CLI name


def convert(src: str | Path, out: str | Path, weights: str = "ema", dtype: str = "fp32") -> Path:
    """A run / checkpoints / checkpoint directory -> an inference directory at ``out``, from any training
    layout (ZeRO 1/2/3, tensor- and data-parallel shards merged: ``checkpoint.read_weights``)."""
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if find_weights(src).kind != CHECKPOINT:
        raise UserError(f"{src} is an inference directory already (atoken-convert reads a run directory, its "
                        "checkpoints/ directory or a checkpoints/step_* directory)")
    state, source = read_weights(src, weights)
    check_finite_weights(state, f"{source.path} ({weights} weights)")  # a diverged run's weights are refused, named
    run_cfg = source.meta["config"]
    save_inference_dir(out, state, run_cfg["model"], weights, dtype=DTYPES[dtype],
                       source={"checkpoint": str(source.path.resolve()), "step": source.meta["step"],
                               "stage": run_cfg["stage"]})
    return Path(out)

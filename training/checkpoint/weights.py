"""The one way to read a model's weights from a path, as open_clip's ``load_checkpoint``: the state
dict, the ``ModelConfig`` it was saved with, and where it came from.

A path is one of
  * an inference directory (``atoken-convert``'s output, the release through ``atoken-import-official``);
  * a run directory, its ``checkpoints/`` (the ``latest`` pointer picks one) or one ``checkpoints/step_*``.

Who owns what: an inference directory's format is the model's (``model/inference_dir.py`` writes and
reads it, and ``Tokenizer.from_pretrained`` needs nothing from training); a checkpoint's layout is this
package's. This module joins the two for the callers that take either (the stage hand-off,
``atoken-convert``, ``atoken-export-official``), so that none of them opens the files itself.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from atoken.model.config import ModelConfig, from_dict
from atoken.model.errors import UserError
from atoken.model.inference_dir import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    is_inference_dir,
    load_inference_dir,
    read_inference_config,
)

from .deepspeed_internals import MODEL_STATES_GLOB
from .export import consolidate
from .layout import LAYOUT, client_state, find

INFERENCE, CHECKPOINT = "inference", "checkpoint"  # WeightsSource.kind
WEIGHTS = ("ema", "raw")  # which weights of a checkpoint (an inference directory holds one set)
DAMAGED = "it is incomplete or damaged (an interrupted copy?): use another checkpoints/step_* directory"


@dataclass(frozen=True)
class WeightsSource:
    """Where weights come from, and the model config they were saved with."""
    path: Path  # the inference directory, or the one checkpoint directory the given path resolved to
    kind: str  # INFERENCE or CHECKPOINT
    cfg: ModelConfig
    # An inference directory: its config.json (format, dtype, weights, source). A checkpoint: its
    # client state's "step" and "config" (the run config it was trained with, as a dict).
    meta: dict


def find_weights(path: str | Path, setting: str | None = None) -> WeightsSource:
    """Where the weights ``path`` means are and their config, without reading the weights (cheap: a
    config.json, or one rank's client state). ``setting`` names the option the path came from in
    the error (e.g. "checkpoint.init_from"). A path that holds neither is a ``UserError``."""
    if is_inference_dir(path):
        cfg, meta = read_inference_config(path)
        return WeightsSource(Path(path), INFERENCE, cfg, meta)
    ckpt = find(path)
    if ckpt is None:
        raise UserError(f"{f'{setting}={str(path)!r}' if setting else path}: no complete checkpoint and no "
                        f"inference directory there (expected a run directory, its checkpoints/ folder, a "
                        f"checkpoints/step_* directory with {LAYOUT} or *model_states.pt, or a directory with "
                        f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    if not any(ckpt.glob(MODEL_STATES_GLOB)):  # DeepSpeed's weights (layout.json alone: a copy cut short)
        raise UserError(f"{ckpt}: no {MODEL_STATES_GLOB} file; {DAMAGED}")
    client = _readable(ckpt, lambda: client_state(ckpt))
    try:
        cfg = from_dict(ModelConfig, client["config"]["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{ckpt}: cannot read the model config it was trained with ({type(e).__name__}: {e}); "
                        "not a checkpoint written by atoken-train?") from None
    return WeightsSource(ckpt, CHECKPOINT, cfg, {"step": client.get("step"), "config": client["config"]})


def read_weights(path: str | Path, weights: str = "ema", setting: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], WeightsSource]:
    """(state dict, where it came from) for ``path`` (``find_weights``). A checkpoint's ``weights``
    ("ema" or "raw") are merged from any layout (ZeRO 1/2/3, any TP and DP) into the plain model's
    state dict, in fp32; an inference directory's one set is returned as stored (its dtype)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    source = find_weights(path, setting)
    if source.kind == INFERENCE:
        return load_inference_dir(source.path)[0], source
    return _readable(source.path, lambda: consolidate(source.path, weights)), source


def _readable(ckpt: Path, read):
    """``read()``; a damaged checkpoint (a truncated file fails in torch.load as RuntimeError, EOFError or
    UnpicklingError, a missing one as OSError) is a ``UserError`` naming it."""
    try:
        return read()
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{ckpt}: cannot read it ({type(e).__name__}: {first}); {DAMAGED}") from None

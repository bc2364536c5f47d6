"""An inference directory: what ``Tokenizer.from_pretrained`` loads, ``atoken-convert`` and the importers
write. ``config.json`` holds the model config, which weights and their provenance; ``model.safetensors``
the weights (EMA by default), in the dtype recorded.

The format is the model's (``model/`` may not import training): written and read only here. Reading
weights from any path (a run, a checkpoint or an inference directory) is
``training/checkpoint/weights.py``'s ``read_weights``, which reads inference directories through this.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig, from_dict
from .errors import UserError

FORMAT = "atoken-inference"
# Its two files. This module is the only one that names them: everything else reads an inference
# directory through the functions below (or training/checkpoint/weights.py, which also reads checkpoints).
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
REMAKE = "make it again with atoken-convert or atoken-import-official"


def save_inference_dir(out: str | Path, state: dict[str, torch.Tensor], model_cfg: dict, weights: str,
                       source: dict, dtype: torch.dtype = torch.float32) -> Path:
    """Write an inference directory: ``model.safetensors`` (``state`` in ``dtype``) and ``config.json``
    (the model config, which weights, and their provenance)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(out / WEIGHTS_FILE))
    meta = {"format": FORMAT, "version": 1, "model": model_cfg, "dtype": str(dtype).removeprefix("torch."),
            "weights": weights, "source": source}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def is_inference_dir(path: str | Path) -> bool:
    """Whether ``path`` is meant as an inference directory (it holds a config.json; the readers below
    say what else is wrong with it)."""
    return (Path(path) / CONFIG_FILE).is_file()


def load_inference_dir(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """(state dict as stored, model config, config.json) of an inference directory; a missing,
    unreadable or foreign file is a ``UserError`` naming it."""
    cfg, meta = read_inference_config(path)
    weights = Path(path) / WEIGHTS_FILE
    try:  # a truncated or foreign file: safetensors' own message does not name it
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
        raise UserError(f"{weights}: cannot load the weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); the file is damaged; {REMAKE}") from None
    return state, cfg, meta


def read_inference_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """(model config, config.json) of an inference directory, without reading its weights."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights):
        if not f.exists():
            raise UserError(f"{f} not found: {path} is not an atoken inference directory "
                            "(make one with atoken-convert or atoken-import-official)")
    try:
        meta = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_file}: not readable JSON ({e}); {REMAKE}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{cfg_file} is not an {FORMAT} config (format="
                        f"{meta.get('format') if isinstance(meta, dict) else None!r}); {REMAKE}")
    try:
        return from_dict(ModelConfig, meta["model"]), meta
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_file}: its model config does not fit this version ({e}); {REMAKE}") from None

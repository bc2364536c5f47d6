"""Reading the tensors of a LOCAL HF ``save_pretrained`` directory (never downloaded): shared by the
SigLIP2 image import (siglip2.py) and the frozen text tower (understanding.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def read_safetensors(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors whose name starts with ``prefix`` from a HF checkpoint directory (fp32, CPU)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors (or its index); only safetensors checkpoints "
                                "are read (re-save the model with save_pretrained(safe_serialization=True))")
    out = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safetensors' safe_open has keys(), no __iter__
                if key.startswith(prefix):
                    out[key] = f.get_tensor(key).float()
    return out

"""Held-out images for evaluation during training."""
from __future__ import annotations

from pathlib import Path

import torch

from atoken.data_pipeline.images import IMAGE_EXTENSIONS, decode_image


def load_images(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every image in ``folder`` as name -> [3, H, W] in [0, 1], sorted by name."""
    root = Path(folder)
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if root.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"{folder}: no images found there")
    return {p.name: (decode_image(p.read_bytes()) + 1) / 2 for p in paths}

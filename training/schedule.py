"""Learning-rate schedule: linear warm-up to the peak, then cosine to ``min_lr`` (docs/design.md)."""
from __future__ import annotations

import math


def lr_factor(step: int, *, warmup: int, total: int, peak: float, floor: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based); every param group scales
    by it, so the encoder's 0.1x group keeps its ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))) / peak

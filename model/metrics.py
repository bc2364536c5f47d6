"""Image quality metrics shared by training-time evaluation and the inference tools."""
from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of two images [3, H, W] in [0, 1] (data range 1)."""
    mse = torch.mean((x.double() - y.double()) ** 2).item()
    return float("inf") if mse == 0 else -10.0 * torch.log10(torch.tensor(mse)).item()

"""The I3D feature network behind FVD, loaded from StyleGAN-V's TorchScript file (no default: it
ships in no package, so its path is always given).

The detector is ``i3d_torchscript.pt`` of StyleGAN-V (Skorokhodov et al. 2022): a TorchScript port
of the Kinetics-400 I3D of the original FVD code (Unterthiner et al. 2018, TF-Hub
``i3d-kinetics-400``), its outputs within 3e-4 (L2) of the TF graph's. It is called as

    detector(videos, rescale=False, resize=False, return_features=True)   # -> [B, 400]

on float videos [B, 3, T, 224, 224] in [-1, 1]; ``return_features`` gives the 400 logits before the
softmax, the TF code's ``RGB/inception_i3d/Mean`` tensor. The preprocessing before it is the one
of the widely used StyleGAN-V FVD port (``common_metrics_on_video_quality``, also in Open-Sora-Plan):

- a clip [3, T, H, W] in [0, 1] (8-bit values, as decoded from a file);
- the shorter side scaled to 224 (the longer to ``ceil(side * 224 / shorter)``), frame by frame,
  bilinear, ``align_corners=False``, no antialiasing;
- a centre crop of 224 x 224;
- mapped to [-1, 1] by ``(x - 0.5) * 2``.

The feature width is read from the network's output (400 for the real file), so any network with
that call signature serves (the tests use a small random one).
"""
from __future__ import annotations

import logging
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

I3D_SIZE = 224
DETECTOR_KWARGS = {"rescale": False, "resize": False, "return_features": True}


def preprocess_clip(video: torch.Tensor, size: int = I3D_SIZE) -> torch.Tensor:
    """[3, T, H, W] in [0, 1] -> the detector's input [3, T, size, size] in [-1, 1] (float32).

    Values are rounded to 8 bits first (what a decoded file holds), then resized and cropped as the
    module docstring says.
    """
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a clip [3, T, H, W], got {tuple(video.shape)}")
    x = (video.float().clamp(0, 1) * 255).round() / 255
    _, _, h, w = x.shape
    scale = size / min(h, w)
    target = (size, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), size)
    # NOTE: a 4D [3, T, H, W] tensor: interpolate treats 3 as the batch and T as channels, so each
    # frame is resized on its own, as in the reference.
    x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    return ((x[:, :, top:top + size, left:left + size] - 0.5) * 2).contiguous()


class I3DFeatures(nn.Module):
    """Clips in [0, 1] ([B, 3, T, H, W] or a list of [3, T, H, W] of one length T) -> FVD features
    [B, D] (float32; D = 400 for StyleGAN-V's file). Frozen, always in eval mode."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"I3D (FVD) TorchScript file not found: {self.path} (StyleGAN-V's "
                                    "i3d_torchscript.pt; nothing is downloaded)")
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(self.path, map_location="cpu")
        self.requires_grad_(False)
        self.eval()
        logger.info("I3D FVD features from %s", self.path)

    def train(self, mode: bool = True) -> I3DFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, videos: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        device = next(iter(self.net.parameters()), torch.empty(0)).device
        x = torch.stack([preprocess_clip(v.to(device)) for v in videos])  # [B, 3, T, 224, 224]
        f = self.net(x, **DETECTOR_KWARGS)
        if f.ndim != 2 or f.shape[0] != x.shape[0]:
            raise ValueError(f"{self.path}: expected features [{x.shape[0]}, D], got {tuple(f.shape)}")
        return f.float()

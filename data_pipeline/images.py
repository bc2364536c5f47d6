"""Image decoding, the MDS image schema, and the training resolution policy.

Decoding: the stored bytes are opened with PIL, fully loaded (a truncated file raises here, not
later), turned upright by their EXIF orientation, transparent pixels composited over white, and
converted to RGB; the model sees a float tensor [3, H, W] in [-1, 1].

Resolution policy (training; the policy for sizes that are not multiples of 16):
  1. Per sample draw a target longer side ``s``, uniform over the multiples of 16 in
     [min_res, max_res] (the caller seeds the draw, see ``dataset.py``).
  2. Scale so the longer side becomes ``s`` keeping the aspect ratio, but never above the image's
     own size: an image smaller than ``s`` keeps its size.
  3. Round each side to the nearest multiple of 16, capped at the largest multiple of 16 that fits
     in the image (so rounding never upscales either), and at least 16 (one patch; only an image
     under 16 px is ever enlarged). The longer side is then exactly ``s`` whenever ``s`` <= it.
  4. Resize (PIL bicubic, which low-passes when shrinking, i.e. antialiased). Rounding moves each
     side by at most 8 px from the exact aspect ratio (up to 15 px where the cap applies, near
     native size); nothing is cropped.
At inference nothing is resized: ``model.patches.pad_to_patches`` pads and the output is cropped.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..model.config import PATCH_HW

# The MDS schema of image shards, the one place it is defined (writer and reader share it).
# ``image`` holds the file's original encoded bytes; width/height are after EXIF orientation.
IMAGE_COLUMNS = {"image": "bytes", "width": "int32", "height": "int32", "name": "str"}
# Optional columns: our writer always adds them ("" and -1 when absent); readers must not require them.
OPTIONAL_COLUMNS = {"caption": "str", "label": "int32"}
IMAGE_WRITER_COLUMNS = {**IMAGE_COLUMNS, **OPTIONAL_COLUMNS}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif")


def open_rgb(data: bytes) -> Image.Image:
    """Decode encoded bytes fully into an upright RGB PIL image (raises on any decode error)."""
    if not data:
        raise ValueError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"not a recognised image format (starts {data[:8]!r})") from None
    img.load()  # NOTE: decodes every byte; Image.verify() would not catch a truncated JPEG body
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32 in [-1, 1]."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8))  # [H, W, 3]
    return x.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded bytes -> [3, H, W] float32 in [-1, 1] at the image's own size."""
    return to_tensor(open_rgb(data))


def sample_resolution(rng: np.random.Generator, min_res: int, max_res: int) -> int:
    """A target longer side: uniform over the multiples of 16 in [min_res, max_res]."""
    lo = max(1, -(-min_res // PATCH_HW))
    hi = max(lo, max_res // PATCH_HW)
    return int(rng.integers(lo, hi + 1)) * PATCH_HW


def training_size(height: int, width: int, target: int) -> tuple[int, int]:
    """(height, width) in whole patches for a target longer side (see the module docstring)."""
    scale = min(target, max(height, width)) / max(height, width)  # <= 1: never upscale

    def side(n: int) -> int:
        rounded = int(n * scale / PATCH_HW + 0.5) * PATCH_HW
        return max(PATCH_HW, min(rounded, n // PATCH_HW * PATCH_HW))

    return side(height), side(width)


def resize_for_training(img: Image.Image, target: int) -> torch.Tensor:
    """RGB PIL image -> [3, h, w] float in [-1, 1], h and w multiples of 16 (policy above)."""
    h, w = training_size(img.height, img.width, target)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    return to_tensor(img)

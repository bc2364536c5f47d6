"""Image decoding, the MDS image schema, and the training resolution policy.

Decoding: the stored bytes are opened with PIL, fully loaded (a truncated file raises here, not
later), turned upright by their EXIF orientation, transparent pixels composited over white, and
converted to 8-bit RGB (16-bit greyscale scaled, not clipped; CMYK, YCbCr, LAB, palettes converted);
the model sees a float tensor [3, H, W] in [-1, 1]. Rejected with a ValueError that says why:
animated or multi-page files (not only their first frame), and 32-bit integer or float pixels,
whose white level is not defined.

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
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from atoken.model.config import PATCH_HW

if TYPE_CHECKING:  # annotations only: the shard writers run without torch
    import torch

# The MDS schema of image shards, the one place it is defined (writer and reader share it).
# ``image`` holds the file's original encoded bytes; width/height are after EXIF orientation.
IMAGE_COLUMNS = {"image": "bytes", "width": "int32", "height": "int32", "name": "str"}
# Optional columns: our writer always adds them ("" and -1 when absent); readers must not require them.
OPTIONAL_COLUMNS = {"caption": "str", "label": "int32"}
IMAGE_WRITER_COLUMNS = {**IMAGE_COLUMNS, **OPTIONAL_COLUMNS}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif")


def open_rgb(data: bytes) -> Image.Image:
    """Decode encoded bytes fully into an upright RGB PIL image (raises on any decode error, and
    ValueError for what it will not guess at: animations, 32-bit integer or float pixels)."""
    if not data:
        raise ValueError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"not a recognised image format (starts {data[:8]!r})") from None
    img.load()  # NOTE: decodes every byte; Image.verify() would not catch a truncated JPEG body
    frames = getattr(img, "n_frames", 1)
    # MPO (phone cameras): the first frame is the photo, the others previews or a stereo pair.
    if frames > 1 and img.format != "MPO":
        raise ValueError(f"{img.format} image with {frames} frames (animated or multi-page): only still "
                         "images are read; save the frame you want, or make it a video (atoken-make-video-shards)")
    return to_rgb(ImageOps.exif_transpose(img))


# Modes PIL converts to RGB exactly as they mean (8 bits per channel, 1 bit, or a palette).
_DIRECT = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV"}
_ALPHA = {"RGBA", "LA", "PA"}
_GREY16 = {"I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded PIL image of any mode -> RGB, 8 bits per channel; transparency over white.

    NOTE: PIL's own ``convert("RGB")`` clips 16-bit and 32-bit greyscale at 255 instead of scaling
    (a mid-grey 16-bit PNG comes out white), and cannot convert LAB; both are handled here.
    """
    mode = img.mode
    if mode in _GREY16 or (mode == "I" and img.format == "PNG"):  # PNG's "I" is 16-bit greyscale
        grey = np.asarray(img).astype(np.float64)  # [H, W] in [0, 65535]
        img = Image.fromarray(np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8), "L")
    elif mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise ValueError(f"{img.format or 'image'} with {kind} pixels (PIL mode {mode}) has no defined white "
                         "level: save it as 8- or 16-bit")
    elif mode == "LAB":
        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                              "LAB", "RGB")
        return ImageCms.applyTransform(img, lab_to_srgb)
    if img.mode in ("La", "RGBa"):  # premultiplied alpha: over white is colour + (255 - alpha)
        px = np.asarray(img).astype(np.float64)  # [H, W, 2 or 4]
        over = np.clip(np.rint(px[..., :-1] + 255 - px[..., -1:]), 0, 255).astype(np.uint8)
        return Image.fromarray(over if img.mode == "RGBa" else over[..., 0], "RGB" if img.mode == "RGBa" else "L"
                               ).convert("RGB")
    if img.mode in _ALPHA or "transparency" in img.info:  # P, L or RGB with a transparent colour key
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)),
                                     img.convert("RGBA")).convert("RGB")
    if img.mode not in _DIRECT:
        raise ValueError(f"{img.format or 'image'} with PIL mode {img.mode!r} is not supported: save it as 8-bit "
                         "RGB or greyscale")
    return img.convert("RGB")


def to_pixels(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W] (what training samples carry: ``model.patches.patchify_values``)."""
    import torch  # noqa: PLC0415 - the shard writers and --help run without torch

    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # [3, H, W]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32 in [-1, 1] (v / 127.5 - 1, ``model.patches.unit_table``)."""
    from atoken.model.patches import unit_table  # noqa: PLC0415 - torch: the shard writers run without it

    return unit_table()[to_pixels(img).long()]


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


def resize_pixels(img: Image.Image, target: int) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, h, w], h and w multiples of 16 (policy above)."""
    h, w = training_size(img.height, img.width, target)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    return to_pixels(img)


def resize_for_training(img: Image.Image, target: int) -> torch.Tensor:
    """RGB PIL image -> [3, h, w] float in [-1, 1], h and w multiples of 16 (policy above)."""
    from atoken.model.patches import unit_table  # noqa: PLC0415 - torch: the shard writers run without it

    return unit_table()[resize_pixels(img, target).long()]

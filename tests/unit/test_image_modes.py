"""The image decoder against every pixel mode PIL reports: the right RGB, or a clear rejection.

Each mode is made from a real photo (scikit-image's astronaut, 48 x 48), saved in a format that keeps
the mode (PNG, else TIFF; modes no format stores are converted in memory), decoded by
``data_pipeline.images``, and compared with the RGB the mode means, computed here with numpy.
"""
import colorsys
import io

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageCms

from atoken.data_pipeline.images import decode_image, open_rgb, to_rgb

SIDE = 48


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """uint8 [48, 48, 3]: a real photo, so every mode sees natural colours."""
    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((SIDE, SIDE), Image.Resampling.BICUBIC))


def alpha_ramp() -> np.ndarray:
    """uint8 [48, 48]: 0 (transparent) on the left to 255 (opaque) on the right."""
    return np.tile(np.linspace(0, 255, SIDE).round().astype(np.uint8), (SIDE, 1))


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return rgb * a + 255 * (1 - a)


def grey_of(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as PIL's L conversion (uint8 [H, W])."""
    return np.asarray(Image.fromarray(rgb).convert("L"))


def encoded(img: Image.Image) -> tuple[bytes | None, str]:
    """(bytes, format) of a file that reads back in ``img``'s mode; (None, "") if no format keeps it."""
    for fmt in ("PNG", "TIFF"):
        buf = io.BytesIO()
        try:
            img.save(buf, fmt)
        except (OSError, KeyError, ValueError):
            continue
        if Image.open(io.BytesIO(buf.getvalue())).mode in (img.mode, "I;16" if img.mode.startswith("I;16") else ""):
            return buf.getvalue(), fmt
    return None, ""


def decoded(img: Image.Image) -> np.ndarray:
    """What the decoder makes of ``img``: through a file when a format stores its mode, else in memory."""
    data, _ = encoded(img)
    if data is not None:
        x = decode_image(data)  # [3, H, W] in [-1, 1]
        return ((x + 1) * 127.5).round().permute(1, 2, 0).numpy()
    return np.asarray(to_rgb(img), dtype=np.float64)


def case(mode: str, rgb: np.ndarray) -> tuple[Image.Image, np.ndarray | None, float]:
    """(image in ``mode``, the RGB it means or None when it must be rejected, tolerance in 8-bit levels)."""
    grey, alpha = grey_of(rgb), alpha_ramp()
    if mode == "1":
        bits = grey > 127
        return Image.fromarray(bits), np.repeat(bits[..., None] * 255.0, 3, -1), 0
    if mode == "L":
        return Image.fromarray(grey), np.repeat(grey[..., None], 3, -1), 0
    if mode.startswith("I;16") or mode == "I":
        # 16-bit values with their own low byte: the decoder must scale by 257, not clip at 255.
        v16 = grey.astype(np.uint16) * 257 + (np.arange(SIDE)[None] % 100).astype(np.uint16)
        if mode == "I":  # 32-bit integers (TIFF): the white level is unknown
            return Image.fromarray(v16.astype(np.int32)), None, 0
        order = {"I;16B": ">", "I;16N": "="}.get(mode, "<")
        img = Image.frombytes(mode, (SIDE, SIDE), v16.astype(f"{order}u2").tobytes())
        return img, np.repeat(np.rint(v16 / 257.0)[..., None], 3, -1), 0
    if mode == "F":
        return Image.fromarray(grey.astype(np.float32) / 255), None, 0
    if mode == "LA":
        return Image.fromarray(np.dstack([grey, alpha]), "LA"), np.repeat(over_white(grey[..., None], alpha), 3, -1), 1
    if mode == "La":  # premultiplied: the stored grey is L * alpha
        la = np.dstack([np.rint(grey * (alpha / 255.0)), alpha]).astype(np.uint8)
        return (Image.frombytes("La", (SIDE, SIDE), la.tobytes()),
                np.repeat(over_white(grey[..., None], alpha), 3, -1), 1)
    if mode in ("RGBA", "RGBa"):
        img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
        return img.convert(mode) if mode == "RGBa" else img, over_white(rgb, alpha), 1
    if mode in ("P", "PA"):
        pal = Image.fromarray(rgb).quantize(64)  # P: indices into a 64-colour palette
        table = np.asarray(pal.getpalette()[:64 * 3], np.float64).reshape(64, 3)
        idx = np.asarray(pal)
        if mode == "P":  # index 0 marked transparent (a PNG tRNS chunk)
            pal.info["transparency"] = 0
            want = table[idx]
            want[idx == 0] = 255
            return pal, want, 0
        pa = pal.convert("PA")
        pa.putalpha(Image.fromarray(alpha))
        return pa, over_white(table[idx], alpha), 1
    if mode in ("RGB", "RGBX"):
        return Image.fromarray(rgb).convert(mode), rgb.astype(np.float64), 0
    if mode == "CMYK":  # C, M, Y = 255 - R, G, B and no black: the naive inverse PIL applies
        cmyk = np.dstack([255 - rgb, np.zeros_like(grey)])
        return Image.fromarray(cmyk, "CMYK"), rgb.astype(np.float64), 0
    if mode == "YCbCr":  # JPEG's full-range YCbCr (ITU-R 601)
        r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
        y = 0.299 * r + 0.587 * g + 0.114 * b
        ycc = np.dstack([y, 128 + (b - y) / 1.772, 128 + (r - y) / 1.402]).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(ycc, "YCbCr"), rgb.astype(np.float64), 2
    if mode == "HSV":
        hsv = np.array([[colorsys.rgb_to_hsv(*(px / 255)) for px in row] for row in rgb]) * 255
        return Image.fromarray(hsv.round().astype(np.uint8), "HSV"), rgb.astype(np.float64), 4
    if mode == "LAB":  # CIE L*a*b* (D50), 8 bits: quantised coarsely, so a wider tolerance
        to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
        return ImageCms.applyTransform(Image.fromarray(rgb), to_lab), rgb.astype(np.float64), 6
    raise AssertionError(f"no test case for PIL mode {mode!r}: add one")


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_pil_mode_decodes_to_what_it_means_or_is_rejected(mode, photo):
    img, want, tol = case(mode, photo)
    assert img.mode == mode
    if want is None:
        data, _fmt = encoded(img)
        assert data is not None, f"no format stores {mode} here"
        with pytest.raises(ValueError, match=f"PIL mode {mode}"):
            decode_image(data)
        return
    got = decoded(img)
    assert got.shape == (SIDE, SIDE, 3)
    err = np.abs(got - want)
    assert err.max() <= tol, (mode, err.max(), err.mean())


def test_16_bit_grey_png_keeps_its_brightness():
    """The reported case: a 16-bit grey PNG of mean 0.5 decoded as nearly white (PIL clips at 255)."""
    v16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (64, 1))
    buf = io.BytesIO()
    Image.frombytes("I;16", (256, 64), v16.astype("<u2").tobytes()).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    x = (decode_image(buf.getvalue()) + 1) / 2
    assert abs(x.mean().item() - 0.5) < 1e-3
    assert np.allclose(x[0, 0].numpy() * 65535, v16[0], atol=65535 / 255 / 2 + 1)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_are_rejected_not_cut_to_their_first_frame(fmt, photo):
    frames = [Image.fromarray(photo), Image.fromarray(255 - photo)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.raises(ValueError, match=f"{fmt} image with 2 frames"):
        open_rgb(buf.getvalue())
    single = io.BytesIO()
    frames[0].save(single, fmt)
    assert open_rgb(single.getvalue()).size == (SIDE, SIDE)

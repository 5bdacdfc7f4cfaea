"""Exact decoding of encoded image bytes into the 8-bit RGB pixels the DINOv2 target encoder sees.

Conventions (TRELLIS image prep):
- Output is an 8-bit RGB image; alpha is composited onto black, i.e. colours are premultiplied,
  rounded as (c * a + 127) // 255.
- EXIF orientation (tag 0x0112, all 8 values; Pillow also reads it from XMP) is honoured. It is
  applied to the final RGB pixels, which is the same as applying it first: every other step is per pixel.
- Deep gray is scaled to 8 bits by rounding v * 255 / 65535, never clipped at 255 (Pillow's own conversion
  clips, which turns a 16-bit PNG white): 16-bit gray ("I;16*") and 32-bit gray ("I", clipped to 0..65535
  first). 16-bit colour (RGB, RGBA, gray+alpha PNGs and TIFFs) keeps the high byte Pillow unpacks, within
  one level of exact rounding: recovering the low byte would mean re-decoding through Pillow internals.
- Float gray ("F"): values are taken as 0..1 when the maximum is <= 1, else as 0..255; then clipped,
  rounded; NaN is black.
- CMYK: through the embedded ICC profile to sRGB (perceptual intent) when there is a usable CMYK
  profile, else R = round(255 * (1 - C/255) * (1 - K/255)) (likewise G from M, B from Y). Pillow reads
  every CMYK JPEG as Adobe-inverted, as Photoshop writes them and browsers assume. 16-bit CMYK TIFFs keep
  Pillow's high byte (off by at most one level).
- Palette, gray and binary images without transparency are plain conversions (gray replicated).
- Premultiplied modes ("La", "RGBa") already carry composited colours and are taken as stored.
- Multi-frame files (animated GIF/WebP/PNG, multi-page TIFF): the first frame.
- Embedded RGB ICC profiles are not applied: TRELLIS feeds the stored RGB values to DINOv2 as they are.
- Reduced JPEG decoding (`min_short_side`): a JPEG at least twice the size it will be resized to is decoded at
  the smallest DCT scale (1/2, 1/4 or 1/8) whose short side still reaches `min_short_side`, which is several
  times faster; the bicubic resize then starts from that image. Its pixels after resize_and_center_crop differ
  from a full decode's by about one level on average (tests/test_images.py measures the bound).
"""

import functools
import io
import logging
import math
import struct
import zlib

import numpy as np
from PIL import Image, ImageCms

logger = logging.getLogger(__name__)

# PIL's plugins raise all of these on malformed input; all mean "these bytes are not a usable image".
_PIL_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

_INTEGER_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_PREMULTIPLIED_MODES = ("La", "RGBa")
_ORIENTATION_TAG = 0x0112
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode_image(data: bytes, min_short_side: int | None = None) -> Image.Image:
    """Fully loaded RGB image of encoded `data` (first frame, oriented, alpha on black); ValueError if undecodable.

    With `min_short_side`, a large JPEG may come back smaller, its short side still at least that (see above).
    """
    image = _open(data, min_short_side)
    try:
        orientation = _orientation(image)
        rgb = composite_on_black(_in_eight_bit_mode(image))
    except _PIL_ERRORS as error:
        raise ValueError(f"cannot convert {image.format} image of mode {image.mode} to RGB: {error!r}") from error
    finally:
        image.close()
    return _apply_orientation(rgb, orientation)


def _open(data: bytes, min_short_side: int | None = None) -> Image.Image:
    """Opened, loaded first frame of `data` (a large JPEG at a reduced DCT scale when `min_short_side` is given)."""
    try:
        image = Image.open(io.BytesIO(data))
    except _PIL_ERRORS as error:
        raise ValueError(f"undecodable image: {error!r}") from error
    try:
        if min_short_side and image.format == "JPEG" and min(image.size) >= 2 * min_short_side:
            scale = min_short_side / min(image.size)
            # draft() picks the largest reduction whose result is at least the requested size in both sides.
            image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image.load()
    except _PIL_ERRORS as error:
        image.close()
        raise ValueError(f"undecodable {image.format} image: {error!r}") from error
    return image


def _orientation(image: Image.Image) -> int:
    """EXIF orientation 1..8 of `image`; 1 when absent, malformed or out of range."""
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except _PIL_ERRORS as error:  # broken EXIF must not cost a picture whose pixels are fine
        logger.warning("ignoring unreadable EXIF: %r", error)
        return 1
    return orientation if orientation in _TRANSPOSES else 1


def _apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    """`image` transposed so that it displays upright, for EXIF orientation `orientation`."""
    method = _TRANSPOSES.get(orientation)
    return image if method is None else image.transpose(method)


def _to_eight_bits(values: np.ndarray) -> np.ndarray:
    """uint8 of 16-bit sample values: round(v * 255 / 65535), with no ties to break (65535 / 255 is odd)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _in_eight_bit_mode(image: Image.Image) -> Image.Image:
    """`image` in an 8-bit mode `composite_on_black` converts exactly: deep gray scaled, CMYK and LAB to RGB."""
    if image.mode in _INTEGER_GRAY_MODES:
        return _integer_gray(image)
    if image.mode == "F":
        return _float_gray(image)
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    if image.mode == "LAB":  # its "A" band is a*, not alpha
        return image.convert("RGB")
    return image


def _integer_gray(image: Image.Image) -> Image.Image:
    """L image (LA with a tRNS value) of 16/32-bit gray, scaled by rounding, not clipped at 255."""
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    gray = _to_eight_bits(values)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int) and not isinstance(transparent, bool):  # PNG tRNS holds the 16-bit value
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray, alpha], axis=-1), mode="LA")
    return Image.fromarray(gray, mode="L")


def _float_gray(image: Image.Image) -> Image.Image:
    """L image of float gray: 0..1 when the maximum is <= 1, else 0..255; clipped, rounded, NaN black."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
    scale = 255.0 if values.size == 0 or values.max() <= 1.0 else 1.0
    gray = np.floor(np.clip(values * scale, 0.0, 255.0) + 0.5)
    return Image.fromarray(gray.astype(np.uint8), mode="L")


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    """Built-in sRGB profile, built once."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """RGB of a CMYK image: through its ICC profile to sRGB when it has a CMYK one, else the multiplicative formula."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            if profile.profile.xcolor_space.strip() == "CMYK":
                return ImageCms.profileToProfile(image, profile, _srgb_profile(), outputMode="RGB")
            logger.warning("ignoring %r ICC profile on a CMYK image", profile.profile.xcolor_space)
        except (ImageCms.PyCMSError, OSError, ValueError) as error:  # a broken profile should not cost the picture
            logger.warning("ignoring unusable ICC profile on a CMYK image: %r", error)
    # Pillow's CMYK -> RGB is exactly round(255 * (1 - C/255) * (1 - K/255)) per channel (checked on all C, K pairs).
    return image.convert("RGB")


def composite_on_black(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; with alpha, colours are premultiplied (composited onto black), as TRELLIS expects."""
    if image.mode in _PREMULTIPLIED_MODES:  # PIL would un-premultiply RGBa and cannot convert La at all
        colour = np.asarray(image)[..., :-1]
        return Image.fromarray(np.repeat(colour, 3, axis=-1) if colour.shape[-1] == 1 else colour, mode="RGB")
    if "A" not in image.getbands() and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)  # (H, W, 4)
    rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # rounded c * a / 255
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def resize_and_center_crop(image: Image.Image, size: int = 518) -> np.ndarray:
    """Resize the short side to `size` (bicubic), center-crop size x size: uint8 (size, size, 3)."""
    # Sizes and offsets follow torchvision's Resize(size) + CenterCrop(size), which DINOv2 preprocessing uses:
    # the long side is truncated, the crop offset rounded.
    width, height = image.size
    if min(width, height) != size:
        if width <= height:
            width, height = size, int(size * height / width)
        else:
            width, height = int(size * width / height), size
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return np.asarray(image.convert("RGB").crop((left, top, left + size, top + size)))

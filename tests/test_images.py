"""Decoding image bytes to the 8-bit RGB a DINOv2 target encoder sees: each case against a numpy reference."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from gap3d.data.images import composite_on_black, decode_image, resize_and_center_crop
from miniature.img2dataset import photo_like_jpeg

RNG_SEED = 7


def _rng():
    return np.random.default_rng(RNG_SEED)


def _encode(image: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **params)
    return buffer.getvalue()


def _decoded(data: bytes) -> np.ndarray:
    image = decode_image(data)
    assert image.mode == "RGB"
    return np.asarray(image)


def _premultiplied(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference composite onto black: c * a / 255, rounded half up."""
    return np.floor(rgb.astype(np.float64) * alpha[..., None].astype(np.float64) / 255.0 + 0.5).astype(np.uint8)


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    return np.rint(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


# ---- hand-written encoders for what PIL cannot write: 16-bit colour PNGs, 16-bit and associated-alpha TIFFs


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _sixteen_bit_png(samples: np.ndarray, color_type: int, extra_chunks: bytes = b"") -> bytes:
    """16-bit PNG of uint16 (H, W, C) samples (unfiltered scanlines)."""
    height, width, _ = samples.shape
    rows = samples.astype(">u2").reshape(height, -1).view(np.uint8)
    scanlines = b"".join(b"\0" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + extra_chunks
        + _png_chunk(b"IDAT", zlib.compress(scanlines))
        + _png_chunk(b"IEND", b"")
    )


def _tiff(pixels: np.ndarray, photometric: int, extra_samples: int | None = None) -> bytes:
    """Uncompressed little-endian single-strip TIFF of uint8/uint16 (H, W, C) pixels."""
    height, width, channels = pixels.shape
    bits = pixels.dtype.itemsize * 8
    data = pixels.astype(f"<u{pixels.dtype.itemsize}").tobytes()
    tags = [(256, 4, [width]), (257, 4, [height]), (258, 3, [bits] * channels), (259, 3, [1]), (262, 3, [photometric])]
    tags += [(273, 4, [0]), (277, 3, [channels]), (278, 4, [height]), (279, 4, [len(data)]), (284, 3, [1])]
    if extra_samples is not None:
        tags.append((338, 3, [extra_samples]))
    ifd_size = 2 + 12 * len(tags) + 4
    overflow_at = 8 + ifd_size
    bits_bytes = struct.pack(f"<{channels}H", *([bits] * channels))
    data_at = overflow_at + (len(bits_bytes) if channels > 2 else 0)
    entries = b""
    for tag, kind, values in tags:
        if tag == 273:
            values = [data_at]
        packed = struct.pack(f"<{len(values)}{'H' if kind == 3 else 'I'}", *values)
        field = struct.pack("<I", overflow_at) if len(packed) > 4 else packed.ljust(4, b"\0")
        entries += struct.pack("<HHI", tag, kind, len(values)) + field
    ifd = struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd + (bits_bytes if channels > 2 else b"") + data


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _k_only_cmyk_profile() -> bytes:
    """ICC v2 CMYK printer profile whose A2B0 maps any ink to neutral Lab with L* = 100 * (1 - K/255)."""
    # lut16 CLUT with 2 grid points per ink; K is the fastest index. Legacy 16-bit Lab: L 100 -> 0xFF00, a*=b*=0 ->
    # 0x8000.
    clut = b"".join(struct.pack(">3H", 0 if index & 1 else 0xFF00, 0x8000, 0x8000) for index in range(16))
    identity = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    linear_tables = struct.pack(">HH", 2, 2) + struct.pack(">8H", *([0, 65535] * 4))
    lut = (
        b"mft2"
        + bytes(4)
        + bytes([4, 3, 2, 0])
        + identity
        + linear_tables
        + clut
        + struct.pack(">6H", *([0, 65535] * 3))
    )
    d50 = _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    name = b"K-only test CMYK\0"
    description = b"desc" + bytes(4) + struct.pack(">I", len(name)) + name + bytes(8 + 2 + 1 + 67)
    tags = [(b"A2B0", lut), (b"wtpt", b"XYZ " + bytes(4) + d50), (b"desc", description)]
    body_at, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for signature, payload in tags:
        payload += bytes(-len(payload) % 4)
        table += signature + struct.pack(">II", body_at + len(body), len(payload))
        body += payload
    size = body_at + len(body)
    header = struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"prtrCMYKLab " + bytes(12) + b"acsp"
    header += bytes(4 + 4 + 8 + 8 + 4) + d50 + bytes(4 + 16 + 28)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


# ---- EXIF orientation

# What each orientation asks the viewer to do to the stored pixels (EXIF 2.32, tag 0x0112), written in numpy.
_UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirror horizontal
    3: lambda a: a[::-1, ::-1],  # rotate 180
    4: lambda a: a[::-1],  # mirror vertical
    5: lambda a: np.rot90(a[:, ::-1], 1),  # mirror horizontal, rotate 270 CW
    6: lambda a: np.rot90(a, -1),  # rotate 90 CW
    7: lambda a: np.rot90(a[:, ::-1], -1),  # mirror horizontal, rotate 90 CW
    8: lambda a: np.rot90(a, 1),  # rotate 270 CW
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    stored = (np.arange(2 * 3 * 3).reshape(2, 3, 3) * 9).astype(np.uint8)  # 2 x 3, every pixel distinct
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(stored), "PNG", exif=exif)
    np.testing.assert_array_equal(_decoded(data), _UPRIGHT[orientation](stored))


def test_exif_orientation_in_jpeg_is_applied():
    quadrants = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], dtype=np.uint8)
    stored = quadrants.repeat(16, axis=0).repeat(24, axis=1)  # 32 x 48, colour blocks on the 8x8 JPEG grid
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = _decoded(_encode(Image.fromarray(stored), "JPEG", quality=95, subsampling=0, exif=exif))
    assert decoded.shape == (48, 32, 3)
    np.testing.assert_allclose(decoded, np.rot90(stored, -1), atol=12)


# ---- deep gray


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped():
    values = np.array([[0, 128, 129, 257, 384, 1000], [32767, 32768, 40000, 65279, 65534, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    np.testing.assert_array_equal(_decoded(data), _gray_to_rgb(_sixteen_to_eight(values)))


def test_sixteen_bit_big_endian_tiff_is_scaled_not_clipped():
    values = np.array([[300, 65535, 12345, 129]], dtype=np.uint16)
    image = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    data = _encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    np.testing.assert_array_equal(_decoded(data), _gray_to_rgb(_sixteen_to_eight(values)))


def test_sixteen_bit_grayscale_png_trns_value_is_transparent():
    values = np.array([[100, 5000, 65535], [5000, 0, 40000]], dtype=np.uint16)
    data = _sixteen_bit_png(values[..., None], color_type=0, extra_chunks=_png_chunk(b"tRNS", struct.pack(">H", 5000)))
    expected = _gray_to_rgb(np.where(values == 5000, 0, _sixteen_to_eight(values)).astype(np.uint8))
    np.testing.assert_array_equal(_decoded(data), expected)


def test_thirty_two_bit_integer_tiff_is_clipped_to_sixteen_bits_then_scaled():
    values = np.array([[-5, 0, 257, 384], [65535, 65536, 70000, 1 << 24]], dtype=np.int32)
    data = _encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(_decoded(data), _gray_to_rgb(_sixteen_to_eight(np.clip(values, 0, 65535))))


def test_float_tiff_up_to_one_is_read_as_unit_range():
    values = np.array([[0.0, 0.25, 0.5, 1.0, -0.5, np.nan]], dtype=np.float32)
    data = _encode(Image.fromarray(values), "TIFF")
    expected = np.floor(np.clip(np.nan_to_num(values.astype(np.float64)), 0, 1) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(_decoded(data), _gray_to_rgb(expected))


def test_float_tiff_above_one_is_clipped_to_byte_range():
    values = np.array([[0.0, 1.5, 127.4, 254.6, 300.0, -3.0]], dtype=np.float32)
    data = _encode(Image.fromarray(values), "TIFF")
    expected = np.floor(np.clip(values.astype(np.float64), 0, 255) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(_decoded(data), _gray_to_rgb(expected))


# ---- 16-bit colour


def test_sixteen_bit_rgb_png_is_within_one_level_of_exact_rounding():
    samples = _rng().integers(0, 65536, (5, 4, 3), dtype=np.uint16)
    samples[0, 0] = [0x00FF, 0x80FF, 0xFF7F]
    decoded = _decoded(_sixteen_bit_png(samples, color_type=2)).astype(int)
    assert np.abs(decoded - _sixteen_to_eight(samples).astype(int)).max() <= 1


def test_sixteen_bit_rgba_png_is_composited_on_black():
    samples = _rng().integers(0, 65536, (5, 4, 4), dtype=np.uint16)
    expected = _premultiplied((samples[..., :3] >> 8).astype(np.uint8), (samples[..., 3] >> 8).astype(np.uint8))
    np.testing.assert_array_equal(_decoded(_sixteen_bit_png(samples, color_type=6)), expected)


# ---- palette, gray, alpha


def _palette_image(indices: np.ndarray, palette: np.ndarray) -> Image.Image:
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(palette.astype(np.uint8).ravel().tolist())
    return image


_PALETTE = np.array([[10, 20, 30], [200, 100, 50], [255, 255, 255], [0, 128, 255]])
_INDICES = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 3, 2]])


def test_palette_png_without_transparency_is_plain_rgb():
    data = _encode(_palette_image(_INDICES, _PALETTE), "PNG")
    np.testing.assert_array_equal(_decoded(data), _PALETTE[_INDICES].astype(np.uint8))


def test_palette_png_trns_alpha_is_composited_on_black():
    alpha = np.array([0, 128, 255, 37])
    data = _encode(_palette_image(_INDICES, _PALETTE), "PNG", transparency=bytes(alpha.tolist()))
    np.testing.assert_array_equal(_decoded(data), _premultiplied(_PALETTE[_INDICES], alpha[_INDICES]))


def test_palette_png_transparent_index_is_black():
    data = _encode(_palette_image(_INDICES, _PALETTE), "PNG", transparency=1)
    expected = np.where((_INDICES == 1)[..., None], 0, _PALETTE[_INDICES]).astype(np.uint8)
    np.testing.assert_array_equal(_decoded(data), expected)


def test_palette_alpha_tiff_is_composited_on_black():
    alpha = np.array([[255, 0, 128, 1], [64, 200, 255, 0], [3, 90, 180, 250]])
    image = Image.frombytes("PA", (4, 3), np.stack([_INDICES, alpha], axis=-1).astype(np.uint8).tobytes())
    image.putpalette(_PALETTE.astype(np.uint8).ravel().tolist())
    data = _encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "PA"
    np.testing.assert_array_equal(_decoded(data), _premultiplied(_PALETTE[_INDICES], alpha))


def test_gray_alpha_png_is_composited_on_black():
    gray_alpha = _rng().integers(0, 256, (4, 5, 2), dtype=np.uint8)
    data = _encode(Image.fromarray(gray_alpha, mode="LA"), "PNG")
    np.testing.assert_array_equal(_decoded(data), _premultiplied(_gray_to_rgb(gray_alpha[..., 0]), gray_alpha[..., 1]))


def test_rgba_png_is_composited_on_black():
    rgba = _rng().integers(0, 256, (4, 5, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    data = _encode(Image.fromarray(rgba, mode="RGBA"), "PNG")
    np.testing.assert_array_equal(_decoded(data), _premultiplied(rgba[..., :3], rgba[..., 3]))


def test_premultiplied_rgba_image_keeps_stored_colours():
    stored = np.array([[[100, 50, 25, 128], [10, 20, 30, 40]]], dtype=np.uint8)
    image = Image.frombytes("RGBa", (2, 1), stored.tobytes())
    np.testing.assert_array_equal(np.asarray(composite_on_black(image)), stored[..., :3])


def test_grayscale_png_is_replicated_to_rgb():
    gray = _rng().integers(0, 256, (4, 6), dtype=np.uint8)
    np.testing.assert_array_equal(_decoded(_encode(Image.fromarray(gray), "PNG")), _gray_to_rgb(gray))


def test_binary_png_is_black_and_white():
    bits = np.array([[1, 0, 1, 1, 0, 0, 1, 0, 1], [0, 1, 0, 0, 1, 1, 0, 1, 0]], dtype=bool)
    data = _encode(Image.fromarray(bits), "PNG")
    np.testing.assert_array_equal(_decoded(data), _gray_to_rgb(bits.astype(np.uint8) * 255))


# ---- CMYK

_CMYK = np.array(
    [
        [[0, 0, 0, 0], [255, 0, 0, 0], [100, 50, 200, 30], [10, 20, 30, 255]],
        [[128, 128, 128, 128], [0, 255, 7, 90], [33, 66, 99, 12], [1, 2, 3, 4]],
    ],
    dtype=np.uint8,
)


def _cmyk_formula(cmyk: np.ndarray) -> np.ndarray:
    cmyk = cmyk.astype(np.float64) / 255.0
    return np.rint(255.0 * (1.0 - cmyk[..., :3]) * (1.0 - cmyk[..., 3:])).astype(np.uint8)


def _cmyk_image(cmyk: np.ndarray) -> Image.Image:
    return Image.frombytes("CMYK", (cmyk.shape[1], cmyk.shape[0]), cmyk.tobytes())


def test_cmyk_without_profile_uses_multiplicative_formula():
    np.testing.assert_array_equal(_decoded(_encode(_cmyk_image(_CMYK), "TIFF")), _cmyk_formula(_CMYK))


def test_adobe_inverted_cmyk_jpeg_decodes_to_multiplicative_formula():
    cmyk = _CMYK.repeat(8, axis=0).repeat(8, axis=1)  # one flat 8x8 JPEG block per colour
    data = _encode(_cmyk_image(cmyk), "JPEG", quality=98)
    assert b"Adobe" in data  # PIL writes Photoshop-style inverted CMYK with an APP14 Adobe marker
    np.testing.assert_allclose(_decoded(data), _cmyk_formula(cmyk), atol=4)


def test_cmyk_with_icc_profile_is_converted_through_the_profile():
    # No CMYK profile ships with Pillow or this system, so the test builds one by hand: neutral grey set by K alone.
    k = np.arange(0, 256, 15)
    cmyk = np.stack([(k * 7) % 256, (k * 3) % 256, 255 - k, k], axis=-1)[None].astype(np.uint8)
    data = _encode(_cmyk_image(cmyk), "TIFF", icc_profile=_k_only_cmyk_profile())
    lightness = 100.0 * (1.0 - k / 255.0)
    luminance = np.where(lightness > 8.0, ((lightness + 16.0) / 116.0) ** 3, lightness / 903.3)  # CIE L* -> Y
    srgb = np.where(luminance <= 0.0031308, 12.92 * luminance, 1.055 * luminance ** (1 / 2.4) - 0.055)
    expected = _gray_to_rgb(np.floor(255.0 * srgb + 0.5))[None]
    np.testing.assert_allclose(_decoded(data), expected, atol=1)  # LittleCMS works at 16 bits, then rounds
    assert np.abs(_cmyk_formula(cmyk).astype(int) - expected).max() > 50  # the formula would be far off


def test_cmyk_with_rgb_profile_falls_back_to_formula():
    rgb_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = _encode(_cmyk_image(_CMYK), "TIFF", icc_profile=rgb_profile)
    np.testing.assert_array_equal(_decoded(data), _cmyk_formula(_CMYK))


# ---- multi-frame


def test_animated_gif_decodes_first_frame():
    first, second = _INDICES, (_INDICES + 1) % 4
    frames = [_palette_image(first, _PALETTE), _palette_image(second, _PALETTE)]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_array_equal(_decoded(data), _PALETTE[first].astype(np.uint8))


def test_multipage_tiff_decodes_first_page():
    pages = [_rng().integers(0, 256, (3, 4, 3), dtype=np.uint8) for _ in range(2)]
    data = _encode(Image.fromarray(pages[0]), "TIFF", save_all=True, append_images=[Image.fromarray(pages[1])])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_array_equal(_decoded(data), pages[0])


# ---- failures


def test_undecodable_bytes_raise_value_error():
    with pytest.raises(ValueError, match="undecodable"):
        decode_image(b"this is not an image")


def test_truncated_png_raises_value_error():
    data = _encode(Image.fromarray(_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(ValueError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_raises_value_error():
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)  # 900 Mpx, over twice PIL's limit
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")
    with pytest.raises(ValueError, match="decompression bomb"):
        decode_image(data)


# ---- DINOv2 prep


def test_resize_and_center_crop_keeps_a_square_of_the_target_size():
    pixels = _rng().integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_and_center_crop(Image.fromarray(pixels), 32), pixels)


def test_resize_and_center_crop_crops_the_middle_of_the_long_side():
    pixels = _rng().integers(0, 256, (16, 21, 3), dtype=np.uint8)  # short side already 16: crop only
    np.testing.assert_array_equal(resize_and_center_crop(Image.fromarray(pixels), 16), pixels[:, 2:18])


def random_image(width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def test_landscape_resize_and_crop_match_pil_by_hand():
    image = random_image(300, 200)
    # short side 200 -> 518, long side int(518 * 300 / 200) = 777; crop left round(259 / 2) = 130
    expected = image.resize((777, 518), Image.Resampling.BICUBIC).crop((130, 0, 648, 518))
    np.testing.assert_array_equal(resize_and_center_crop(image, 518), np.asarray(expected))


def test_portrait_resize_and_crop_match_pil_by_hand():
    image = random_image(90, 131)
    # short side 90 -> 64, long side int(64 * 131 / 90) = 93; crop top round(29 / 2) = 14
    expected = image.resize((64, 93), Image.Resampling.BICUBIC).crop((0, 14, 64, 78))
    out = resize_and_center_crop(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(expected))


def test_image_already_at_the_target_size_is_unchanged():
    image = random_image(518, 518)
    np.testing.assert_array_equal(resize_and_center_crop(image), np.asarray(image))


def _photo_jpeg() -> bytes:
    return photo_like_jpeg(_rng(), 640, 480)


def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_short_side():
    assert decode_image(_photo_jpeg(), min_short_side=112).size == (160, 120)  # 1/4: 1/8 would give 60 < 112
    assert decode_image(_photo_jpeg(), min_short_side=200).size == (320, 240)


def test_reduced_jpeg_decoding_changes_the_resized_pixels_by_about_a_level():
    data = _photo_jpeg()
    full = resize_and_center_crop(decode_image(data), 112).astype(np.int16)
    reduced = resize_and_center_crop(decode_image(data, min_short_side=112), 112).astype(np.int16)
    difference = np.abs(full - reduced)
    assert difference.mean() < 1.5 and np.percentile(difference, 99) < 12


@pytest.mark.parametrize("size, format", [((200, 150), "JPEG"), ((640, 480), "PNG")])
def test_small_jpegs_and_other_formats_are_decoded_whole(size, format):
    data = _encode(Image.fromarray(_rng().integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)), format)
    assert decode_image(data, min_short_side=112).size == size


def test_reduced_jpeg_decoding_still_applies_the_exif_orientation():
    image = Image.open(io.BytesIO(_photo_jpeg()))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    assert decode_image(data, min_short_side=112).size == (120, 160)

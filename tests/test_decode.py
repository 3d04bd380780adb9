"""What decode does with hostile files and with valid files that merely look odd.

Hostile files must fail with ScanError and a reason a user can read. Valid variants of a
real scan (other bit depths, colour models, encodings, EXIF orientation) must prepare to
the same model input as their ordinary twin, within the tolerances below.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vision.decode import decode
from vision.errors import ScanError
from vision.preprocess import prepare_bytes

SCANS = Path(__file__).resolve().parent.parent / "examples" / "scans"
GRAY_SCAN = SCANS / "glioma" / "Tr-gl_0207.jpg"  # real 8-bit grayscale JPEG, 512x512
RGB_SCAN = SCANS / "meningioma" / "Tr-me_0185.jpg"  # real RGB JPEG, 226 wide x 212 high

# Same pixels by another route: only float rounding may differ (max abs difference).
LOSSLESS_TOL = 1e-6
# The variant went through one more JPEG encoding at quality 95 than its lossless twin
# (mean abs difference of the 128x128 model input; measured 0.0002-0.0009 on these scans).
REENCODED_TOL = 0.01


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def pixels(path: Path) -> Image.Image:
    image = Image.open(io.BytesIO(path.read_bytes()))
    image.load()
    return image


def model_input(data: bytes) -> np.ndarray:
    return prepare_bytes(data).array


def max_diff(a: bytes, b: bytes) -> float:
    return float(np.abs(model_input(a) - model_input(b)).max())


def mean_diff(a: bytes, b: bytes) -> float:
    return float(np.abs(model_input(a) - model_input(b)).mean())


def lossless_twin(path: Path) -> bytes:
    """The scan's decoded pixels as PNG: the twin of lossless variants (a JPEG itself may be
    decoded at reduced scale by preprocessing, which a PNG never is)."""
    return encode(pixels(path), "PNG")


def reason(data: bytes) -> str:
    with pytest.raises(ScanError) as caught:
        decode(data)
    return str(caught.value)


def mode_of(data: bytes) -> str:
    return Image.open(io.BytesIO(data)).mode


# ---- every real example ------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SCANS.glob("*/*.jpg")), ids=lambda p: p.name)
def test_every_example_scan_decodes_to_a_2d_float_image_in_unit_range(path):
    width, height = pixels(path).size
    image = decode(path.read_bytes())
    assert image.shape == (height, width)
    assert image.dtype == np.float32
    assert 0.0 <= image.min() < image.max() <= 1.0


# ---- hostile files -----------------------------------------------------------------------


def test_empty_file_is_refused_as_empty():
    assert reason(b"") == "empty file (0 bytes)"


def test_text_file_is_refused_as_not_an_image():
    assert reason(b"Patient 0042, axial T1, see attached.\n") == (
        "not an image: content is not JPEG, PNG, BMP, TIFF or DICOM"
    )


def test_random_bytes_behind_a_jpeg_magic_are_refused_as_corrupt_jpeg():
    data = b"\xff\xd8\xff" + np.random.default_rng(7).bytes(4096)
    message = reason(data)
    assert message.startswith("corrupt JPEG: ")
    assert "BytesIO" not in message  # the reason is Pillow's diagnosis, not an object repr


def test_pillow_is_not_configured_to_accept_truncated_files():
    # With this flag on, Pillow pads a cut-off image with gray and no error is raised.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF"])
def test_scan_cut_in_half_is_refused_as_truncated(fmt):
    data = GRAY_SCAN.read_bytes() if fmt == "JPEG" else encode(pixels(GRAY_SCAN), fmt)
    message = reason(data[: len(data) // 2])
    assert message.startswith(f"corrupt {fmt}: ")
    assert "truncated" in message


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed 8-bit grayscale PNG whose IHDR declares width x height (data is tiny)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def tiff_declaring(width: int, height: int) -> bytes:
    """The real scan as a TIFF whose ImageWidth and ImageLength tags are rewritten as LONGs."""
    data = bytearray(encode(pixels(GRAY_SCAN), "TIFF"))
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in (256, 257):  # ImageWidth, ImageLength
            struct.pack_into("<HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(pixels(GRAY_SCAN), "BMP"))
    struct.pack_into("<ii", data, 18, width, height)  # BITMAPINFOHEADER biWidth, biHeight
    return bytes(data)


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(GRAY_SCAN.read_bytes())
    sof = data.index(b"\xff\xc0")  # baseline start-of-frame: length, precision, height, width
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


@pytest.mark.parametrize(
    "data, size",
    [
        (png_declaring(100_000, 100_000), "100000x100000"),
        (tiff_declaring(100_000, 100_000), "100000x100000"),
        (tiff_declaring(1, 100_000_000), "1x100000000"),
        (bmp_declaring(100_000, 100_000), "100000x100000"),
        (jpeg_declaring(65_535, 65_535), "65535x65535"),  # the largest a JPEG can declare
    ],
    ids=["png", "tiff", "tiff-one-column", "bmp", "jpeg"],
)
def test_header_declaring_a_huge_image_is_refused_before_any_pixel_is_decoded(data, size, monkeypatch):
    def no_decoding(self):
        pytest.fail("pixel data was decoded")  # pytest's Failed is not an Exception: decode cannot mask it

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert reason(data) == f"decompression bomb: declares {size} pixels (limit 64000000)"


def test_jpeg_repeating_a_scan_hundreds_of_times_is_refused_before_decoding(monkeypatch):
    # 4000x4000 black, progressive, its last scan repeated: ~70 kB that took 5 s to decode.
    jpeg = encode(Image.new("L", (4000, 4000)), "JPEG", progressive=True)
    last_scan = jpeg[jpeg.rindex(b"\xff\xda") : -2]
    bomb = jpeg[:-2] + last_scan * 200 + b"\xff\xd9"
    assert jpeg.count(b"\xff\xda") == 6 and len(bomb) < 100_000

    def no_decoding(self):
        pytest.fail("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert reason(bomb) == "decompression bomb: JPEG has 206 scans (limit 64)"


# ---- valid files that look odd -----------------------------------------------------------


def test_16bit_png_prepares_like_its_8bit_twin():
    gray = np.asarray(pixels(GRAY_SCAN))
    variant = encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")  # 8-bit v -> 16-bit 257 v
    assert mode_of(variant) == "I;16"
    assert max_diff(variant, lossless_twin(GRAY_SCAN)) <= LOSSLESS_TOL


def test_12bit_scan_in_a_16bit_png_prepares_like_its_8bit_twin():
    # Scanners export 12-bit data (0..4095) in 16-bit PNGs: dark on a 16-bit scale, but
    # preprocessing normalises by the head's own intensity, so the model input is the same.
    gray = np.asarray(pixels(GRAY_SCAN))
    variant = encode(Image.fromarray(gray.astype(np.uint16) * 16), "PNG")
    assert max_diff(variant, lossless_twin(GRAY_SCAN)) <= 1e-5  # float rounding of a rescale


def test_16bit_big_endian_tiff_prepares_like_its_8bit_twin():
    gray = np.asarray(pixels(GRAY_SCAN))
    variant = encode(Image.fromarray((gray.astype(np.uint16) * 257).astype(">u2")), "TIFF")
    assert mode_of(variant) == "I;16B"
    assert max_diff(variant, lossless_twin(GRAY_SCAN)) <= LOSSLESS_TOL


def test_32bit_integer_tiff_holding_16bit_values_prepares_like_its_twin():
    gray = np.asarray(pixels(GRAY_SCAN))
    variant = encode(Image.fromarray(gray.astype(np.int32) * 257), "TIFF")
    assert mode_of(variant) == "I"
    assert max_diff(variant, lossless_twin(GRAY_SCAN)) <= LOSSLESS_TOL


def test_float_tiff_in_unit_range_decodes_like_its_twin():
    gray = np.asarray(pixels(GRAY_SCAN))
    variant = encode(Image.fromarray(gray.astype(np.float32) / 255), "TIFF")
    assert mode_of(variant) == "F"
    np.testing.assert_allclose(decode(variant), decode(GRAY_SCAN.read_bytes()), atol=LOSSLESS_TOL)


def test_nan_in_a_float_tiff_reads_as_black():
    gray = np.asarray(pixels(GRAY_SCAN)).astype(np.float32) / 255
    assert (gray == 0).sum() > 1000  # the scan's black background
    with_nan = np.where(gray == 0, np.nan, gray).astype(np.float32)
    np.testing.assert_allclose(decode(encode(Image.fromarray(with_nan), "TIFF")), gray, atol=LOSSLESS_TOL)


def test_cmyk_jpeg_prepares_like_its_lossless_twin():
    rgb = pixels(RGB_SCAN).convert("RGB")
    variant = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    assert mode_of(variant) == "CMYK"
    assert mean_diff(variant, encode(rgb, "PNG")) < REENCODED_TOL


def test_progressive_jpeg_prepares_like_its_baseline_twin():
    # Same quality, same DCT coefficients; progressive only orders them differently in the file.
    gray = pixels(GRAY_SCAN)
    variant = encode(gray, "JPEG", quality=95, progressive=True)
    assert Image.open(io.BytesIO(variant)).info.get("progressive") == 1
    assert max_diff(variant, encode(gray, "JPEG", quality=95)) <= LOSSLESS_TOL


def test_rgba_png_prepares_like_its_rgb_twin():
    rgb = pixels(RGB_SCAN).convert("RGB")
    variant = encode(rgb.convert("RGBA"), "PNG")  # opaque alpha, as image exporters write it
    assert mode_of(variant) == "RGBA"
    assert max_diff(variant, encode(rgb, "PNG")) <= LOSSLESS_TOL


def test_palette_png_prepares_like_its_twin():
    gray = pixels(GRAY_SCAN)
    variant = encode(gray.convert("P"), "PNG")  # 256 gray palette entries: lossless for L
    assert mode_of(variant) == "P"
    assert max_diff(variant, lossless_twin(GRAY_SCAN)) <= LOSSLESS_TOL


def test_la_png_prepares_like_its_grayscale_twin():
    gray = pixels(GRAY_SCAN)
    variant = encode(gray.convert("LA"), "PNG")
    assert mode_of(variant) == "LA"
    assert max_diff(variant, lossless_twin(GRAY_SCAN)) <= LOSSLESS_TOL


def test_bilevel_png_prepares_like_the_same_pixels_in_grayscale():
    bilevel = pixels(GRAY_SCAN).convert("1")  # dithered black and white
    variant = encode(bilevel, "PNG")
    assert mode_of(variant) == "1"
    assert max_diff(variant, encode(bilevel.convert("L"), "PNG")) <= LOSSLESS_TOL


# How each EXIF orientation is stored: the transpose that, applied to the upright scan,
# gives the stored pixels (the inverse of what a viewer applies to display them).
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def with_orientation(image: Image.Image, orientation: int, fmt: str, **options) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image.transpose(STORED[orientation]), fmt, exif=exif.tobytes(), **options)


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_undone_in_a_png(orientation):
    upright = pixels(RGB_SCAN).convert("RGB")  # non-square, so a wrong turn changes the shape
    variant = with_orientation(upright, orientation, "PNG")
    assert decode(variant).shape == (212, 226)
    assert max_diff(variant, encode(upright, "PNG")) <= LOSSLESS_TOL


def test_exif_orientation_is_undone_in_a_jpeg():
    upright = pixels(RGB_SCAN).convert("RGB")
    variant = with_orientation(upright, 6, "JPEG", quality=95)
    assert decode(variant).shape == (212, 226)
    assert mean_diff(variant, encode(upright, "PNG")) < REENCODED_TOL


def test_rotated_pixels_without_the_orientation_tag_do_not_match():
    # Control for the two tests above: the tolerance is tight enough to see a missing turn.
    upright = pixels(RGB_SCAN).convert("RGB")
    variant = encode(upright.transpose(Image.Transpose.ROTATE_90), "PNG")
    assert decode(variant).shape == (226, 212)
    assert mean_diff(variant, encode(upright, "PNG")) > 10 * REENCODED_TOL

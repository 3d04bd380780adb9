"""Fuzzing decode: mutated real scans either decode to a sane image or fail with ScanError.

Any other exception type, a non-finite or out-of-range array, or a call that runs past
CALL_LIMIT_S is a bug in vision/decode.py. The number of examples is bounded for CI and
raised for a long run with BRAINSCAN_FUZZ_EXAMPLES (e.g. `make fuzz` sets 20000).
"""
from __future__ import annotations

import faulthandler
import io
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vision.decode import decode
from vision.errors import ScanError

SCANS = Path(__file__).resolve().parent.parent / "examples" / "scans"
EXAMPLES = int(os.environ.get("BRAINSCAN_FUZZ_EXAMPLES", "200"))
CALL_LIMIT_S = 5  # one decode of a small scan takes milliseconds; 5 s means it is stuck
REASONS = ("empty file (0 bytes)", "not an image: ", "corrupt ", "decompression bomb: ")


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    """Valid files of every format and several encodings, all made from one real scan."""
    jpeg = (SCANS / "notumor" / "Tr-no_1379.jpg").read_bytes()  # real RGB JPEG, 173x201
    rgb = Image.open(io.BytesIO(jpeg)).convert("RGB")
    gray = rgb.convert("L")
    gray16 = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: exercises the EXIF parser and the transpose
    return {
        "jpeg": jpeg,
        "jpeg-progressive-exif": _encode(gray, "JPEG", progressive=True, exif=exif.tobytes()),
        "jpeg-cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "png-gray": _encode(gray, "PNG"),
        "png-16bit": _encode(gray16, "PNG"),
        "png-palette": _encode(rgb.quantize(64), "PNG"),
        "png-rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "png-bilevel": _encode(gray.convert("1"), "PNG"),
        "bmp-rgb": _encode(rgb, "BMP"),
        "bmp-palette": _encode(gray.convert("P"), "BMP"),
        "tiff-raw": _encode(gray, "TIFF"),
        "tiff-deflate-rgb": _encode(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "tiff-16bit-bigendian": _encode(Image.fromarray(np.asarray(gray16).astype(">u2")), "TIFF"),
        "tiff-int32": _encode(Image.fromarray(np.asarray(gray).astype(np.int32) * 257), "TIFF"),
        "tiff-float": _encode(Image.fromarray(np.asarray(gray, dtype=np.float32) / 255), "TIFF"),
    }


SEEDS = _seeds()


@st.composite
def mutations(draw) -> tuple[str, list[tuple]]:
    """A seed's name and 1-4 byte-level edits, as a recipe that prints short when a case fails.

    Positions favour bytes 8-512, where the headers after the magic are."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "truncate", "insert", "delete")))
        at = draw(st.one_of(st.integers(8, 512), st.integers(0, len(SEEDS[name]))))
        arg = {
            "flip": st.integers(1, 255),  # xor mask
            "truncate": st.none(),
            "insert": st.binary(min_size=1, max_size=16),
            "delete": st.integers(1, 64),  # bytes removed
        }[op]
        edits.append((op, at, draw(arg)))
    return name, edits


def apply(name: str, edits: list[tuple]) -> bytes:
    data = bytearray(SEEDS[name])
    for op, at, arg in edits:
        at = min(at, len(data))
        if op == "flip" and at < len(data):
            data[at] ^= arg
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = arg
        elif op == "delete":
            del data[at : at + arg]
    return bytes(data)


class DecodeTimeout(BaseException):
    """BaseException so that decode's own `except Exception` cannot turn it into a ScanError."""


def _raise_timeout(signum, frame):
    raise DecodeTimeout(f"decode ran past {CALL_LIMIT_S} s")


def decode_guarded(data: bytes):
    """decode under a SIGALRM limit, with faulthandler as the backstop should a C decoder
    never return to Python (a signal handler only runs between bytecodes)."""
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    faulthandler.dump_traceback_later(4 * CALL_LIMIT_S, exit=True)
    signal.alarm(CALL_LIMIT_S)
    try:
        return decode(data)
    finally:
        signal.alarm(0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


def test_every_seed_decodes_unmutated():
    for name, data in SEEDS.items():
        upright = (201, 173)
        assert decode(data).shape == (upright[::-1] if "exif" in name else upright), name


@pytest.mark.filterwarnings(r"ignore::UserWarning:PIL\..*")  # Pillow warns about the corrupt metadata it skips
@settings(max_examples=EXAMPLES, deadline=None)
@given(recipe=mutations())
def test_mutated_scan_decodes_or_raises_scan_error(recipe):
    name, edits = recipe
    data = apply(name, edits)
    try:
        image = decode_guarded(data)
    except ScanError as exc:
        assert str(exc).startswith(REASONS), f"{name}: unclear reason {exc!r}"
        return
    assert isinstance(image, np.ndarray) and image.dtype == np.float32, name
    assert image.ndim == 2 and image.size > 0, name
    assert np.isfinite(image).all(), name
    assert image.min() >= 0.0 and image.max() <= 1.0, name

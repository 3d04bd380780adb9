"""Turn a scan's bytes into one grayscale float image, whatever its format and mode."""
from __future__ import annotations

import io

import numpy as np
from PIL import BmpImagePlugin, Image, ImageOps, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

from vision.errors import ScanError

# 8000 x 8000 is far beyond any MRI slice; larger declarations are refused before decoding.
MAX_PIXELS = 64_000_000
# Each progressive JPEG scan re-walks the whole image, so a small file repeating a scan
# thousands of times holds a worker for minutes; encoders write a dozen scans at most.
MAX_JPEG_SCANS = 64

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
# A DICOM file (PS3.10) opens with a 128-byte preamble of anything, then "DICM".
DICOM_MAGIC_AT = 128
HEAD_BYTES = DICOM_MAGIC_AT + 4  # what sniff needs to see of a file

# The format is already known from the magic, so its plugin is used directly rather than
# Image.open: a broken file then fails with the plugin's own reason (not "cannot identify
# image file <_io.BytesIO ...>"), and our size limit runs before Pillow's, so every bomb is
# refused with the same message and limit.
_PLUGINS = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
}


def sniff(head: bytes) -> str | None:
    """The image format named by a file's first HEAD_BYTES bytes, or None when it is not a scan."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[DICOM_MAGIC_AT:HEAD_BYTES] == b"DICM":
        return "DICOM"
    return None


def decode(data: bytes, frame: int | None = None) -> np.ndarray:
    """Decode scan bytes to a 2-D float32 array in [0, 1]; raise ScanError with the reason.

    frame picks one frame (1-based) of a multi-frame DICOM object; other formats have none.
    """
    return decode_sized(data, frame=frame)[0]


def decode_sized(data: bytes, reduce_to: int | None = None,
                 frame: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode like `decode`, letting a JPEG decode at 1/2, 1/4 or 1/8 scale while both sides stay
    >= reduce_to; returns the array and the (width, height) of the full-size scan."""
    if not data:
        raise ScanError("empty file (0 bytes)")
    kind = sniff(data[:HEAD_BYTES])
    if kind is None:
        raise ScanError("not an image: content is not JPEG, PNG, BMP, TIFF or DICOM")
    if kind == "DICOM":
        from vision.dicom import decode_dicom  # pydicom is imported only when a DICOM file comes

        gray = decode_dicom(data, frame, MAX_PIXELS)
        return gray, (gray.shape[1], gray.shape[0])
    if frame is not None:
        raise ScanError(f"frame {frame} asked of a {kind} file: only DICOM objects have frames")
    # 0xFF in entropy-coded data is stuffed as FF 00, so FF DA is a start-of-scan marker; the
    # few that metadata (EXIF thumbnail, ICC profile) may add keep a real file far below the limit.
    if kind == "JPEG" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        raise ScanError(f"decompression bomb: JPEG has {scans} scans (limit {MAX_JPEG_SCANS})")
    try:
        image = _PLUGINS[kind](io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_PIXELS:  # only the header has been read: nothing is allocated yet
            raise ScanError(f"decompression bomb: declares {width}x{height} pixels (limit {MAX_PIXELS})")
        if reduce_to and kind == "JPEG":
            # DCT scaling skips most of the decoding work; the model needs far fewer pixels.
            image.draft(None, (reduce_to, reduce_to))
        # Truncated data raises here because ImageFile.LOAD_TRUNCATED_IMAGES is left False.
        image.load()
        loaded = image.size
        image = ImageOps.exif_transpose(image)
        swapped = image.size != loaded
        return to_gray(image), ((height, width) if swapped else (width, height))
    except ScanError:
        raise
    except Image.DecompressionBombError as exc:
        raise ScanError(f"decompression bomb: {exc}") from exc
    except MemoryError:
        raise  # the machine's problem, not the scan's
    except Exception as exc:
        # Pillow's parsers fail on malformed input with an open-ended set of types (OSError,
        # SyntaxError, struct.error, IndexError, KeyError, ZeroDivisionError, ...); every one
        # of them means the same thing here: these bytes are not a readable image.
        raise ScanError(f"corrupt {kind}: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    """An exception as a reason: Pillow's OSError/SyntaxError/ValueError messages are written for
    people; other types (KeyError('x'), struct.error) need their name to make sense."""
    if isinstance(exc, (OSError, SyntaxError, ValueError)) and str(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def to_gray(image: Image.Image) -> np.ndarray:
    """Grayscale float32 in [0, 1] for any Pillow mode: L, LA, P, RGB(A), CMYK, I;16(B), I, F, 1, ..."""
    mode = image.mode
    if mode.startswith("I;16"):  # I;16, I;16B, ...: np.asarray honours the byte order
        return np.asarray(image).astype(np.float32) / 65535.0
    if mode in ("I", "F"):
        arr = np.asarray(image).astype(np.float32)
        arr[~np.isfinite(arr)] = 0.0  # a float TIFF may hold NaN or inf
        top = float(arr.max()) if arr.size else 0.0
        # These modes carry no declared range: a float TIFF is often already in [0, 1], an
        # 8- or 16-bit scan saved as 32-bit stays below 256 or 65536; anything else is
        # scaled by its own maximum.
        if mode == "F" and top <= 1.0:
            scale = 1.0
        elif top <= 255:
            scale = 255.0
        elif top <= 65535:
            scale = 65535.0
        else:
            scale = top
        return np.clip(arr / scale, 0.0, 1.0)
    if mode == "La":  # premultiplied alpha (TIFF); Pillow converts it only to LA
        image = image.convert("LA")
    # Alpha is discarded rather than composited: an MRI slice's alpha says nothing about tissue.
    if image.mode in ("1", "LA"):
        image = image.convert("L")
    elif image.mode != "L":
        image = image.convert("RGB").convert("L")  # P, PA, RGBA, CMYK, YCbCr, LAB go via RGB
    return np.asarray(image, dtype=np.float32) / 255.0

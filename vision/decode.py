"""Turn a scan's bytes into one grayscale float image, whatever its format and mode."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vision.errors import ScanError

# 8000 x 8000 is far beyond any MRI slice; larger declarations are refused before decoding.
MAX_PIXELS = 64_000_000
FORMATS = ("JPEG", "PNG", "BMP", "TIFF")

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff(head: bytes) -> str | None:
    """The image format named by a file's first bytes, or None when it is not a scan."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def decode(data: bytes) -> np.ndarray:
    """Decode scan bytes to a 2-D float32 array in [0, 1]; raise ScanError with the reason."""
    if not data:
        raise ScanError("empty file (0 bytes)")
    kind = sniff(data[:16])
    if kind is None:
        raise ScanError("not an image: content is not JPEG, PNG, BMP or TIFF")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ScanError(f"decompression bomb: declares {width}x{height} pixels (limit {MAX_PIXELS})")
            image.load()
            image = ImageOps.exif_transpose(image)
    except ScanError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ScanError(f"decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ScanError(f"corrupt {kind}: {exc}") from exc
    return to_gray(image)


def to_gray(image: Image.Image) -> np.ndarray:
    """Grayscale float32 in [0, 1] for any Pillow mode: L, LA, P, RGB(A), CMYK, I;16, I, F."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        # 32-bit TIFFs carry any range; a 16-bit scan saved as I stays below 65536.
        scale = 65535.0 if top > 255 else 255.0
        return np.clip(arr / scale, 0.0, 1.0)
    if mode not in ("L", "RGB"):
        # Alpha is discarded rather than composited: an MRI slice's alpha says nothing about tissue.
        image = image.convert("RGB") if mode not in ("LA", "1") else image.convert("L")
    if image.mode == "RGB":
        image = image.convert("L")
    return np.asarray(image, dtype=np.float32) / 255.0

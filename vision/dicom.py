"""DICOM objects as the pipeline's one grayscale float image, with pydicom 3.

The display mapping follows the order of the standard (PS3.4 N.2): the modality LUT (rescale
slope and intercept) turns stored values into real-world values, the VOI window picks the range a
reader looks at, MONOCHROME1 is inverted. Training and inference both reach this module only
through vision.decode.decode_sized, so a 12- or 16-bit scan is scaled to [0, 1] one way only.

Compressed pixel data decodes with permissively licensed handlers only: pydicom's own (RLE
Lossless, deflate; MIT), Pillow (JPEG baseline and extended, JPEG 2000; MIT-CMU), GDCM (JPEG
Lossless, JPEG-LS; BSD) and pylibjpeg-openjpeg (HTJ2K; MIT, OpenJPEG BSD-2). pylibjpeg-libjpeg
wraps GPL-3 libjpeg and must not be added. Each syntax is decoded by the first of PLUGINS that can,
so adding GDCM did not change how the JPEG baseline or JPEG 2000 scans already served decode.
A transfer syntax without a handler fails with a reason naming it.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from vision.errors import ScanError

# Preference order of pydicom's decoding plugins: Pillow first (what served scans always used), GDCM
# last, only for the syntaxes nothing else here decodes.
PLUGINS = ("pydicom", "pillow", "pylibjpeg", "gdcm")
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Used when the file carries no window: the robust range of the frame's own values.
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
# A header declaring more frames is not believed: each frame becomes a scan and a database row.
MAX_FRAMES = 10_000
META_COLUMNS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "modality", "series_description")
_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", "SeriesDescription")


@dataclass(frozen=True)
class DicomInfo:
    """What listing needs from a DICOM file: its frame count and the attributes stored per scan."""

    frames: int  # 0 for an object without pixel data: structured report, presentation state, DICOMDIR, ...
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    modality: str | None = None
    series_description: str | None = None

    def columns(self) -> dict:
        """The identifying attributes as scans-table columns."""
        return {name: getattr(self, name) for name in META_COLUMNS}


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, (OSError, ValueError)) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _text(value) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def describe(fileobj) -> DicomInfo:
    """Frame count and identifying attributes of a DICOM file, pixels not decoded; ScanError if unreadable."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # as in decode_dicom: values are converted (and warned about) lazily
            # Large values (the pixel data) are skipped over, not loaded: listing reads every file.
            ds = pydicom.dcmread(fileobj, defer_size="256 KB")
            has_pixels = any(tag in ds for tag in PIXEL_TAGS)
            values = [_text(ds.get(keyword)) for keyword in _KEYWORDS]
            # Rows without pixel data is an image cut short (the Image Pixel module precedes the pixels):
            # a scan that fails with that reason, not a non-image object to skip.
            frames = max(1, _int(ds.get("NumberOfFrames"), 1)) if has_pixels or "Rows" in ds else 0
    except MemoryError:
        raise
    except Exception as exc:
        raise ScanError(f"corrupt DICOM: {_reason(exc)}") from exc
    return DicomInfo(frames, *values)


def decode_dicom(data: bytes, frame: int | None = None, max_pixels: int = 64_000_000) -> np.ndarray:
    """Frame `frame` (1-based; None: the first) of a DICOM file as 2-D float32 in [0, 1]; ScanError why not."""
    try:
        with warnings.catch_warnings():
            # pydicom warns about every non-conforming value; what matters reaches us as an exception.
            warnings.simplefilter("ignore")
            gray = _decode(data, frame, max_pixels)
    except (ScanError, MemoryError):
        raise
    except Exception as exc:
        # pydicom converts values lazily, so a malformed element can fail at any access, with any
        # type (ValueError, struct.error, KeyError, ...): each means these bytes are a broken object.
        raise ScanError(f"corrupt DICOM: {_reason(exc)}") from exc
    if gray.ndim != 2 or gray.size == 0:
        raise ScanError(f"DICOM frame has shape {gray.shape}, not one 2-D image")
    return gray.astype(np.float32)


def _decode(data: bytes, frame: int | None, max_pixels: int) -> np.ndarray:
    import pydicom
    from pydicom.pixels import pixel_array

    ds = pydicom.dcmread(io.BytesIO(data))
    if not any(tag in ds for tag in PIXEL_TAGS):
        cut = "; it declares an image: truncated?" if "Rows" in ds else ""
        raise ScanError(f"DICOM object without pixel data ({_text(ds.get('Modality')) or 'no modality'}){cut}")
    rows, cols = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
    if rows * cols > max_pixels:  # nothing decoded yet
        raise ScanError(f"decompression bomb: declares {cols}x{rows} pixels (limit {max_pixels})")
    frames = max(1, _int(ds.get("NumberOfFrames"), 1))
    if frames > MAX_FRAMES:
        raise ScanError(f"DICOM object declares {frames} frames (limit {MAX_FRAMES})")
    index = (frame or 1) - 1
    if not 0 <= index < frames:
        raise ScanError(f"DICOM frame {frame} does not exist: the object has {frames} frame(s)")
    plugin = _plugin(ds)
    # index= decodes that one frame only, not the whole multi-frame object.
    arr = pixel_array(ds, index=index if frames > 1 else None, decoding_plugin=plugin)
    return _to_gray(arr, ds, index)


def _plugin(ds) -> str:
    """The decoding plugin for the object's transfer syntax ('' when uncompressed); ScanError if none is installed."""
    from pydicom.pixels import get_decoder

    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        return ""  # no file meta: pydicom read it as uncompressed little endian
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise ScanError(f"DICOM transfer syntax {uid.name} ({uid}) is not supported") from None
    if not decoder.is_encapsulated:
        return ""
    available = [name for name in PLUGINS if name in decoder.available_plugins]
    if not available:
        raise ScanError(f"DICOM transfer syntax {uid.name} ({uid}) cannot be decoded: "
                        "no permissively licensed handler for it is installed")
    return available[0]


def _group_value(ds, index: int, sequence: str, keyword: str):
    """keyword from the frame's functional group, else the shared group, else the top level.

    Enhanced multi-frame objects (enhanced MR/CT) keep rescale and window per frame in these
    groups instead of at the top level.
    """
    for groups, item in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        try:
            value = ds.get(groups)[item].get(sequence)[0].get(keyword)
        except (TypeError, IndexError, AttributeError, KeyError):
            value = None
        if value is not None:
            return value
    return ds.get(keyword)


def _first_float(value) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):  # multi-valued: the first is the default
        value = value[0] if len(value) else None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _to_gray(arr: np.ndarray, ds, index: int) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits = _int(ds.get("BitsStored"), 8)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        bits = 8 if arr.dtype == np.uint8 else 16
    if arr.ndim == 3:
        # Colour (pixel_array already turned YBR into RGB): luma with the weights Pillow's RGB -> L uses.
        luma = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.clip(luma / (2**bits - 1), 0.0, 1.0)
    return _monochrome(arr, ds, index, bits, invert=photometric == "MONOCHROME1")


def _monochrome(arr: np.ndarray, ds, index: int, bits: int, invert: bool) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    slope = _first_float(_group_value(ds, index, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first_float(_group_value(ds, index, "PixelValueTransformationSequence", "RescaleIntercept"))
    identity = "ModalityLUTSequence" not in ds and slope in (None, 1.0) and intercept in (None, 0.0)
    values = apply_modality_lut(arr, ds)  # the top-level modality LUT or rescale; arr itself if neither
    if values is arr and not identity:  # an enhanced object's rescale, from its functional groups
        values = arr * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
    window = _window(ds, index)
    if window is not None:
        out = _apply_window(np.asarray(values, dtype=np.float64), *window)
    elif identity and bits <= 8 and _int(ds.get("PixelRepresentation"), 0) == 0 and arr.dtype.kind in "ub":
        # 8-bit data is already display-scaled: mapped like an 8-bit PNG or JPEG (x / 255), so the
        # same pixels give the same array whatever the format; stretching it would not.
        out = arr.astype(np.float32) / np.float32(2**bits - 1)
    else:
        out = _percentile_window(np.asarray(values, dtype=np.float64))
    return 1.0 - out if invert else out


def _window(ds, index: int) -> tuple[float, float, str] | None:
    """(centre, width, function) of the first VOI window the frame declares, or None if none is usable."""
    centre = _first_float(_group_value(ds, index, "FrameVOILUTSequence", "WindowCenter"))
    width = _first_float(_group_value(ds, index, "FrameVOILUTSequence", "WindowWidth"))
    function = str(_group_value(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").strip().upper()
    if centre is None or width is None:
        return None
    # The standard requires width >= 1 for LINEAR and > 0 otherwise; a broken window is ignored.
    if width < (1.0 if function == "LINEAR" else 0.0) or width == 0:
        return None
    return centre, width, function


def _apply_window(x: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """The VOI LUT functions of PS3.3 C.11.2.1.2, to [0, 1] instead of the display's output range."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - centre) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - centre) / width + 0.5, 0.0, 1.0)
    if width == 1.0:
        return (x > centre - 0.5).astype(np.float64)
    return np.clip((x - (centre - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _percentile_window(x: np.ndarray) -> np.ndarray:
    x = np.where(np.isfinite(x), x, 0.0)  # float pixel data may hold NaN or inf
    low, high = np.percentile(x, [LOW_PERCENTILE, HIGH_PERCENTILE]) if x.size else (0.0, 0.0)
    if high <= low:
        return np.zeros_like(x)  # a constant frame carries nothing to window
    return np.clip((x - low) / (high - low), 0.0, 1.0)

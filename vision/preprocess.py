"""The one preprocessing step of training and inference: crop to the head, square, resize, normalise.

Cropping to the head's bounding box and normalising by the head's own intensity
percentile remove the two cues that tell the dataset's sources apart (black borders
of different widths, different brightness), so the model has to look at tissue.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from vision.decode import decode_sized

# Chosen on the validation split; recorded in every model card.
DEFAULTS = {
    "size": 160,
    "head_threshold": 0.08,  # fraction of the 99th percentile above which a pixel is head
    "min_line_fraction": 0.02,  # a row/column belongs to the head if this share of it is head
    "margin": 0.04,  # the square crop grows by this fraction of its side
    "norm_percentile": 99.5,
    # "equalise": True (train --equalise) replaces the percentile scale with equalise_head; absent means off.
    # JPEGs decode at reduced scale while both sides stay >= draft_factor x size: 4x less decoding
    # for a 512 px scan, and the head crop still has ~1.4 source pixels per model pixel.
    "draft_factor": 1.5,
}


@dataclass(frozen=True)
class Prepared:
    """A scan ready for the model, and where its square crop sits on the scan's own pixel grid."""

    array: np.ndarray  # (size, size, 1) float32 in [0, 1]
    box: tuple[int, int, int, int]  # left, top, right, bottom in scan pixels; may extend past the edges
    width: int
    height: int

    def geometry(self) -> dict:
        """Box and size as plain JSON for storage beside a result."""
        return {"box": list(self.box), "width": self.width, "height": self.height}


def head_box(gray: np.ndarray, params: dict = DEFAULTS) -> tuple[int, int, int, int]:
    """Bounding box (left, top, right, bottom) of the head; the whole image if none is found."""
    h, w = gray.shape
    top = float(np.percentile(gray, 99)) if gray.size else 0.0
    if top <= 0:
        return 0, 0, w, h
    mask = gray > params["head_threshold"] * top
    rows = np.flatnonzero(mask.sum(axis=1) > params["min_line_fraction"] * w)
    cols = np.flatnonzero(mask.sum(axis=0) > params["min_line_fraction"] * h)
    if rows.size == 0 or cols.size == 0:
        return 0, 0, w, h
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def square_box(box: tuple[int, int, int, int], margin: float) -> tuple[int, int, int, int]:
    """The square around a box's centre whose side is the box's longer side plus a margin."""
    left, top, right, bottom = box
    side = max(right - left, bottom - top)
    side = max(1, int(round(side * (1 + margin))))
    cx, cy = (left + right) / 2, (top + bottom) / 2
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    return x0, y0, x0 + side, y0 + side


def prepare_gray(gray: np.ndarray, params: dict = DEFAULTS) -> Prepared:
    """Preprocess a decoded grayscale scan."""
    h, w = gray.shape
    box = square_box(head_box(gray, params), params["margin"])
    size = params["size"]
    # Pillow's crop pads with zeros outside the image, which is what squaring needs.
    crop = Image.fromarray(gray.astype(np.float32), mode="F").crop(box)
    arr = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    head = arr > params["head_threshold"] * max(float(arr.max()), 1e-6)
    if params.get("equalise"):
        arr = equalise_head(arr, head)
    else:
        scale = float(np.percentile(arr[head], params["norm_percentile"])) if head.any() else 1.0
        arr = np.clip(arr / max(scale, 1e-6), 0.0, 1.0)
    return Prepared(arr[..., None].astype(np.float32), box, w, h)


def equalise_head(arr: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Each head pixel replaced by the share of head pixels at or below it; the background becomes 0.

    A rank transform gives every scan the same intensity histogram over its head, whatever the scanner,
    sequence or JPEG export made of it: CT, T1 and T2 keep their anatomy but lose their brightness profile.
    """
    values = arr[head]
    out = np.zeros_like(arr, dtype=np.float32)
    if values.size:
        out[head] = np.searchsorted(np.sort(values), values, side="right") / values.size
    return out


def prepare_bytes(data: bytes, params: dict = DEFAULTS, frame: int | None = None) -> Prepared:
    """Decode and preprocess scan bytes (one frame of a multi-frame DICOM object when frame is
    given, 1-based); raises ScanError for anything unreadable.

    The crop box is reported on the full-size scan's pixel grid even when a JPEG was decoded
    at reduced scale, so heatmaps always land on the original pixels.
    """
    factor = params.get("draft_factor")  # absent in cards of models trained before it existed
    gray, (width, height) = decode_sized(data, int(factor * params["size"]) if factor else None, frame=frame)
    prepared = prepare_gray(gray, params)
    h, w = gray.shape
    if (w, h) == (width, height):
        return prepared
    sx, sy = width / w, height / h
    left, top, right, bottom = prepared.box
    box = (round(left * sx), round(top * sy), round(right * sx), round(bottom * sy))
    return Prepared(prepared.array, box, width, height)


def cam_to_scan(cam: np.ndarray, box, width: int, height: int) -> np.ndarray:
    """Bring a heatmap over the square crop back onto the scan's own width x height grid."""
    left, top, right, bottom = (int(v) for v in box)
    # Not always exactly square: a box scaled up from a reduced-scale decode may differ by a pixel.
    up = np.asarray(
        Image.fromarray(cam.astype(np.float32), mode="F").resize((right - left, bottom - top),
                                                                  Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    out = np.zeros((height, width), dtype=np.float32)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(right, width), min(bottom, height)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = up[y0 - top : y1 - top, x0 - left : x1 - left]
    return out

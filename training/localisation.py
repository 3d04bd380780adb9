"""Where a heatmap's peak falls relative to the head: a label-free check of Grad-CAM on any scan.

Without expert tumour boxes the one thing known for sure is that a tumour lies inside the
brain: a peak outside the head or on its rim (skull, scalp, the border of the crop) is wrong.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from vision.preprocess import DEFAULTS


def head_mask(gray: np.ndarray, params: dict = DEFAULTS) -> np.ndarray:
    """The head as the largest bright component with its holes filled (same threshold as the crop)."""
    top = float(np.percentile(gray, 99)) if gray.size else 0.0
    mask = gray > params["head_threshold"] * top if top > 0 else np.zeros(gray.shape, bool)
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    largest = 1 + int(np.argmax(ndimage.sum_labels(mask, labels, range(1, n + 1))))
    return ndimage.binary_fill_holes(labels == largest)


def peak_depth(cam: np.ndarray, mask: np.ndarray) -> float:
    """Distance of the heatmap's peak from the head's edge, as a fraction of the head's longer side;
    0 when the peak is outside the head."""
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    if not mask[y, x]:
        return 0.0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    side = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    return float(ndimage.distance_transform_edt(mask)[y, x] / side)

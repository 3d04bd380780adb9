"""Near-copies across the split: validation scans that a training scan matches at thumbnail size.

The split removes byte-identical copies only. Re-encoded copies and a patient's neighbouring slices (the data
has no patient ids) fall on both sides, and a model is right on them more often than on a new patient's scans:
255 of the 829 validation scans of the shipped split have a training scan at r >= 0.95 and none of the shipped
network's 9 errors falls on them (`bench/near_copies.py`). So every card also gives the validation metrics
without them.
"""
from __future__ import annotations

import numpy as np

NEAR_COPY = 0.95  # thumbnail correlation from which a validation scan counts as a near-copy of a training scan
# px: coarse enough that a downsized, re-encoded copy keeps its thumbnail (r 0.98 at half size, JPEG quality 50).
# Not shift-proof (a 2 px shift of 160 gives r 0.90), but the head crop aligns a copy with its original.
THUMBNAIL = 40


def thumbnails(x: np.ndarray, side: int = THUMBNAIL) -> np.ndarray:
    """Each (n, s, s, 1) array averaged by the whole factor that brings it nearest `side` px, centred and scaled
    to unit length, one row per scan."""
    k = max(1, x.shape[1] // side)
    n, m = len(x), x.shape[1] // k
    t = x[:, : m * k, : m * k, 0].astype(np.float32).reshape(n, m, k, m, k).mean(axis=(2, 4)).reshape(n, -1)
    t -= t.mean(axis=1, keepdims=True)
    return t / (np.linalg.norm(t, axis=1, keepdims=True) + 1e-6)


def nearest_correlation(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each scan of x, its thumbnail's highest correlation with any scan of reference (-1 if none)."""
    if len(reference) == 0:
        return np.full(len(x), -1.0, dtype=np.float32)
    return (thumbnails(x) @ thumbnails(reference).T).max(axis=1)

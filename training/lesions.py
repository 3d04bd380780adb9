"""Tumour-free contrast-enhanced slices made from tumour slices: a lesion erased where the model's own map puts it.

Every figshare slice (512 x 512) is a contrast-enhanced T1 of a glioma, meningioma or pituitary tumour, and
the `notumor` class has none, so the enhanced sinus and vessels alone say "tumour": with the lesion of a
figshare meningioma or pituitary scan erased, the shipped network of 2026-12-07 still called 15 of 20 a tumour,
and a glioma with its lesion erased still a glioma (`bench/lesion_erase.py --test`). Those scans with the lesion
erased, labelled `notumor`, take that cue away, so a tumour class has to rest on the lesion. As many training
scans of every class get a region of the same shape erased elsewhere, labels kept, so that an erased region
is no cue by itself.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from training.data import stored_size

FIGSHARE_SIDE = 512  # the contrast-enhanced source's slices, the only ones of that size here
ERASED_CLASSES = ("meningioma", "pituitary")  # whose maps find their lesions (0.95 and 1.0 on the by-eye boxes)
HEAD_LEVEL = 0.04  # as training.data.head_mask
FILL_SIGMA = 6.0  # px at 160: the refill is the surrounding tissue's mean at about this scale
EDGE = 4.0  # px at 160 over which a refill blends into the scan around it
MAP_LEVEL = 0.35  # of the map's peak: the cells connected to the peak above it count as lesion
SURE = 0.8  # only scans the model classifies right with at least this probability


def head_of(a: np.ndarray) -> np.ndarray:
    """The head of a prepared 2-D array: above HEAD_LEVEL, closed and with its holes filled."""
    return ndimage.binary_fill_holes(ndimage.binary_closing(a > HEAD_LEVEL, iterations=4))


def refill(a: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """a with the part of `region` on the head replaced by the surrounding tissue's local mean plus borrowed
    texture; the rest of a unchanged.

    The mean is a normalised convolution of the head's pixels outside the region; the texture is the fine
    detail (image less its blur) of the same scan at a random offset, so the refill is not conspicuously smooth.
    """
    head = head_of(a)
    region = region & head
    if not region.any():
        return a.astype(np.float32)
    keep = (head & ~region).astype(np.float32)
    mean = ndimage.gaussian_filter(a * keep, FILL_SIGMA) / np.maximum(ndimage.gaussian_filter(keep, FILL_SIGMA), 1e-3)
    detail = a - ndimage.gaussian_filter(a, 2.0)
    dy, dx = rng.integers(-40, 41, size=2)
    texture = np.roll(detail, (int(dy), int(dx)), axis=(0, 1))
    # A soft edge, a linear ramp over EDGE px outside the region and within the head: a hard edge would be a cue.
    soft = np.clip(1.0 - ndimage.distance_transform_edt(~region) / EDGE, 0.0, 1.0) * head
    return (a * (1.0 - soft) + np.clip(mean + texture, 0.0, 1.0) * soft).astype(np.float32)


def lesion_region(cam: np.ndarray, size: int) -> np.ndarray:
    """The map's cells at or above MAP_LEVEL of its peak that connect to the peak, grown by one cell, at size px."""
    labels, _ = ndimage.label(cam >= MAP_LEVEL * cam.max(), structure=np.ones((3, 3)))
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    cells = ndimage.binary_dilation(labels == labels[peak], structure=np.ones((3, 3)))
    scale = size // cam.shape[0]
    return np.kron(cells, np.ones((scale, scale), bool))


def moved(region: np.ndarray, head: np.ndarray, rng: np.random.Generator, tries: int = 20) -> np.ndarray:
    """The region shifted to a random place where at least 80% of it lies on the head (else where it was)."""
    area = region.sum()
    for _ in range(tries):
        dy, dx = rng.integers(-60, 61, size=2)
        out = np.roll(region, (int(dy), int(dx)), axis=(0, 1))
        if (out & head).sum() >= 0.8 * area:
            return out
    return region


def figshare_rows(examples: list, labels: np.ndarray, classes: list) -> list[int]:
    """Indices of the ERASED_CLASSES scans of the figshare slices' size (in a folder or an archive)."""
    wanted = {classes.index(c) for c in ERASED_CLASSES}
    return [i for i, (ex, y) in enumerate(zip(examples, labels))
            if y in wanted and stored_size(ex) == (FIGSHARE_SIDE, FIGSHARE_SIDE)]


def erased_scans(x: np.ndarray, y: np.ndarray, examples: list, explainer, classes: list, count: int,
                 seed: int, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray, dict]:
    """(arrays, labels, counts): up to `count` figshare meningioma and pituitary scans of x with the lesion erased
    where explainer's map puts it, labelled notumor, then as many scans of x with a region of the same shape
    erased elsewhere, labels kept.

    Only scans the explainer classifies right with probability >= SURE are erased: where it is unsure its map
    may not be on the lesion, and a lesion left in place would be a tumour labelled notumor.
    """
    rng = np.random.default_rng(seed)
    size = x.shape[1]
    pool = figshare_rows(examples, y, classes)
    batches = [explainer(x[pool[i:i + batch_size]]) for i in range(0, len(pool), batch_size)]
    probs = np.concatenate([p for p, _ in batches]) if batches else np.zeros((0, len(classes)))
    cams = np.concatenate([c for _, c in batches]) if batches else None
    sure = [k for k, i in enumerate(pool) if probs[k].argmax() == y[i] and probs[k].max() >= SURE]
    chosen = rng.permutation(sure)[:count]
    regions = [lesion_region(cams[k], size) for k in chosen]
    erased = [refill(x[pool[k], ..., 0], region, rng) for k, region in zip(chosen, regions)]
    controls = rng.choice(len(x), size=len(chosen), replace=False)
    kept = []
    for j, region in zip(controls, regions):
        a = x[j, ..., 0]
        kept.append(refill(a, moved(region, head_of(a), rng), rng))
    made = erased + kept
    arrays = np.stack(made)[..., None].astype(np.float32) if made else np.zeros((0, *x.shape[1:]), np.float32)
    labels = np.concatenate([np.full(len(erased), classes.index("notumor")), y[controls]]).astype(y.dtype)
    counts = {"candidates": len(pool), "sure": len(sure), "lesion_erased": len(erased), "controls": len(kept),
              "mean_region_share": round(float(np.mean([r.mean() for r in regions])), 4) if regions else 0.0}
    return arrays, labels, counts

"""Rendering stored Grad-CAM maps on a scan's own pixel grid: grayscale heatmap and colour overlay."""
from __future__ import annotations

import numpy as np

from vision.preprocess import cam_to_scan

COLORMAP = "inferno"  # perceptual and readable in grayscale print


def to_stored(cam: np.ndarray) -> np.ndarray:
    """A Grad-CAM map in [0, 1] as the uint8 array a result stores."""
    return np.clip(np.round(cam * 255), 0, 255).astype(np.uint8)


def stored_cam(heatmap: bytes, height: int, width: int) -> np.ndarray:
    """A stored uint8 heatmap as floats in [0, 1] at the Grad-CAM layer's grid."""
    return np.frombuffer(heatmap, dtype=np.uint8).reshape(height, width).astype(np.float32) / 255.0


def scan_heatmap(heatmap: bytes, height: int, width: int, geometry: dict) -> np.ndarray:
    """The heatmap on the scan's own width x height grid, floats in [0, 1]."""
    return np.clip(cam_to_scan(stored_cam(heatmap, height, width), geometry["box"], geometry["width"],
                               geometry["height"]), 0.0, 1.0)


def gray_png(cam: np.ndarray) -> np.ndarray:
    """8-bit grayscale heatmap image."""
    return np.round(cam * 255).astype(np.uint8)


def overlay(scan_gray: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8: the colour-mapped heatmap blended over the grayscale scan, weighted by heat."""
    from matplotlib import colormaps  # only where an overlay is drawn: workers store maps, they never draw

    base = np.repeat(np.clip(scan_gray, 0, 1)[..., None], 3, axis=2)
    colour = colormaps[COLORMAP](cam)[..., :3]
    weight = alpha * cam[..., None]
    return np.round((base * (1 - weight) + colour * weight) * 255).astype(np.uint8)

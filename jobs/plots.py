"""The report's figures as PNG bytes: matplotlib's Agg canvas (no pyplot, no display) and Pillow thumbnails.

Every figure colours a class the same way (CLASS_COLOURS) and Grad-CAM maps use jobs.heatmaps.COLORMAP.
"""
from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_curve

from jobs.heatmaps import COLORMAP, overlay

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
CLASS_COLOURS = {
    "glioma": "#D55E00",
    "meningioma": "#0072B2",
    "notumor": "#009E73",
    "pituitary": "#CC79A7",
}
OTHER_COLOUR = "#777777"
THUMB_SIDE = 160
DPI = 100


def colour(cls: str) -> str:
    return CLASS_COLOURS.get(cls, OTHER_COLOUR)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _figure(width: float = 3.7, height: float = 3.3) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def confusion_png(matrix: list[list[int]], labels: list[str]) -> bytes:
    """Counts annotated on cells shaded by the share of their true class (row-normalised)."""
    m = np.asarray(matrix, dtype=np.float64).reshape(len(labels), len(labels))
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    fig = _figure(3.7, 3.3)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=11,
                    color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=9)
    ax.set_yticks(range(len(labels)), labels, fontsize=9)
    for tick in (*ax.get_xticklabels(), *ax.get_yticklabels()):
        tick.set_color(colour(tick.get_text()))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, shrink=0.8).set_label("share of true class", fontsize=9)
    return _png(fig)


def roc_png(y_true: list[str], probs: np.ndarray, classes: list[str], aucs: dict[str, float | None]) -> bytes:
    """One-vs-rest ROC curve of every class that has both positives and negatives among the labelled scans."""
    fig = _figure()
    ax = fig.add_subplot()
    truth = np.asarray(y_true)
    for i, cls in enumerate(classes):
        positive = truth == cls
        if positive.all() or not positive.any():
            ax.plot([], [], color=colour(cls), label=f"{cls} (AUC n/a)")
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, i])
        auc = aucs.get(cls)
        ax.plot(fpr, tpr, color=colour(cls), lw=2,
                label=f"{cls} (AUC {auc:.3f})" if auc is not None else f"{cls} (AUC n/a)")
    ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> dict:
    """Equal-width confidence bins with their mean confidence and accuracy, and the expected calibration error."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    which = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    bins, ece, n = [], 0.0, len(confidence)
    for b in range(n_bins):
        sel = which == b
        count = int(sel.sum())
        conf = float(confidence[sel].mean()) if count else None
        acc = float(correct[sel].mean()) if count else None
        if count:
            ece += count / n * abs(acc - conf)
        bins.append({"low": b / n_bins, "high": (b + 1) / n_bins, "count": count, "confidence": conf, "accuracy": acc})
    return {"bins": bins, "ece": ece if n else None}


def reliability_png(calibration: dict) -> bytes:
    """Accuracy against confidence per bin over the diagonal of perfect calibration, with bin counts below."""
    bins = calibration["bins"]
    width = bins[0]["high"] - bins[0]["low"]
    fig = _figure(3.7, 3.3)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    full = [b for b in bins if b["count"]]
    centres = [(b["low"] + b["high"]) / 2 for b in full]
    top.bar([b["low"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
            color="#4C72B0", edgecolor="white", label="accuracy")
    top.vlines(centres, [b["accuracy"] for b in full], [b["confidence"] for b in full], color="#C44E52", lw=2)
    top.plot(centres, [b["confidence"] for b in full], "D", color="#C44E52", ms=4, label="mean confidence")
    top.plot([0, 1], [0, 1], ls="--", color="#555555", lw=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"expected calibration error {calibration['ece']:.3f}", fontsize=10)
    top.legend(loc="upper left", fontsize=7)
    top.grid(alpha=0.3)
    bottom.bar([b["low"] for b in bins], [b["count"] for b in bins], width=width, align="edge", color="#888888",
               edgecolor="white")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (probability of predicted class)", fontsize=9)
    bottom.set_ylabel("scans")
    return _png(fig)


def prediction_counts_png(counts: dict[str, int]) -> bytes:
    """Bar per class: how many scans were predicted as it."""
    fig = _figure(3.7, 2.8)
    ax = fig.add_subplot()
    names = list(counts)
    bars = ax.bar(names, [counts[c] for c in names], color=[colour(c) for c in names])
    ax.bar_label(bars, padding=2, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("scans predicted")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def confidence_hist_png(confidence: np.ndarray, predicted: np.ndarray, classes: list[str]) -> bytes:
    """Histogram of the predicted class's probability, stacked by predicted class."""
    fig = _figure(3.7, 2.8)
    ax = fig.add_subplot()
    data = [confidence[predicted == i] for i in range(len(classes))]
    ax.hist(data, bins=20, range=(0, 1), stacked=True, color=[colour(c) for c in classes], label=classes)
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (probability of predicted class)", fontsize=9)
    ax.set_ylabel("scans")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _thumb(image: Image.Image, side: int) -> bytes:
    image = image.copy()
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _shrink(array: np.ndarray, side: int) -> np.ndarray:
    """A float [0, 1] image scaled so that its longer side is at most `side` pixels."""
    h, w = array.shape
    scale = min(1.0, side / max(h, w))
    if scale == 1.0:
        return array
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize(size, Image.Resampling.BOX))


def scan_panels(gray: np.ndarray | None, cam: np.ndarray, side: int = THUMB_SIDE) -> dict[str, bytes | None]:
    """Thumbnails of a scan (original, colour-mapped heatmap, overlay), all on the scan's own pixel grid.

    `cam` is the Grad-CAM map already on that grid (jobs.heatmaps.scan_heatmap); without the original
    only the heatmap is drawn.
    """
    small_cam = np.clip(_shrink(cam, side), 0.0, 1.0)
    heat = np.round(colormaps[COLORMAP](small_cam)[..., :3] * 255).astype(np.uint8)
    panels = {"original": None, "heatmap": _thumb(Image.fromarray(heat, mode="RGB"), side), "overlay": None}
    if gray is not None:
        small_gray = np.clip(_shrink(gray, side), 0.0, 1.0)
        panels["original"] = _thumb(Image.fromarray(np.round(small_gray * 255).astype(np.uint8), mode="L"), side)
        panels["overlay"] = _thumb(Image.fromarray(overlay(small_gray, small_cam), mode="RGB"), side)
    return panels

"""Grad-CAM sanity on the validation split: where each tumour scan's exported heatmap peak falls in the head.

Prints one JSON line: per class, the share of peaks outside the head, on its rim (closer to the
edge than --rim of the head's side) and inside, and the median depth. A label-free lower bound on
localisation (a tumour is inside the brain); the real check needs expert tumour boxes.

Usage: python bench/heatmaps.py [--model models/brainscan-v1.keras] [--data ../shared/data/brain-tumor-mri/Training]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from config import DEFAULT_MODEL  # noqa: E402

TUMOURS = ("glioma", "meningioma", "pituitary")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default="../shared/data/brain-tumor-mri/Training")
    parser.add_argument("--rim", type=float, default=0.05)
    parser.add_argument("--precision", default="auto", help="serving precision: auto, float32, mixed_bfloat16, int8")
    parser.add_argument("--gallery", help="write a PNG of the rim and outside cases here")
    args = parser.parse_args()

    from jobs import sources
    from jobs.heatmaps import overlay
    from training.data import labelled_examples
    from training.localisation import head_mask, peak_depth
    from vision.decode import decode_sized
    from vision.preprocess import cam_to_scan, prepare_bytes
    from vision.runtime import Runtime

    rt = Runtime(args.model, precision=args.precision)
    val = set(rt.model.card["validation_sha256"])
    examples = [e for e in labelled_examples(Path(args.data)) if e.sha256 in val and e.label in TUMOURS]
    depths: dict[str, list[float]] = {c: [] for c in TUMOURS}
    misses = []
    for start in range(0, len(examples), 64):
        chunk = examples[start:start + 64]
        raw = [sources.load(e.root, e.relpath)[0] for e in chunk]
        prepared = [prepare_bytes(d, rt.preprocessing) for d in raw]
        _, cams = rt.explain(np.stack([p.array for p in prepared]))
        for ex, data, prep, cam in zip(chunk, raw, prepared, cams):
            gray, _ = decode_sized(data, None)
            on_scan = cam_to_scan(cam, prep.box, prep.width, prep.height)
            depth = peak_depth(on_scan, head_mask(gray, rt.preprocessing))
            depths[ex.label].append(depth)
            if depth < args.rim:
                misses.append((ex, gray, on_scan, depth))
    out = {"model": Path(args.model).name, "model_sha256": rt.sha256[:12], "precision": rt.precision,
           "mirror": rt.mirror, "rim_fraction": args.rim}
    for c, d in depths.items():
        d = np.array(d)
        out[c] = {"scans": int(d.size), "outside": round(float((d == 0).mean()), 3),
                  "rim": round(float(((d > 0) & (d < args.rim)).mean()), 3),
                  "inside": round(float((d >= args.rim).mean()), 3), "median_depth": round(float(np.median(d)), 3)}
    alld = np.concatenate([np.array(v) for v in depths.values()])
    out["all_tumours"] = {"scans": int(alld.size), "inside": round(float((alld >= args.rim).mean()), 3)}
    print(json.dumps(out))
    if args.gallery and misses:
        _gallery(misses, args.gallery, overlay)


def _gallery(misses, path: str, overlay) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(misses), 24)
    cols = 6
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(2.2 * cols, 2.4 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (ex, gray, cam, depth) in zip(axes.flat, misses[:n]):
        ax.imshow(overlay(gray / max(float(gray.max()), 1e-6), cam))
        ax.set_title(f"{ex.label} {depth:.3f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()

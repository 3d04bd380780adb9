"""Does the exported heatmap's peak fall on the tumour? The pointing game on tumour boxes drawn by eye.

No expert tumour boxes ship with the data here. `bench/tumour-boxes.csv` holds boxes drawn by eye (not
by a radiologist) on a seeded sample of 512 x 512 validation tumour scans, the figshare slices' size, the
set the independent check uses: 20 per class, 58 with a box (two gliomas showed none to the eye), `clear`
0 where the lesion was uncertain. A hit is the peak of the heatmap as `export` writes it (uint8 at the
Grad-CAM grid, brought back onto the scan's own pixels) inside the box grown by 5% of the image side, as
in the independent check; the image centre is the baseline (0.55 on the expert boxes).

Usage:
  python bench/pointing.py [--model M] [--precision P]      # one JSON line: hit rates per class
  python bench/pointing.py --sheets var/pointing            # the sample as gridded sheets, to draw boxes on
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from config import DEFAULT_MODEL  # noqa: E402
from training.lesions import FIGSHARE_SIDE  # noqa: E402

TUMOURS = ("glioma", "meningioma", "pituitary")
BOXES = Path(__file__).with_name("tumour-boxes.csv")
MARGIN = 0.05  # of the image side, on every side of the box


def sample(examples, per_class: int, seed: int) -> list:
    """per_class scans of each tumour class, drawn with a seed from those of 512 x 512 pixels."""
    from PIL import Image

    rng = random.Random(seed)
    chosen = []
    for label in TUMOURS:
        pool = sorted((e for e in examples if e.label == label), key=lambda e: e.relpath)
        rng.shuffle(pool)
        picked = []
        for e in pool:
            with Image.open(e.path) as im:
                if im.size == (FIGSHARE_SIDE, FIGSHARE_SIDE):
                    picked.append(e)
            if len(picked) == per_class:
                break
        chosen += picked
    return chosen


def boxes() -> list[dict]:
    """The rows of bench/tumour-boxes.csv: path, label, x0, y0, x1, y1 (scan pixels), clear."""
    with open(BOXES, newline="") as fh:
        return list(csv.DictReader(fh))


def hit(row: dict, y: float, x: float, side: int) -> bool:
    """Whether (y, x) lies in the row's box grown by MARGIN of the image side."""
    grow = MARGIN * side
    return (float(row["x0"]) - grow <= x <= float(row["x1"]) + grow
            and float(row["y0"]) - grow <= y <= float(row["y1"]) + grow)


def exported_peaks(runtime, datas: list[bytes]) -> list[tuple[int, int, int]]:
    """(row, col, image side) of each scan's exported heatmap peak."""
    from jobs.heatmaps import scan_heatmap, to_stored
    from vision.preprocess import prepare_bytes

    prepared = [prepare_bytes(d, runtime.preprocessing) for d in datas]
    _, cams = runtime.explain(np.stack([p.array for p in prepared]))
    peaks = []
    for prep, cam in zip(prepared, cams):
        stored = to_stored(cam)
        on_scan = scan_heatmap(stored.tobytes(), *stored.shape, prep.geometry())
        y, x = np.unravel_index(int(np.argmax(on_scan)), on_scan.shape)
        peaks.append((int(y), int(x), max(prep.width, prep.height)))
    return peaks


def shares(rows: list[dict], hits: list[bool]) -> dict:
    """Hit rate per class, over all boxes and over the clear ones."""
    groups = {label: [h for r, h in zip(rows, hits) if r["label"] == label] for label in TUMOURS}
    groups["all"] = hits
    groups["clear"] = [h for r, h in zip(rows, hits) if r["clear"] == "1"]
    return {name: {"scans": len(g), "hits": round(sum(g) / len(g), 3)} for name, g in groups.items()}


def score(args) -> None:
    from vision.runtime import Runtime

    rows = boxes()
    rt = Runtime(args.model, precision=args.precision)
    peaks = exported_peaks(rt, [(Path(args.data) / r["path"]).read_bytes() for r in rows])
    print(json.dumps({"model": Path(args.model).name, "model_sha256": rt.sha256[:12], "precision": rt.precision,
                      "mirror": rt.mirror, "peak": shares(rows, [hit(r, y, x, side) for r, (y, x, side) in zip(rows, peaks)]),
                      "centre": shares(rows, [hit(r, side / 2, side / 2, side) for r, (_, _, side) in
                                              zip(rows, peaks)])}))


def sheets(args) -> None:
    """The sample, four scans a sheet on a 32 px grid, and its manifest: what the boxes were drawn on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.data import labelled_examples
    from vision.decode import decode_sized
    from vision.modelio import read_card

    out = Path(args.sheets)
    out.mkdir(parents=True, exist_ok=True)
    val = set(read_card(args.model)["validation_sha256"])
    examples = [e for e in labelled_examples(Path(args.data)) if e.sha256 in val and e.label in TUMOURS]
    chosen = sample(examples, args.per_class, args.seed)
    with open(out / "manifest.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("k", "path", "label"), *((k, e.relpath, e.label) for k, e in
                                                           enumerate(chosen, start=1))])
    for start in range(0, len(chosen), 4):
        fig, axes = plt.subplots(2, 2, figsize=(14, 14))
        for ax, (k, ex) in zip(axes.flat, enumerate(chosen[start:start + 4], start=start + 1)):
            gray, _ = decode_sized(ex.path.read_bytes(), None)
            ax.imshow(gray, cmap="gray", vmax=np.percentile(gray, 99.8))
            ax.set_xticks(range(0, FIGSHARE_SIDE + 1, 64))
            ax.set_yticks(range(0, FIGSHARE_SIDE + 1, 64))
            ax.set_xticks(range(0, FIGSHARE_SIDE + 1, 32), minor=True)
            ax.set_yticks(range(0, FIGSHARE_SIDE + 1, 32), minor=True)
            ax.grid(which="both", color="lime", alpha=0.25, linewidth=0.6)
            ax.set_title(f"#{k} {ex.label}", fontsize=14)
        fig.tight_layout()
        fig.savefig(out / f"grid-{start // 4 + 1:02d}.png", dpi=62)
        plt.close(fig)
    print(json.dumps({"scans": len(chosen), "out": str(out)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default="../shared/data/brain-tumor-mri/Training")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--sheets", help="write the sample's gridded sheets and manifest.csv to this folder")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sheets(args) if args.sheets else score(args)


if __name__ == "__main__":
    main()

"""Does the exported heatmap's peak fall on the tumour? Contact sheets for a by-eye check, and its tally.

No expert tumour boxes ship with the data here, so this draws a seeded sample of 512 x 512 validation
tumour scans (the figshare slices' size, the set the independent check uses), finds the peak of each
scan's heatmap as `export` writes it (uint8 at the Grad-CAM grid, brought back onto the scan's own
pixels), and writes contact sheets: each scan with the peak in cyan and the image centre in yellow,
each inside a circle of 5% of the image side (the margin the independent check grows its boxes by).
A person marks each marker `in` (the circle touches the tumour) or `out` in the verdicts CSV; run again
with --verdicts to print the shares. The centre's share calibrates the eye: on the expert boxes the
centre scores 0.55.

Usage:
  python bench/pointing.py --sheets var/pointing            # sheets + var/pointing/manifest.csv
  python bench/pointing.py --verdicts bench/pointing-verdicts.csv   # the tally, one JSON line
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

TUMOURS = ("glioma", "meningioma", "pituitary")
FIGSHARE_SIDE = 512
PER_SHEET = 12


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


def exported_peak(runtime, data: bytes):
    """The scan's grayscale pixels, the predicted class and the (row, col) peak of its exported heatmap."""
    from jobs.heatmaps import scan_heatmap
    from vision.decode import decode_sized
    from vision.preprocess import prepare_bytes

    prep = prepare_bytes(data, runtime.preprocessing)
    probs, cams = runtime.explain(prep.array[None])
    stored = np.clip(np.round(cams[0] * 255), 0, 255).astype(np.uint8)  # as classify() stores it
    on_scan = scan_heatmap(stored.tobytes(), *stored.shape, prep.geometry())
    gray, _ = decode_sized(data, None)
    peak = np.unravel_index(int(np.argmax(on_scan)), on_scan.shape)
    return gray, runtime.classes[int(np.argmax(probs[0]))], (int(peak[0]), int(peak[1]))


def write_sheets(rows: list[dict], grays: list, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    for start in range(0, len(rows), PER_SHEET):
        chunk = list(zip(rows[start:start + PER_SHEET], grays[start:start + PER_SHEET]))
        fig, axes = plt.subplots(3, 4, figsize=(16, 12.6), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (row, gray) in zip(axes.flat, chunk):
            side = max(gray.shape)
            ax.imshow(gray, cmap="gray")
            for (y, x), colour in (((row["peak_row"], row["peak_col"]), "cyan"),
                                   ((gray.shape[0] / 2, gray.shape[1] / 2), "yellow")):
                ax.add_patch(Circle((x, y), 0.05 * side, fill=False, color=colour, linewidth=1.5))
                ax.plot(x, y, "+", color=colour, markersize=8)
            ax.set_title(f"#{row['k']} {row['label']} (called {row['predicted']})", fontsize=11)
        fig.tight_layout()
        fig.savefig(out / f"sheet-{start // PER_SHEET + 1}.png", dpi=60)
        plt.close(fig)


def make_sheets(args) -> None:
    from jobs import sources
    from training.data import labelled_examples
    from vision.runtime import Runtime

    out = Path(args.sheets)
    out.mkdir(parents=True, exist_ok=True)
    rt = Runtime(args.model, precision=args.precision)
    val = set(rt.model.card["validation_sha256"])
    examples = [e for e in labelled_examples(Path(args.data)) if e.sha256 in val and e.label in TUMOURS]
    rows, grays = [], []
    for k, ex in enumerate(sample(examples, args.per_class, args.seed), start=1):
        gray, predicted, (y, x) = exported_peak(rt, sources.load(ex.root, ex.relpath)[0])
        rows.append({"k": k, "path": ex.relpath, "label": ex.label, "predicted": predicted,
                     "peak_row": y, "peak_col": x})
        grays.append(gray)
    with open(out / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_sheets(rows, grays, out)
    print(json.dumps({"model": Path(args.model).name, "model_sha256": rt.sha256[:12], "scans": len(rows),
                      "sheets": (len(rows) + PER_SHEET - 1) // PER_SHEET, "out": str(out)}))


def tally(verdicts: Path) -> dict:
    """Shares of `in` verdicts for the peak and the centre, per class and over all scans."""
    with open(verdicts, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for label in (*TUMOURS, "all"):
        group = [r for r in rows if label in ("all", r["label"])]
        out[label] = {"scans": len(group),
                      "peak_in": round(sum(r["peak"] == "in" for r in group) / len(group), 3),
                      "centre_in": round(sum(r["centre"] == "in" for r in group) / len(group), 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default="../shared/data/brain-tumor-mri/Training")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sheets", help="write contact sheets and manifest.csv to this folder")
    parser.add_argument("--verdicts", help="CSV of k,path,label,peak,centre with in/out verdicts: print the tally")
    args = parser.parse_args()
    if args.verdicts:
        print(json.dumps(tally(Path(args.verdicts))))
    else:
        make_sheets(args)


if __name__ == "__main__":
    main()

"""Does a tumour class rest on its lesion? Each by-eye box erased, and what the model says then.

Erases the box of each scan of `bench/tumour-boxes.csv` (grown by 5% of the crop's side, refilled from the
tissue around it as training.lesions.refill does) and prints how the model then classifies each class, with a
same-size box erased at the mirror place as a control. A class that rests on its lesion loses it when the box is
erased and keeps it under the control; `train --init M --erase-lesions N` trains with such scans.

Usage: python bench/lesion_erase.py [--model M]        # one JSON line per class and erasure
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from config import DEFAULT_MODEL  # noqa: E402


def box_region(row: dict, prep, size: int, grow: float = 0.05) -> np.ndarray:
    """A by-eye box of bench/tumour-boxes.csv, grown by `grow` of the crop's side, on the prepared array."""
    left, top, right, _ = prep.box
    s = size / (right - left)
    g = grow * size
    x0, x1 = (float(row["x0"]) - left) * s - g, (float(row["x1"]) - left) * s + g
    y0, y1 = (float(row["y0"]) - top) * s - g, (float(row["y1"]) - top) * s + g
    yy, xx = np.mgrid[0:size, 0:size]
    return (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)


def classify_erased(args) -> None:
    from bench.pointing import boxes
    from training.lesions import refill
    from vision.preprocess import prepare_bytes
    from vision.runtime import Runtime

    rows = boxes()
    rt = Runtime(args.model)
    size, rng = rt.preprocessing["size"], np.random.default_rng(0)
    preps = [prepare_bytes((Path(args.data) / r["path"]).read_bytes(), rt.preprocessing) for r in rows]
    arrays = {"none": [p.array for p in preps],
              "box": [refill(p.array[..., 0], box_region(r, p, size), rng)[..., None] for r, p in zip(rows, preps)],
              "mirrored box": [refill(p.array[..., 0], box_region(r, p, size)[:, ::-1], rng)[..., None]
                               for r, p in zip(rows, preps)]}
    for erased, batch in arrays.items():
        probs, _ = rt.explain(np.stack(batch))
        for label in ("glioma", "meningioma", "pituitary"):
            idx = [i for i, r in enumerate(rows) if r["label"] == label]
            said = [rt.classes[j] for j in probs[idx].argmax(axis=1)]
            print(json.dumps({"model": Path(args.model).name, "class": label, "erased": erased,
                              "classified_as": {c: said.count(c) for c in rt.classes},
                              "mean_p_true": round(float(probs[idx, rt.classes.index(label)].mean()), 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default="../shared/data/brain-tumor-mri/Training")
    classify_erased(parser.parse_args())


if __name__ == "__main__":
    main()

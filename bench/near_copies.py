"""How many validation scans have a near-copy in the training split, and how accurate is the model on the rest?

The split removes byte-identical copies only; re-encoded copies and a patient's neighbouring slices can fall on
both sides. Each scan's preprocessed array, averaged to 40 x 40 and centred, is correlated with every training
scan's; a validation scan's best correlation says how near its nearest training scan is. Prints one JSON line:
scans per band of that correlation, the nearest-thumbnail classifier's accuracy, and the model's (as served)
accuracy in each band.

Usage: python bench/near_copies.py [--model models/brainscan-v1.keras] [--data ../shared/data/brain-tumor-mri/Training]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from config import DEFAULT_MODEL  # noqa: E402

BANDS = ((0.99, 1.01), (0.95, 0.99), (0.9, 0.95), (0.8, 0.9), (-1.0, 0.8), (-1.0, 0.95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default="../shared/data/brain-tumor-mri/Training")
    args = parser.parse_args()

    from training.near_copies import thumbnails
    from training.train import TrainConfig, prepare, served_probabilities
    from vision.modelio import load_model

    model = load_model(Path(args.model))
    card = model.card
    data = prepare(TrainConfig(data_root=Path(args.data), out=Path(args.model), seed=card["seed"],
                               split_seed=card["split_seed"], val_fraction=card["config"]["val_fraction"]),
                   card["preprocessing"])
    if [e.sha256 for e in data.val_ex] != card["validation_sha256"]:
        sys.exit("this data and seed do not give the model's validation split")
    x_train, x_val, y_train, y_val, val_ex = data.x_train, data.x_val, data.y_train, data.y_val, data.val_ex
    similarity = thumbnails(x_val) @ thumbnails(x_train).T
    nearest, best = similarity.argmax(axis=1), similarity.max(axis=1)
    probs = served_probabilities(model.keras_model, x_val.astype(np.float32), bool(card.get("mirror")))
    right = probs.argmax(axis=1) == y_val
    bands = {}
    for low, high in BANDS:
        band = (best >= low) & (best < high)
        bands[f"[{max(low, 0)}, {min(high, 1)})"] = {"scans": int(band.sum()),
                                                       "model_accuracy": round(float(right[band].mean()), 4),
                                                       "errors": int((~right[band]).sum())}
    print(json.dumps({"model": Path(args.model).name, "validation_scans": len(val_ex),
                      "nearest_thumbnail_accuracy": round(float((y_train[nearest] == y_val).mean()), 4),
                      "median_best_correlation": {name: round(float(np.median(best[y_val == c])), 3)
                                                  for c, name in enumerate(card["classes"])},
                      "by_nearest_correlation": bands}))


if __name__ == "__main__":
    main()

"""`rescore`: score a trained model's validation split again as it will be served, as a model of its own."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from jobs.metrics import classification_metrics
from training import data as tdata
from training.merge import validation_examples
from vision.errors import ModelError


def rescore(model_path: Path, mirror: bool, out: Path | None = None, data_root: Path | None = None,
            cache_dir: Path = Path("var/cache"), command: str = "") -> dict:
    """Serve the model's validation scans with or without its mirror and write OUT.keras (default: the model's own
    path) with a card that says so: `mirror`, `validation`, the confusion plot and a `rescored` entry.

    The weights stay as trained, but the file is saved anew: results are keyed by the model file's SHA-256, and a
    model served another way must not share results (or an int8 file) with what it was."""
    from training.plots import plot_confusion
    from training.train import served_probabilities
    from vision.modelio import load_model, write_card

    model_path = Path(model_path)
    out_path = Path(out).with_suffix(".keras") if out else model_path
    loaded = load_model(model_path)
    card = loaded.card
    val_ex = validation_examples(card, data_root or Path(card["config"]["data_root"]))
    x_val = tdata.cached_arrays(val_ex, card["preprocessing"], cache_dir)
    probs = served_probabilities(loaded.keras_model, x_val, mirror)
    classes = card["classes"]
    validation = classification_metrics([e.label for e in val_ex], [classes[i] for i in probs.argmax(axis=1)],
                                        probs, classes)
    entry = {"command": command, "model": str(model_path), "sha256": card["sha256"], "mirror": mirror,
             "validation_accuracy_before": card["validation"]["accuracy"], "mirror_before": bool(card.get("mirror")),
             "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    loaded.keras_model.save(out_path)
    card = write_card(out_path, dict(card, name=out_path.stem, mirror=mirror, validation=validation,
                                     rescored=[*card.get("rescored", []), entry]))
    if card["sha256"] == entry["sha256"]:  # Keras stamps each save with its time; guard the identity anyway
        raise ModelError(f"{out_path}: saved with the same SHA-256 as {model_path}; run rescore again")
    plot_confusion(validation["confusion_matrix"]["matrix"], classes, out_path.parent / f"{out_path.stem}-confusion.png")
    curves = model_path.parent / f"{model_path.stem}-curves.png"
    if out_path != model_path and curves.is_file():
        shutil.copy(curves, out_path.parent / f"{out_path.stem}-curves.png")
    return card

"""`rescore`: score a trained model's validation split again as it will be served, and write that to its card."""
from __future__ import annotations

import time
from pathlib import Path

from jobs.metrics import classification_metrics
from training import data as tdata
from training.merge import validation_examples


def rescore(model_path: Path, mirror: bool, data_root: Path | None = None, cache_dir: Path = Path("var/cache"),
            command: str = "") -> dict:
    """Serve the model's validation scans with or without its mirror, and write the card's `mirror`, `validation`,
    confusion plot and a `rescored` entry (what changed, when, by which command). The weights stay as trained."""
    from training.plots import plot_confusion
    from training.train import served_probabilities
    from vision.modelio import load_model, write_card

    model_path = Path(model_path)
    loaded = load_model(model_path)
    card = loaded.card
    val_ex = validation_examples(card, data_root or Path(card["config"]["data_root"]))
    x_val = tdata.cached_arrays(val_ex, card["preprocessing"], cache_dir)
    probs = served_probabilities(loaded.keras_model, x_val, mirror)
    classes = card["classes"]
    validation = classification_metrics([e.label for e in val_ex], [classes[i] for i in probs.argmax(axis=1)],
                                        probs, classes)
    entry = {"command": command, "mirror": mirror, "validation_accuracy_before": card["validation"]["accuracy"],
             "mirror_before": bool(card.get("mirror")), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    card = write_card(model_path, dict(card, mirror=mirror, validation=validation,
                                       rescored=[*card.get("rescored", []), entry]))
    plot_confusion(validation["confusion_matrix"]["matrix"], classes,
                   model_path.parent / f"{model_path.stem}-confusion.png")
    return card

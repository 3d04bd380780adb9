"""Serve networks trained separately on the same split as one multi-tower model (their logits averaged)."""
from __future__ import annotations

import time
from pathlib import Path

from jobs.metrics import classification_metrics
from training import data as tdata
from vision.errors import ModelError

# Fields that must agree for the towers to read the same arrays and be judged on the same scans.
SHARED = ("classes", "input_size", "preprocessing", "train_sha256", "validation_sha256")


def stages_of(card: dict) -> tuple:
    """The (filters, convs[, dilations]) stages a card's network was built with (cards before --width used 24)."""
    from training.architecture import as_stages, stages_for

    config = card.get("config", {})
    return as_stages(config["stages"]) if config.get("stages") else stages_for(config.get("width", 24))


def tower_stages(card: dict) -> list:
    """The stages of each of a card's towers (a merged card lists them; a trained one has one kind)."""
    from training.architecture import as_stages

    if card.get("tower_stages"):
        return [as_stages(stages) for stages in card["tower_stages"]]
    return [stages_of(card)] * card.get("towers", 1)


def check_mergeable(cards: list[dict], names: list[str]) -> None:
    """Raise ModelError naming the first field on which the models disagree."""
    for key in SHARED:
        for card, name in zip(cards[1:], names[1:]):
            if card[key] != cards[0][key]:
                raise ModelError(f"{name} and {names[0]} differ in {key}: only models trained on the same split "
                                 "with the same preprocessing can be merged")


def card_towers(card: dict) -> list[dict]:
    """Each tower a card describes, as its seed, history rows and weights; a plain network's card describes one."""
    if card.get("towers", 1) == 1:
        return [{"seed": card["seed"], "history": card["history"], "weights": card.get("weights") or {}}]
    return [{"seed": weights.get("seed"), "history": [row for row in card["history"] if row.get("tower") == k + 1],
             "weights": weights} for k, weights in enumerate(card["weights"]["towers"])]


def validation_examples(card: dict, data_root: Path) -> list:
    """The card's validation scans found under data_root, in the card's order; DataError if any is missing."""
    by_hash = {e.sha256: e for e in tdata.labelled_examples(Path(data_root))}
    missing = [h for h in card["validation_sha256"] if h not in by_hash]
    if missing:
        raise tdata.DataError(f"{data_root}: {len(missing)} of the model's {len(card['validation_sha256'])} "
                              "validation scans are not there; pass its training data with --data")
    return [by_hash[h] for h in card["validation_sha256"]]


def merge(model_paths: list[Path], out: Path, data_root: Path | None = None, cache_dir: Path = Path("var/cache"),
          command: str = "") -> dict:
    """Merge trained models into OUT.keras with a card scored on their shared validation split."""
    import keras

    from training.architecture import merge_towers
    from training.train import TOWERS_NOTE, model_fields, tower_history, write_outputs
    from vision.modelio import load_model

    t0 = time.time()
    if len(model_paths) < 2:
        raise ModelError("merge needs at least two models")
    loaded = [load_model(Path(p)) for p in model_paths]
    cards = [m.card for m in loaded]
    check_mergeable(cards, [str(p) for p in model_paths])
    first = cards[0]
    val_ex = validation_examples(first, data_root or Path(first["config"]["data_root"]))
    x_val = tdata.cached_arrays(val_ex, first["preprocessing"], cache_dir)
    keras.mixed_precision.set_global_policy("float32")
    stages = [s for c in cards for s in tower_stages(c)]
    model = merge_towers([m.keras_model for m in loaded], first["input_size"], stages)
    probs = model.predict(x_val, batch_size=128, verbose=0)
    classes = first["classes"]
    val_metrics = classification_metrics([e.label for e in val_ex], [classes[i] for i in probs.argmax(axis=1)],
                                         probs, classes)
    towers = [t for c in cards for t in card_towers(c)]
    sources = [{"model": str(p), "sha256": c["sha256"], "training_command": c["training_command"],
                "seed": c["seed"], "validation_accuracy": c["validation"]["accuracy"],
                "wall_time_seconds": c["wall_time_seconds"], "training_precision": c.get("training_precision")}
               for p, c in zip(model_paths, cards)]
    card = {
        "name": Path(out).name,
        "classes": classes,
        "input_size": first["input_size"],
        "preprocessing": first["preprocessing"],
        **model_fields(model),
        "training_command": " && ".join([c["training_command"] for c in cards] + [command]),
        "seed": [t["seed"] for t in towers],
        "config": first["config"],
        "train_sha256": first["train_sha256"],
        "validation_sha256": first["validation_sha256"],
        "history": tower_history([t["history"] for t in towers]),
        "validation": val_metrics,
        "towers": len(towers),
        "tower_stages": stages,
        "sources": sources,
        "weights": {"towers": [dict(t["weights"], seed=t["seed"]) for t in towers], "note": TOWERS_NOTE},
        "training_precision": sorted({str(c.get("training_precision")) for c in cards}),
        # Training the towers is the cost of this model: their wall times add up, plus the merge.
        "wall_time_seconds": round(sum(c["wall_time_seconds"] for c in cards) + time.time() - t0, 1),
        "hardware": first.get("hardware"),
        "keras_version": keras.__version__,
    }
    return write_outputs(model, Path(out), card)

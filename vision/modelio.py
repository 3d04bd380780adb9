"""Model files: a `.keras` file loaded in safe mode, and the JSON card beside it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from vision.errors import ModelError


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_path(model_path: Path) -> Path:
    """The card of `models/x.keras` is `models/x.json`."""
    return Path(model_path).with_suffix(".json")


def read_card(model_path: Path) -> dict:
    """The model card, checked against the model file's SHA-256."""
    model_path = Path(model_path)
    if model_path.suffix != ".keras":
        raise ModelError(f"{model_path}: only .keras model files are loaded (got {model_path.suffix or 'no suffix'})")
    if not model_path.is_file():
        raise ModelError(f"{model_path}: model file not found; train one with `python cli.py train` or set BRAINSCAN_MODEL")
    card_file = card_path(model_path)
    try:
        card = json.loads(card_file.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"{card_file}: model card not found next to the model") from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"{card_file}: model card is not valid JSON ({exc})") from exc
    for key in ("classes", "input_size", "preprocessing", "gradcam_layer", "sha256"):
        if key not in card:
            raise ModelError(f"{card_file}: model card lacks '{key}'")
    actual = file_sha256(model_path)
    if actual != card["sha256"]:
        raise ModelError(
            f"{model_path}: SHA-256 {actual[:12]}… does not match its card ({card['sha256'][:12]}…); "
            "the model file was changed or the card belongs to another model"
        )
    return card


@dataclass
class LoadedModel:
    """A Keras model with its card; `sha256` identifies it in every result."""

    keras_model: object
    card: dict
    path: Path

    @property
    def sha256(self) -> str:
        return self.card["sha256"]

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    @property
    def preprocessing(self) -> dict:
        return dict(self.card["preprocessing"])


def load_model(model_path: Path) -> LoadedModel:
    """Load a `.keras` model in Keras safe mode after checking its card; raises ModelError."""
    card = read_card(model_path)
    import keras  # imported here so that reading a card never pulls in TensorFlow

    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a bad file; all mean "unusable model"
        raise ModelError(f"{model_path}: cannot be loaded in safe mode: {exc}") from exc
    for name in (card["gradcam_layer"], "logits"):
        try:
            model.get_layer(name)
        except ValueError as exc:
            raise ModelError(f"{model_path}: has no layer named '{name}' that its card requires") from exc
    return LoadedModel(model, card, Path(model_path))


def write_card(model_path: Path, card: dict) -> dict:
    """Write the card beside a saved model, stamping the model file's SHA-256."""
    card = dict(card, sha256=file_sha256(model_path))
    card_path(model_path).write_text(json.dumps(card, indent=1, sort_keys=False))
    return card

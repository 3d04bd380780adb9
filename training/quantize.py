"""`quantize`: calibrate and write the int8 file of a trained model from scans of its own training split."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from training.data import DataError, labelled_examples, scan_array
from vision.folding import fold_batchnorm
from vision.int8 import convert, write_int8
from vision.modelio import load_model


def calibration_examples(data: Path, train_sha256: set[str], count: int, seed: int) -> list:
    """`count` scans of the model's training split found under `data`, drawn with `seed`; never validation scans."""
    examples = [e for e in labelled_examples(data) if e.sha256 in train_sha256]
    if not examples:
        raise DataError(f"{data}: none of its scans is in the model's training split; "
                        "give the folder the model was trained on")
    rng = np.random.default_rng(seed)
    return [examples[i] for i in sorted(rng.choice(len(examples), min(count, len(examples)), replace=False))]


def quantize_model(model_path: Path, data: Path, count: int = 256, seed: int = 0) -> dict:
    """Write `<model>.int8.tflite` and `<model>.int8.json` beside the model; returns the provenance."""
    model = load_model(model_path)
    chosen = calibration_examples(Path(data), set(model.card.get("train_sha256", [])), count, seed)
    arrays = np.stack([scan_array(e.root, e.relpath, model.preprocessing) for e in chosen])
    started = time.perf_counter()
    flatbuffer = convert(fold_batchnorm(model.keras_model), model.card["gradcam_layer"], arrays)
    return write_int8(model_path, model.sha256, flatbuffer, [e.sha256 for e in chosen],
                      time.perf_counter() - started)

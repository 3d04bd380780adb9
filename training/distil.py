"""Distillation: a network learns from a trained teacher's logits as well as from the labels.

The teacher (typically a multi-tower model) is run once over the un-augmented training and validation scans;
its logits travel with each scan through the augmentation. Running it on every augmented batch instead would
cost its whole forward pass (3.1 GFLOP a scan for the shipped 2-tower model) on top of each training step; the
augmentations are small enough (flips, a few degrees, a few percent) that the clean scan's logits stand for them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vision.errors import ModelError


def check_teacher(card: dict, name: str, params: dict, validation_sha256: set) -> None:
    """Raise ModelError when the teacher reads other arrays than this run or has trained on its validation scans."""
    if card.get("preprocessing") != params:
        raise ModelError(f"{name}: the teacher preprocesses scans differently from this run "
                         f"({card.get('preprocessing')} against {params}); train with its --size and preprocessing")
    leaked = validation_sha256 & set(card.get("train_sha256", []))
    if leaked:
        raise ModelError(f"{name}: the teacher trained on {len(leaked)} of this run's validation scans, so the "
                         "validation figures would be flattered; use the teacher's --split-seed")


def teacher_logits(teacher: Path, params: dict, validation_sha256: set, *arrays: np.ndarray) -> list[np.ndarray]:
    """The teacher's logits for each array of preprocessed scans, after check_teacher."""
    import keras

    from vision.modelio import load_model

    loaded = load_model(Path(teacher))
    check_teacher(loaded.card, str(teacher), params, validation_sha256)
    net = loaded.keras_model
    logits = keras.Model(net.inputs, net.get_layer("logits").output)
    return [logits.predict(x, batch_size=128, verbose=0).astype(np.float32) for x in arrays]


def teacher_fields(teacher: Path, temperature: float, weight: float) -> dict:
    """What the card says about a distilled network's teacher and how it was followed."""
    from vision.modelio import read_card

    card = read_card(Path(teacher))
    return {
        "teacher": {"model": str(teacher), "sha256": card.get("sha256"),
                    "training_command": card.get("training_command"),
                    "validation_accuracy": card["validation"]["accuracy"],
                    "wall_time_seconds": card["wall_time_seconds"]},
        "distillation": {"temperature": temperature, "weight": weight,
                         "note": "loss = (1 - weight) x cross-entropy with the label-smoothed labels + weight x "
                                 "temperature^2 x KL(teacher || network), both softened by the temperature; the "
                                 "teacher's logits are those of the un-augmented training scans"},
    }


def distillation_loss(classes: int, temperature: float, weight: float, label_smoothing: float):
    """A Keras loss over the target rows of datasets(soft=...): the labels, then the teacher's logits.

    The network's outputs are probabilities; their logarithm is its logits less a per-row constant, which the
    tempered softmax ignores.
    """
    import keras
    from keras import ops

    def distillation(y_true, y_pred):
        labels, teacher = y_true[:, :classes], y_true[:, classes:]
        y_pred = ops.cast(y_pred, "float32")
        hard = keras.losses.categorical_crossentropy(labels, y_pred, label_smoothing=label_smoothing)
        student = ops.log_softmax(ops.log(ops.clip(y_pred, 1e-30, 1.0)) / temperature, axis=-1)
        target = ops.softmax(teacher / temperature, axis=-1)
        soft = ops.sum(target * (ops.log_softmax(teacher / temperature, axis=-1) - student), axis=-1)
        return (1.0 - weight) * hard + weight * temperature ** 2 * soft

    return distillation


def label_accuracy(classes: int):
    """Accuracy against the labels in datasets(soft=...) rows, named as Keras's own so histories keep their keys."""
    import keras

    def accuracy(y_true, y_pred):
        return keras.metrics.categorical_accuracy(y_true[:, :classes], y_pred)

    return keras.metrics.MeanMetricWrapper(accuracy, name="accuracy")

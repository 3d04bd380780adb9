"""Int8 serving: the folded model quantized to a LiteRT (TFLite) file, run by XNNPACK, with the same Grad-CAM.

The quantized file returns the Grad-CAM layer's features and the logits; probabilities and heatmaps come from
them exactly as in the Keras path (softmax, `class_activation` with the float32 dense kernel of the card's
model), so only the conv stack runs in int8.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from vision.errors import ModelError


def int8_path(model_path) -> Path:
    """The int8 file of `models/x.keras` is `models/x.int8.tflite`."""
    return Path(model_path).with_suffix(".int8.tflite")


def int8_card_path(model_path) -> Path:
    """Where the int8 file's provenance is kept: `models/x.int8.json`."""
    return Path(model_path).with_suffix(".int8.json")


def convert(keras_model, gradcam_layer: str, calibration: np.ndarray, logits_layer: str = "logits") -> bytes:
    """A full-int8 LiteRT flatbuffer of (features, logits) with float32 input and outputs.

    `keras_model` should be folded float32 (batch norm folded, so every conv quantizes with its own scale);
    `calibration` is a stack of prepared training scans that set each activation's int8 range.
    """
    import keras
    import tensorflow as tf

    two = keras.Model(keras_model.inputs, [keras_model.get_layer(gradcam_layer).output,
                                           keras_model.get_layer(logits_layer).output])

    def representative():
        for row in calibration:
            yield [row[None].astype(np.float32)]

    with tempfile.TemporaryDirectory() as tmp:
        two.export(tmp, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        return converter.convert()


def write_int8(model_path, model_sha256: str, flatbuffer: bytes, calibration_sha256: list[str],
               seconds: float) -> dict:
    """Write `x.int8.tflite` and its provenance `x.int8.json` beside the model; returns the provenance."""
    import tensorflow as tf

    int8_path(model_path).write_bytes(flatbuffer)
    card = {"model_sha256": model_sha256, "sha256": hashlib.sha256(flatbuffer).hexdigest(),
            "calibration_sha256": sorted(calibration_sha256), "tensorflow_version": tf.__version__,
            "seconds": round(seconds, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    int8_card_path(model_path).write_text(json.dumps(card, indent=1) + "\n")
    return card


def read_int8(model_path, model_sha256: str) -> bytes:
    """The int8 flatbuffer made from this very model; ModelError when it is missing, altered or another model's."""
    path, card_file = int8_path(model_path), int8_card_path(model_path)
    fix = f"run `python cli.py quantize TRAINING_FOLDER --model {model_path}`"
    if not path.is_file() or not card_file.is_file():
        raise ModelError(f"{path}: no int8 model beside {Path(model_path).name}; {fix}")
    data = path.read_bytes()
    try:
        card = json.loads(card_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{card_file}: not valid JSON ({exc}); {fix}") from None
    if card.get("model_sha256") != model_sha256:
        raise ModelError(f"{path} was quantized from another model ({str(card.get('model_sha256'))[:12]}…, "
                         f"not {model_sha256[:12]}…); {fix}")
    if hashlib.sha256(data).hexdigest() != card.get("sha256"):
        raise ModelError(f"{path}: SHA-256 does not match {card_file.name}; the file was changed; {fix}")
    return data


class Int8Explainer:
    """Probabilities and Grad-CAM maps from an int8 flatbuffer; the same calls as `vision.gradcam.Explainer`."""

    pads = False  # the interpreter is resized to each batch shape it meets, cheaply, so nothing is padded

    def __init__(self, flatbuffer: bytes, kernel: np.ndarray, threads: int, mirror: bool = False):
        from ai_edge_litert.interpreter import Interpreter

        self.mirror = mirror
        self._interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
        self._kernel = np.asarray(kernel, np.float32)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._shape = None

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.ascontiguousarray(images, np.float32)
        if self._shape != images.shape:
            self._interpreter.resize_tensor_input(self._input, list(images.shape))
            self._interpreter.allocate_tensors()
            self._shape = images.shape
        self._interpreter.set_tensor(self._input, images)
        self._interpreter.invoke()
        outputs = [self._interpreter.get_tensor(o["index"]) for o in self._interpreter.get_output_details()]
        # The converter does not keep the outputs' order; their ranks tell them apart.
        features = next(o for o in outputs if o.ndim == 4)
        logits = next(o for o in outputs if o.ndim == 2)
        return features, logits

    def _features_logits(self, images: np.ndarray):
        """The features and logits served: with `mirror`, the mean of the scans' and their mirrors' (one run)."""
        if not self.mirror:
            return self._run(images)
        from vision.gradcam import mirror_mean

        n = len(images)
        features, logits = self._run(np.concatenate([images, np.asarray(images)[:, :, ::-1]]))
        return mirror_mean(features[:n], logits[:n], features[n:], logits[n:])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (B, classes) and heatmaps (B, h, w) in [0, 1] for a batch of prepared arrays."""
        from keras import ops

        from vision.gradcam import class_activation

        features, logits = self._features_logits(images)
        cams = class_activation(features, logits, self._kernel)
        return _probabilities(logits), np.asarray(ops.convert_to_numpy(cams))

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Probabilities only, for benchmarks that compare the two."""
        return _probabilities(self._features_logits(images)[1])


def _probabilities(logits: np.ndarray) -> np.ndarray:
    from keras import ops

    return np.asarray(ops.convert_to_numpy(ops.softmax(ops.cast(logits, "float32"), axis=-1)))

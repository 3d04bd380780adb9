"""Batched prediction with Grad-CAM: one forward and one gradient pass for a whole batch."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

EPSILON = 1e-7


class Explainer:
    """Wraps a model with a named logits layer and returns probabilities and Grad-CAM maps."""

    def __init__(self, keras_model, gradcam_layer: str, logits_layer: str = "logits"):
        import keras

        self._model = keras.Model(
            keras_model.inputs,
            [keras_model.get_layer(gradcam_layer).output, keras_model.get_layer(logits_layer).output],
        )
        self._step = tf.function(self._explain, reduce_retracing=True)

    def _explain(self, images):
        with tf.GradientTape() as tape:
            features, logits = self._model(images, training=False)
            features = tf.cast(features, tf.float32)
            logits = tf.cast(logits, tf.float32)
            predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
            # Each row's own predicted-class logit, so a mixed batch never borrows another row's class.
            target = tf.gather(logits, predicted, axis=1, batch_dims=1)
        grads = tape.gradient(target, features)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # spatial axes only
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
        cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + EPSILON)
        return tf.nn.softmax(logits, axis=-1), cam

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (B, classes) and heatmaps (B, h, w) in [0, 1] for a batch of prepared arrays."""
        probs, cams = self._step(tf.convert_to_tensor(images, dtype=tf.float32))
        return probs.numpy(), cams.numpy()

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Probabilities only, for benchmarks that compare against the bare forward pass."""
        _, logits = self._model(tf.convert_to_tensor(images, dtype=tf.float32), training=False)
        return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1).numpy()

"""Batched prediction with Grad-CAM: one forward and one gradient pass for a whole batch."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

EPSILON = 1e-7


class Explainer:
    """Wraps a model with a named logits layer and returns probabilities and Grad-CAM maps."""

    def __init__(self, keras_model, gradcam_layer: str, logits_layer: str = "logits"):
        import keras

        features = keras_model.get_layer(gradcam_layer).output
        logits = keras_model.get_layer(logits_layer).output
        self._model = keras.Model(keras_model.inputs, [features, logits])
        # The conv stack runs once, outside the tape; only the head (pooling, dense) is differentiated.
        self._features = keras.Model(keras_model.inputs, features)
        self._head = keras.Model(features, logits)
        self._step = tf.function(self._explain, reduce_retracing=True)
        self._forward = tf.function(self._probabilities, reduce_retracing=True)

    def _explain(self, images):
        features = self._features(images, training=False)
        with tf.GradientTape() as tape:
            tape.watch(features)
            logits = tf.cast(self._head(features, training=False), tf.float32)
            predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
            # Each row's own predicted-class logit, so a mixed batch never borrows another row's class.
            target = tf.gather(logits, predicted, axis=1, batch_dims=1)
        grads = tf.cast(tape.gradient(target, features), tf.float32)
        features = tf.cast(features, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # spatial axes only
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
        cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + EPSILON)
        return tf.nn.softmax(logits, axis=-1), cam

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (B, classes) and heatmaps (B, h, w) in [0, 1] for a batch of prepared arrays."""
        probs, cams = self._step(tf.convert_to_tensor(images, dtype=tf.float32))
        return probs.numpy(), cams.numpy()

    def _probabilities(self, images):
        _, logits = self._model(images, training=False)
        return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Probabilities only, compiled like the explained pass, for benchmarks that compare the two."""
        return self._forward(tf.convert_to_tensor(images, dtype=tf.float32)).numpy()

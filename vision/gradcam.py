"""Batched prediction with Grad-CAM: one compiled forward pass for a whole batch, on any Keras backend."""
from __future__ import annotations

import numpy as np

from vision.errors import ModelError

EPSILON = 1e-7
# Between the Grad-CAM layer and the logits only these may stand (one global pooling): then Grad-CAM's channel
# weights, the spatial mean of a logit's gradient with respect to the features, are the class's dense weights
# over the grid's cell count, and Grad-CAM needs no backprop at all. Average pooling spreads that gradient
# evenly over the grid; max pooling puts all of it on each channel's strongest cell: the same mean.
POOLINGS = ("GlobalAveragePooling2D", "GlobalMaxPooling2D")
HEAD_LAYERS = (*POOLINGS, "Dropout")
# Or the dense layer scores every cell and the logits are each class's best cell (training.architecture's
# `cells`): d logit_c / d A_k(i, j) = W[k, c] at the class's best cell, 0 elsewhere, so the same closed form holds
# and the map is the class's own score map (less its bias).


def head_path(keras_model, gradcam_layer: str, logits_layer: str = "logits") -> list:
    """The layers from the logits back to (not including) the Grad-CAM layer; ModelError if not a pooled dense head."""
    layer, path = keras_model.get_layer(logits_layer), []
    while layer.name != gradcam_layer:
        path.append(layer)
        inputs = layer.input if isinstance(layer.input, list) else [layer.input]
        if len(inputs) != 1 or len(path) > len(HEAD_LAYERS) + 1:
            break
        layer = inputs[0]._keras_history.operation  # the layer that made this tensor; Keras has no public accessor
    kinds = [type(lay).__name__ for lay in path]
    scored = layer.name == gradcam_layer and kinds[:2] == ["GlobalMaxPooling2D", "Dense"] and set(kinds[2:]) <= {"Dropout"}
    if not scored and (layer.name != gradcam_layer or kinds[0] != "Dense"
                       or sum(kinds[1:].count(p) for p in POOLINGS) != 1 or not set(kinds[1:]) <= set(HEAD_LAYERS)):
        raise ModelError(
            f"Grad-CAM needs '{gradcam_layer}' -> global average or max pooling [-> dropout] -> "
            f"'{logits_layer}' (Dense), or '{gradcam_layer}' [-> dropout] -> Dense -> '{logits_layer}' (global max "
            f"pooling); "
            f"this model has {' <- '.join(kinds)} after it"
        )
    return path


def head_dense(keras_model, gradcam_layer: str, logits_layer: str = "logits"):
    """The Dense layer of the head whose kernel weights the Grad-CAM channels; ModelError as `head_path`."""
    return next(lay for lay in head_path(keras_model, gradcam_layer, logits_layer) if type(lay).__name__ == "Dense")


def class_activation(features, logits, kernel):
    """Grad-CAM of each row for its own predicted class, in closed form, scaled to [0, 1] per row (a map with no
    positive cell is shifted by its minimum first, so it is never blank).

    With global average pooling and a dense head, d logit_c / d A_k(i, j) = W[k, c] / (h * w) at every cell (with
    max pooling, W[k, c] at channel k's strongest cell and 0 elsewhere), so the spatial mean of the gradients
    (Grad-CAM's channel weights) is W[k, c] / (h * w): the same map as a gradient pass, for one einsum.
    """
    from keras import ops

    features = ops.cast(features, "float32")
    logits = ops.cast(logits, "float32")
    cells = features.shape[1] * features.shape[2]
    predicted = ops.one_hot(ops.argmax(logits, axis=-1), logits.shape[-1], dtype="float32")
    weights = ops.matmul(predicted, ops.transpose(ops.cast(kernel, "float32"))) / cells  # (batch, channels)
    raw = ops.einsum("bhwk,bk->bhw", features, weights)
    # Where no cell raises the class's score (a logistic head's unsure scans), the ReLU would leave a blank map
    # whose peak is an arbitrary corner; shifted by its minimum, it shows where the score is lowered least.
    top, bottom = ops.max(raw, axis=(1, 2), keepdims=True), ops.min(raw, axis=(1, 2), keepdims=True)
    cam = ops.relu(raw - ops.where(top > 0, 0.0, bottom))
    return cam / (ops.max(cam, axis=(1, 2), keepdims=True) + EPSILON)


def mirror_mean(features, logits, mirrored_features, mirrored_logits):
    """Features and logits of a batch averaged with those of its left-right mirror, the mirror's features flipped
    back so each cell meets its own. Grad-CAM is linear in the features, so the map of the mean is the mean map."""
    from keras import ops

    features = (ops.cast(features, "float32") + ops.flip(ops.cast(mirrored_features, "float32"), axis=2)) / 2
    return features, (ops.cast(logits, "float32") + ops.cast(mirrored_logits, "float32")) / 2


def padded_size(n: int) -> int:
    """The batch size a batch of n runs at under XLA: the next power of two, so a worker compiles a few shapes."""
    return 1 << max(0, n - 1).bit_length()


def pad_batch(images: np.ndarray, pad: bool = True) -> np.ndarray:
    """The batch as float32, with zero rows up to padded_size when `pad` (rows do not interact at inference)."""
    images = np.asarray(images, np.float32)
    extra = padded_size(len(images)) - len(images) if pad else 0
    return np.concatenate([images, np.zeros((extra, *images.shape[1:]), np.float32)]) if extra else images


class Explainer:
    """Wraps a model with a named logits layer and returns probabilities and Grad-CAM maps; with `mirror`, those
    of each scan averaged with its left-right mirror's (the card's `mirror`)."""

    def __init__(self, keras_model, gradcam_layer: str, logits_layer: str = "logits", mirror: bool = False):
        import keras

        dense = head_dense(keras_model, gradcam_layer, logits_layer)
        features = keras_model.get_layer(gradcam_layer).output
        logits = keras_model.get_layer(logits_layer).output
        inputs = keras_model.inputs
        if mirror:
            # Pools of 2 on even sizes and 'same' convs keep the grid aligned under a flip: cell j of the mirror
            # is cell w-1-j of the scan.
            both = keras.Model(keras_model.inputs, [features, logits])
            images = keras.Input(keras_model.inputs[0].shape[1:], name="images")
            features, logits = mirror_mean(*both(images), *both(keras.ops.flip(images, axis=2)))
            inputs = [images]

        class ClassActivation(keras.layers.Layer):
            def call(self, features, logits):
                return class_activation(features, logits, dense.kernel)

        probs = keras.layers.Softmax(dtype="float32", name="explained_probs")(keras.ops.cast(logits, "float32"))
        cams = ClassActivation(dtype="float32", name="class_activation")(features, logits)
        # predict_on_batch compiles each model per batch shape: tf.function (XLA on a GPU), jax.jit, eager torch.
        self._model = keras.Model(inputs, [probs, cams])
        self._forward = keras.Model(inputs, probs)

    @property
    def pads(self) -> bool:
        """Whether batches are padded: under XLA (jax.jit, TensorFlow on a GPU), which compiles once per batch
        shape for a second or more while cache hits make a worker's batches any size up to the batch size.
        TensorFlow on a CPU traces a second shape as a shape of any size, so padding would only cost there."""
        return bool(self._model.jit_compile)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (B, classes) and heatmaps (B, h, w) in [0, 1] for a batch of prepared arrays."""
        probs, cams = self._model.predict_on_batch(pad_batch(images, self.pads))
        return np.asarray(probs)[: len(images)], np.asarray(cams)[: len(images)]

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Probabilities only, compiled like the explained pass, for benchmarks that compare the two."""
        return np.asarray(self._forward.predict_on_batch(pad_batch(images, self.pads)))[: len(images)]

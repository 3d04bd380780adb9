"""Batch norm folded into the convolution before it, for serving: the same function in fewer passes over memory."""
from __future__ import annotations

import numpy as np


def producer(tensor):
    """The layer that made a symbolic tensor; Keras has no public accessor."""
    return tensor._keras_history.operation


def consumers(keras_model) -> dict[str, list]:
    """Each layer's name mapped to the layers that read its output."""
    readers: dict[str, list] = {}
    for layer in keras_model.layers:
        if not layer._inbound_nodes:
            continue  # the input layer
        inputs = layer.input if isinstance(layer.input, list) else [layer.input]
        for tensor in inputs:
            readers.setdefault(producer(tensor).name, []).append(layer)
    return readers


def foldable(keras_model) -> dict[str, object]:
    """Each Conv2D whose only reader is a channels-last BatchNormalization, mapped to that layer, by conv name."""
    import keras

    pairs, readers_of = {}, consumers(keras_model)
    for layer in keras_model.layers:
        readers, name = readers_of.get(layer.name, []), layer.name
        if (isinstance(layer, keras.layers.Conv2D) and len(readers) == 1
                and isinstance(readers[0], keras.layers.BatchNormalization) and readers[0].axis in (-1, 3)):
            pairs[name] = readers[0]
    return pairs


def folded_weights(conv, bn) -> list[np.ndarray]:
    """Kernel and bias of `conv` followed by `bn` at inference: y = (x*k + b - mean) * gamma / sqrt(var + eps) + beta."""
    kernel = np.asarray(conv.kernel, np.float32)
    bias = np.asarray(conv.bias, np.float32) if conv.use_bias else np.zeros(kernel.shape[-1], np.float32)
    gamma = np.asarray(bn.gamma, np.float32) if bn.scale else np.ones_like(bias)
    beta = np.asarray(bn.beta, np.float32) if bn.center else np.zeros_like(bias)
    scale = gamma / np.sqrt(np.asarray(bn.moving_variance, np.float32) + bn.epsilon)
    return [kernel * scale, beta + (bias - np.asarray(bn.moving_mean, np.float32)) * scale]


def fold_batchnorm(keras_model):
    """A copy of the model for inference with every Conv2D -> BatchNormalization pair made one biased Conv2D.

    The batch-norm layers stay in the graph as pass-throughs under their own names, so every other layer (the
    Grad-CAM layer included) keeps its name and output. Weights are folded in float32, before any precision cast.
    """
    import keras

    pairs = foldable(keras_model)
    folded_bns = {bn.name for bn in pairs.values()}

    class FoldedBatchNorm(keras.layers.Layer):
        """A batch norm whose affine map now lives in the convolution before it."""

        def call(self, inputs, training=None, mask=None):
            return inputs

    def clone(layer):
        config = layer.get_config()
        if layer.name in folded_bns:
            return FoldedBatchNorm(name=layer.name, dtype=layer.dtype_policy.name)
        if layer.name in pairs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(keras_model, clone_function=clone)
    for layer in keras_model.layers:
        if layer.name in folded_bns or not layer.weights:
            continue  # clone_model may rename the input layer, which has no weights anyway
        target = copy.get_layer(layer.name)
        target.set_weights(folded_weights(layer, pairs[layer.name]) if layer.name in pairs else layer.get_weights())
    return copy

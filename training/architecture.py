"""The custom CNN: plain Conv2D/BatchNorm/ReLU blocks, global pooling and a named logits layer."""
from __future__ import annotations

import keras
from keras import layers

GRADCAM_LAYER = "gradcam_features"

# (filters, convs) per stage; every stage but the last ends with a 2x2 max-pool.
# The last stage stays at 1/8 of the input (16x16 at 128 px) so Grad-CAM has a usable grid.
STAGES = ((24, 1), (48, 1), (96, 2), (192, 2))


def conv_block(x, filters: int, name: str):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=name)(x)


def build_model(input_size: int = 128, classes: int = 4, stages=STAGES, dropout: float = 0.3) -> keras.Model:
    """Build the CNN; the last conv block is `gradcam_features`, the class scores `logits`."""
    inputs = keras.Input((input_size, input_size, 1), name="scan")
    x = inputs
    for s, (filters, convs) in enumerate(stages):
        for c in range(convs):
            last = s == len(stages) - 1 and c == convs - 1
            x = conv_block(x, filters, GRADCAM_LAYER if last else f"s{s}c{c}")
        if s < len(stages) - 1:
            x = layers.MaxPooling2D(2, name=f"s{s}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    logits = layers.Dense(classes, name="logits", dtype="float32")(x)
    probs = layers.Softmax(name="probs", dtype="float32")(logits)
    return keras.Model(inputs, probs, name="brainscan_cnn")


def flops_per_scan(model: keras.Model) -> int:
    """Multiply-adds x 2 of the conv and dense layers for one scan (BN, pooling and ReLU excluded)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            _, h, w, out_c = layer.output.shape
            kh, kw = layer.kernel_size
            in_c = layer.input.shape[-1]
            total += 2 * h * w * out_c * kh * kw * in_c
        elif isinstance(layer, layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total)

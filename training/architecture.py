"""The custom CNN: plain Conv2D/BatchNorm/ReLU blocks, global pooling and a named logits layer."""
from __future__ import annotations

import math
import re

import keras
from keras import layers

from training.defaults import WIDTH
from vision.errors import ModelError

GRADCAM_LAYER = "gradcam_features"

# (filters, convs) per stage, as multiples of the base width; every stage but the last ends with a 2x2
# max-pool. The last stage stays at 1/8 of the input (20x20 at 160 px) so Grad-CAM has a usable grid.
SHAPE = ((1, 1), (2, 1), (4, 2), (8, 2))
# --dilate: the last stage's two convs at dilation 2 and 3 (co-prime, so no gridding). Same weights and FLOPs,
# but a unit of the Grad-CAM layer sees 110 px of the 160 px head instead of 62 px: the whole head's anatomy
# (plane, midline, ventricles) rather than a local patch.
DILATIONS = (2, 3)


def stages_for(width: int = WIDTH, dilate: bool = False, convs: tuple | None = None) -> tuple:
    """The (filters, convs[, dilations]) of each stage for a base width (the first stage's filters).

    `convs` gives the conv blocks of each stage (default SHAPE's 1, 1, 2, 2).
    """
    counts = convs or tuple(n for _, n in SHAPE)
    if len(counts) != len(SHAPE) or min(counts) < 1:
        raise ModelError(f"--convs needs {len(SHAPE)} counts of 1 or more, got {counts}")
    if dilate and counts[-1] != len(DILATIONS):
        raise ModelError(f"--dilate needs {len(DILATIONS)} convs in the last stage, got {counts[-1]}")
    stages = [(width * m, n) for (m, _), n in zip(SHAPE, counts)]
    if dilate:
        stages[-1] = (*stages[-1], DILATIONS)
    return tuple(stages)


def as_stages(stages) -> tuple:
    """Stages as nested tuples, as a card's JSON lists come back."""
    return tuple(tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in stage) for stage in stages)


STAGES = stages_for(WIDTH)


def conv_block(x, filters: int, name: str, dilation: int = 1):
    x = layers.Conv2D(filters, 3, padding="same", dilation_rate=dilation, use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=name)(x)


def block_names(stages, prefix: str = "", last: str = GRADCAM_LAYER) -> list[list[str]]:
    """Each stage's conv block names: the last block is `last`, the others `{prefix}s{stage}c{conv}`."""
    names = [[f"{prefix}s{s}c{c}" for c in range(stage[1])] for s, stage in enumerate(stages)]
    names[-1][-1] = last
    return names


def conv_stack(x, stages, prefix: str = "", last: str = GRADCAM_LAYER):
    """The conv blocks of one network, named by `block_names`."""
    for s, ((filters, convs, *dilations), names) in enumerate(zip(stages, block_names(stages, prefix, last))):
        for c, name in enumerate(names):
            x = conv_block(x, filters, name, dilations[0][c] if dilations else 1)
        if s < len(stages) - 1:
            x = layers.MaxPooling2D(2, name=f"{prefix}s{s}_pool")(x)
    return x


def tower_layer_name(name: str, tower: int) -> str:
    """Where a single network's layer sits in tower `tower` of a multi-tower model."""
    return f"t{tower}_" + name.replace(GRADCAM_LAYER, "features")


def per_tower(stages, towers: int) -> list:
    """One stages tuple per tower: `stages` itself when it is already a list of them, else it repeated."""
    return list(stages) if isinstance(stages, list) else [stages] * towers


# The global pooling before the dense head. avg: a class's score sums evidence over the whole grid. max: each
# channel counts only at its strongest cell, so a class must be shown somewhere (weakly supervised
# localisation, Oquab et al. 2015). Grad-CAM's closed form holds for both (vision/gradcam.py).
# cells: the dense head scores every cell of the grid (`class_map`) and each class's logit is its best cell
# (Oquab et al. 2015). Under a dense layer over pooled features a class can be the one left when the others'
# evidence is missing (a figshare-looking slice with no meningioma or pituitary mass reads as glioma); here a class
# is named for what one cell's receptive field shows, and its Grad-CAM map is its own score map. Fine-tuned from a
# max-pooled network it moved the by-eye pointing score from 0.655 to 0.79-0.85 (README); from scratch it did not.
POOLS = {"avg": ("gap", layers.GlobalAveragePooling2D), "max": ("gmp", layers.GlobalMaxPooling2D),
         "cells": ("logits", layers.GlobalMaxPooling2D)}
CLASS_MAP = "class_map"


def pooling_of(model: keras.Model) -> str:
    """The POOLS key of a model's global pooling."""
    if any(layer.name == CLASS_MAP for layer in model.layers):
        return "cells"
    return "max" if any(isinstance(layer, layers.GlobalMaxPooling2D) for layer in model.layers) else "avg"


def build_model(input_size: int = 128, classes: int = 4, stages=STAGES, dropout: float = 0.3,
                towers: int = 1, pool: str = "avg") -> keras.Model:
    """Build the CNN; the last conv block is `gradcam_features`, the class scores `logits`.

    With towers > 1, that many conv stacks read the scan side by side and `gradcam_features` concatenates
    their last blocks, so one dense head (and one Grad-CAM pass) reads them all; `stages` may then be a list
    with each tower's own stages.
    """
    inputs = keras.Input((input_size, input_size, 1), name="scan")
    if towers == 1:
        x = conv_stack(inputs, stages)
    else:
        stacks = [conv_stack(inputs, own, f"t{k}_", tower_layer_name(GRADCAM_LAYER, k))
                  for k, own in enumerate(per_tower(stages, towers))]
        x = layers.Concatenate(name=GRADCAM_LAYER)(stacks)
    name, pooling = POOLS[pool]
    if pool == "cells":
        x = layers.Dropout(dropout, name="dropout")(x)
        x = layers.Dense(classes, name=CLASS_MAP, dtype="float32")(x)
        logits = pooling(name=name, dtype="float32")(x)
    else:
        x = pooling(name=name)(x)
        x = layers.Dropout(dropout, name="dropout")(x)
        logits = layers.Dense(classes, name="logits", dtype="float32")(x)
    probs = layers.Softmax(name="probs", dtype="float32")(logits)
    return keras.Model(inputs, probs, name="brainscan_cnn")


def towers_of(model: keras.Model) -> int:
    """How many towers a model holds; a plain network is one."""
    return sum(1 for layer in model.layers if re.fullmatch(r"t\d+_features", layer.name)) or 1


def merge_towers(models: list, input_size: int, stages) -> keras.Model:
    """One multi-tower model whose logits are exactly the mean of its towers' logits, every tower of every model
    counted once.

    The mean of k dense heads over pooled features is itself a dense layer over the concatenated features
    (kernels stacked and divided by k, biases averaged), so the ensemble keeps one named logits layer and
    its Grad-CAM map is the mean of the networks' weighted feature maps. A model that already has k towers
    joins as k networks: tower i's logits are k times its rows of the head, plus the head's bias, whose
    mean over the towers is that model's logits. `stages` is every tower's, or a list with one per tower, in
    the order of the models' towers: towers may differ in width, depth and dilation, since every one ends on the
    same grid (1/8 of the input).
    """
    import numpy as np

    from vision.errors import ModelError

    pools = {pooling_of(model) for model in models}
    if "cells" in pools:  # the mean of per-cell maxima is not the maximum of any one map
        raise ModelError("models whose logits are their best cell's (--pool cells) cannot be merged")
    if len(pools) > 1:  # the mean of their heads is one dense layer only over one kind of pooled features
        raise ModelError("models with average and max global pooling cannot be merged")
    classes = models[0].get_layer("logits").units
    counts = [towers_of(model) for model in models]
    own = per_tower(stages, sum(counts))
    merged = build_model(input_size, classes, own, towers=sum(counts), pool=pools.pop())
    kernels, bias, j = [], 0.0, 0
    for model, k in zip(models, counts):
        kernel, model_bias = model.get_layer("logits").get_weights()
        bias = bias + k * model_bias
        row = 0
        for i in range(k):
            for name in (block for stage in block_names(own[j]) for block in stage):
                for suffix in ("_conv", "_bn"):
                    source = model.get_layer(name + suffix if k == 1 else tower_layer_name(name + suffix, i))
                    merged.get_layer(tower_layer_name(name + suffix, j)).set_weights(source.get_weights())
            features = own[j][-1][0]
            kernels.append(k * kernel[row : row + features])
            row += features
            j += 1
    merged.get_layer("logits").set_weights([np.concatenate(kernels, axis=0) / j, bias / j])
    return merged


def flops_per_scan(model: keras.Model) -> int:
    """Multiply-adds x 2 of the conv and dense layers for one scan (BN, pooling and ReLU excluded)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            _, h, w, out_c = layer.output.shape
            kh, kw = layer.kernel_size
            in_c = layer.input.shape[-1]
            total += 2 * h * w * out_c * kh * kw * in_c
        elif isinstance(layer, layers.Dense):  # applied at every cell of a grid (class_map)
            cells = math.prod(layer.input.shape[1:-1])
            total += 2 * cells * layer.input.shape[-1] * layer.units
    return int(total)

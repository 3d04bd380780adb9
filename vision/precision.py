"""The precision a worker serves the model in: float32, mixed bfloat16 on CPUs with bfloat16 instructions, or int8."""
from __future__ import annotations

from config import PRECISIONS

# Only these run bfloat16 arithmetic in hardware; elsewhere oneDNN falls back to Eigen (a training step 21x
# slower than float32 on an AVX2-only EPYC), so auto keeps float32 there.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# The head stays float32 so probabilities and Grad-CAM weights read the logits at full precision.
FLOAT32_LAYERS = ("logits", "class_map")


def has_bfloat16(flags: set[str]) -> bool:
    """Whether a CPU with these /proc/cpuinfo flags runs bfloat16 arithmetic in hardware."""
    return any(f in flags for f in BF16_FLAGS)


def serving_precision(requested: str | None, gpus: list, flags: set[str]) -> str:
    """The precision to serve in: `requested` (default auto). Auto is mixed bfloat16 on a CPU with AVX512-BF16
    or AMX and float32 elsewhere; int8 (vision.int8) runs on the CPU even where a GPU is present and is never
    chosen by auto. ValueError for an unknown name."""
    name = requested or "auto"
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision '{name}': choose one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    return "mixed_bfloat16" if not gpus and has_bfloat16(flags) else "float32"


def with_precision(keras_model, precision: str):
    """The model itself for float32; else a copy whose layers compute in `precision` (same weights, float32 head)."""
    if precision == "float32":
        return keras_model
    import keras

    def recast(layer):
        config = layer.get_config()
        if layer.name not in FLOAT32_LAYERS and not isinstance(layer, keras.layers.Softmax):
            config["dtype"] = precision
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(keras_model, clone_function=recast)
    copy.set_weights(keras_model.get_weights())
    return copy

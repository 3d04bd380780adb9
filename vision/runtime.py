"""A worker process's model: devices configured, loaded once, warmed up, ready for batches."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from vision.modelio import load_model


def cpu_share(cpu_threads: int | None = None) -> int:
    """The cores this process may use: cpu_threads, else BRAINSCAN_CPU_THREADS, else all of them."""
    return cpu_threads or int(os.environ.get("BRAINSCAN_CPU_THREADS") or os.cpu_count() or 1)


# The extensions that decide TensorFlow's CPU speed: oneDNN defaults on only with AVX-512 VNNI/BF16 or AMX, and
# mixed bfloat16 pays off only with AVX512-BF16 or AMX.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_fields(cpuinfo: str = "/proc/cpuinfo") -> dict[str, str] | None:
    """The first CPU's lines in cpuinfo as {key: value}, or None where cpuinfo cannot be read."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return None
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's instruction-set flags; empty where cpuinfo cannot be read."""
    return set((cpu_fields(cpuinfo) or {}).get("flags", "").split())


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's cores, model name and speed-deciding vector extensions, e.g. "2 cores, AMD EPYC, avx2+avx512f"."""
    fields = cpu_fields(cpuinfo)
    if fields is None:
        return f"{os.cpu_count()} cores, {platform.machine()}, flags unknown"
    flags = set(fields.get("flags", "").split())
    features = "+".join(f for f in CPU_FEATURES if f in flags) or "no AVX2"
    return f"{os.cpu_count()} cores, {fields.get('model name') or platform.machine()}, {features}"


def configure_devices(cpu_threads: int | None = None) -> list:
    """GPUs visible to the Keras backend, set to take memory as needed; CPU thread pools sized to this
    process's share of the cores. Returns the GPUs' names."""
    import keras

    threads = cpu_share(cpu_threads)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [str(d) for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:
        pass  # TensorFlow already ran in this process (a test, a notebook): its pools stay as they are
    return [gpu.name for gpu in gpus]


def check_servable(model_path, precision: str | None) -> None:
    """ModelError now, in the parent process, for a model no worker process could load: its card, and its int8
    file when int8 is asked for (a worker process that fails to start would only be restarted)."""
    from vision.int8 import read_int8
    from vision.modelio import read_card

    card = read_card(model_path)
    if precision == "int8":
        read_int8(model_path, card["sha256"])


class Runtime:
    """Loaded model + batched Grad-CAM; one per worker process."""

    def __init__(self, model_path, cpu_threads: int | None = None, warm_batch: int = 32, precision: str | None = None,
                 fold: bool = True):
        self.gpus = configure_devices(cpu_threads)
        self.threads = cpu_share(cpu_threads)  # also how many scans it decodes at once
        from vision.folding import fold_batchnorm
        from vision.gradcam import Explainer
        from vision.precision import serving_precision, with_precision

        self.precision = serving_precision(precision, self.gpus, cpu_flags())
        self.model = load_model(model_path)
        # Absent from cards of models trained before it existed: those are served as they were scored.
        self.mirror = mirror = bool(self.model.card.get("mirror"))
        if self.precision == "int8":  # the int8 file holds the folded conv stack; the Keras model gives the head
            from vision.gradcam import head_dense
            from vision.int8 import Int8Explainer, read_int8

            dense = head_dense(self.model.keras_model, self.model.card["gradcam_layer"])
            self.explainer = Int8Explainer(read_int8(model_path, self.model.sha256), dense.kernel, self.threads,
                                           mirror)
        else:
            # Folding is exact (float32 rounding) and saves a pass over every conv block's output: +11% measured.
            keras_model = fold_batchnorm(self.model.keras_model) if fold else self.model.keras_model
            self.explainer = Explainer(with_precision(keras_model, self.precision), self.model.card["gradcam_layer"],
                                       mirror=mirror)
        size = self.model.card["input_size"]
        # Warm up on the batch shape the worker will see, so the first real batch pays no tracing cost.
        self.explainer(np.zeros((warm_batch, size, size, 1), np.float32))

    @property
    def sha256(self) -> str:
        return self.model.sha256

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    @property
    def preprocessing(self) -> dict:
        return self.model.preprocessing

    def explain(self, arrays: np.ndarray):
        """Probabilities and Grad-CAM maps for a stack of prepared arrays."""
        return self.explainer(arrays)

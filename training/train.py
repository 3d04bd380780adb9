"""Train the CNN from class folders and write `<out>.keras`, its card and its plots."""
from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jobs.labels import CLASSES
from jobs.metrics import classification_metrics
from training import data as tdata
from training import defaults, distil
from training.near_copies import NEAR_COPY, nearest_correlation
from vision.preprocess import DEFAULTS
from vision.precision import has_bfloat16
from vision.runtime import cpu_description, cpu_flags


@dataclass
class TrainConfig:
    data_root: Path
    out: Path  # models/brainscan-v1 → models/brainscan-v1.keras, .json, -curves.png, -confusion.png
    epochs: int = defaults.EPOCHS
    batch_size: int = defaults.BATCH_SIZE
    learning_rate: float = defaults.LEARNING_RATE
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    gamma: float = 0.0  # > 0: intensity gamma augmentation, log-uniform in [e^-gamma, e^gamma]
    equalise: bool = False  # head histogram equalisation in the preprocessing (vision.preprocess.equalise_head)
    invert: float = 0.0  # share of training scans shown as their head's negative (data.invert_head)
    gin: float = 0.0  # share of training scans given a random contrast (data.random_contrast)
    rim_erase: float = 0.0  # share of training scans with the head's outer rim blacked out (data.strip_rim)
    cutmix: float = 0.0  # share of training scans with a box of another scan pasted in, labels mixed (data.cutmix)
    clean_epochs: int = 0  # the last N epochs see left-right flips only, as served scans look
    downsize: float = 0.0  # share of large training scans shown as a downsized JPEG copy (data.downsized_twins)
    oversample: int = 1  # > 1: scans of their class's rare size group (data.rare_source_repeats) shown that often
    balance: int = 1  # > 1: rare intensity groups within a class repeated up to that often (data.balanced_repeats)
    init: Path | None = None  # a trained model whose weights this run starts from (fine-tuning)
    # > 0: up to that many figshare meningioma and pituitary scans with the lesion erased where init's map puts
    # it, labelled notumor, and as many controls, added to every epoch (training.lesions); needs init.
    erase_lesions: int = 0
    teacher: Path | None = None  # a trained model whose logits this run also learns from (training.distil)
    distil_temperature: float = defaults.DISTIL_TEMPERATURE
    distil_weight: float = defaults.DISTIL_WEIGHT
    ema_momentum: float = 0.998  # about 3.4 epochs of 146 steps; 0 turns the weight average off
    # auto: training_precision's choice. mixed_bfloat16 trains 1.8x faster per step on a CPU with AMX and 1.3x
    # on an AMD EPYC with AVX512-BF16 (1.25 against 1.67 s per step of 32, a training run sharing the cores);
    # without those instructions it is ~20x slower, so auto picks it only where they are.
    precision: str = "auto"
    val_fraction: float = defaults.VAL_FRACTION
    seed: int = defaults.SEED
    # None: the split follows `seed`. Set it to train other inits on one split, so runs score on the same scans.
    split_seed: int | None = None
    size: int = DEFAULTS["size"]
    width: int = defaults.WIDTH
    dilate: bool = False  # the last stage's convs dilated (architecture.DILATIONS): a head-wide receptive field
    convs: tuple | None = None  # conv blocks per stage (architecture.SHAPE's when None)
    pool: str = defaults.POOL  # global pooling before the head: avg, max or cells (architecture.POOLS)
    cell_loss: str = "logistic"  # with pool cells: one logistic loss per class, softmax cross-entropy, or both summed
    towers: int = 1  # > 1: that many networks trained one after another (seeds seed, seed+1, ...) and merged
    # Served (and scored on validation) as the mean of each scan and its left-right mirror: the shipped cells
    # network gains 1 validation error fewer and points at 49 of 58 boxes instead of 46 (bench/pointing.py).
    mirror: bool = True
    resume: bool = False
    command: str = ""
    cache_dir: Path = Path("var/cache")
    stages: tuple = field(default=None)


def training_precision(requested: str, gpus: list, flags: set[str]) -> tuple[str, str | None]:
    """The dtype policy to train in, and a warning when the one requested runs on slow fallback kernels here.

    Auto is mixed float16 on a GPU, mixed bfloat16 on a CPU with AVX512-BF16 or AMX, float32 elsewhere: on an
    AVX2-only CPU a mixed-bfloat16 step took 23.7 s against 1.1 s in float32 (oneDNN falls back to Eigen).
    """
    bf16_cpu = has_bfloat16(flags)
    if requested == "auto":
        return ("mixed_float16" if gpus else "mixed_bfloat16" if bf16_cpu else "float32"), None
    if requested == "mixed_bfloat16" and not gpus and not bf16_cpu:
        return requested, ("this CPU has no bfloat16 instructions (AVX512-BF16 or AMX): mixed_bfloat16 runs on "
                           "fallback kernels, about 20x slower a step than float32; --precision auto trains in "
                           "float32 here")
    return requested, None


def setup_devices(precision: str = "auto") -> tuple[str, str]:
    """Memory growth, and the dtype policy to train in (set by fit_network). Returns (description, policy)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    precision, warning = training_precision(precision, gpus, cpu_flags())
    if warning:
        print(f"warning: {warning}", flush=True)
    if gpus:
        return f"{len(gpus)} GPU(s): " + ", ".join(g.name for g in gpus), precision
    return f"CPU: {cpu_description()}", precision


class EpochLog:
    """Per-epoch line with duration, time since `started` and ETA, and the history kept for the card.

    The time since start shows what the epochs' own durations leave out (start-up, work between epochs)."""

    def __new__(cls, total_epochs: int, history: list[dict], state_path: Path, label: str = "", later_epochs: int = 0,
                started: float | None = None):
        started = time.time() if started is None else started
        import keras

        class _Log(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t0 = time.time()

            def on_epoch_end(self, epoch, logs=None):
                dt = time.time() - self.t0
                row = {"epoch": epoch + 1, "seconds": round(dt, 1), **{k: float(v) for k, v in (logs or {}).items()}}
                history[:] = [h for h in history if h["epoch"] < epoch + 1] + [row]
                state_path.write_text(json.dumps({"history": history}))
                eta = dt * (total_epochs - epoch - 1 + later_epochs)
                print(
                    f"{label}epoch {epoch + 1}/{total_epochs}  {dt:5.1f}s  loss {row['loss']:.4f}  acc {row['accuracy']:.4f}  "
                    f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  "
                    f"at {(time.time() - started) / 60:.1f} min  ETA {eta / 60:.1f} min",
                    flush=True,
                )

        return _Log()


def recalibrate_batchnorm(model, x_train: np.ndarray, batch_size: int = 128) -> None:
    """Replace every BatchNorm layer's moving statistics by their exact average over the clean training split.

    The moving averages are taken over augmented batches while weights still change; measured on the
    validation split, they cost about a point of accuracy against the statistics of un-augmented scans.
    """
    import keras

    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in norms]
    for layer in norms:
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, np.float32))
        layer.moving_variance.assign(np.ones(layer.moving_variance.shape, np.float32))
    for k, start in enumerate(range(0, len(x_train), batch_size)):
        for layer in norms:
            layer.momentum = k / (k + 1)  # running mean of the per-batch statistics
        model(x_train[start : start + batch_size], training=True)
    for layer, momentum in zip(norms, saved):
        layer.momentum = momentum


class KeepFinalWeights:
    """Keeps the raw weights of the last epoch: fit() swaps in the weight average before on_train_end."""

    def __new__(cls, total_epochs: int, store: dict):
        import keras

        class _Keep(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch + 1 == total_epochs:
                    store["final"] = self.model.get_weights()

        return _Keep()


def clean_epochs(augmenting, epochs: int, clean: int):
    """A callback that turns full augmentation off (flips only) for the last `clean` of `epochs` epochs."""
    import keras

    return keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs=None: augmenting.assign(epoch < epochs - clean))


def served_explainer(model, mirror: bool):
    """The model as a worker serves it (with or without its mirror); it follows later changes to the weights."""
    from training.architecture import GRADCAM_LAYER
    from vision.gradcam import Explainer

    return Explainer(model, GRADCAM_LAYER, mirror=mirror)


def explained_probabilities(explainer, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """The explainer's probabilities for x, in batches."""
    return np.concatenate([explainer.forward(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def served_probabilities(model, x: np.ndarray, mirror: bool, batch_size: int = 128) -> np.ndarray:
    """The probabilities a worker serves for x: with `mirror`, of each scan's mean with its left-right mirror."""
    return explained_probabilities(served_explainer(model, mirror), x, batch_size)


def explained_accuracy(explainer, x, y) -> float:
    """Share of x the explainer classifies as y."""
    return float((explained_probabilities(explainer, x).argmax(axis=1) == y).mean())


def accuracy(model, x, y, mirror: bool = False) -> float:
    """Share of x the model, served with or without its mirror, classifies as y."""
    return explained_accuracy(served_explainer(model, mirror), x, y)


def choose_weights(model, candidates: dict, x_train, x_val, y_val, mirror: bool = False) -> tuple[str, dict]:
    """Recalibrate each candidate's batch norm and keep the one most accurate on validation as served (ties: first)."""
    explainer = served_explainer(model, mirror)  # one traced pass for every candidate: they only swap weights
    scores, best = {}, None
    for name, weights in candidates.items():
        model.set_weights(weights)
        before = explained_accuracy(explainer, x_val, y_val)
        recalibrate_batchnorm(model, x_train)
        scores[name] = {"before_bn_recalibration": before,
                        "after_bn_recalibration": explained_accuracy(explainer, x_val, y_val)}
        print(f"weights '{name}': validation accuracy {before:.4f} -> {scores[name]['after_bn_recalibration']:.4f} "
              "with batch-norm statistics of the un-augmented training split", flush=True)
        if best is None or scores[name]["after_bn_recalibration"] > scores[best[0]]["after_bn_recalibration"]:
            best = (name, model.get_weights())
    model.set_weights(best[1])
    return best[0], scores


def float32_copy(model, size: int, stages):
    """The same network and weights in float32: what the worker serves, whatever precision trained it."""
    import keras

    from training.architecture import build_model, pooling_of

    keras.mixed_precision.set_global_policy("float32")
    served = build_model(size, model.output.shape[-1], stages=stages, pool=pooling_of(model))
    served.set_weights(model.get_weights())
    return served


class Interrupts:
    """Turns SIGINT and SIGTERM into KeyboardInterrupt, held back while an epoch's checkpoints are written.

    A signal that lands between the backup and the history of one epoch would leave them disagreeing on
    how far training got, so --resume would skip or repeat an epoch; the epoch-end callbacks run as a unit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.writing = self.pending = False

    def handle(self, signum, frame):
        if self.writing:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def around(self, callbacks: list) -> list:
        """The callbacks, bracketed so that a signal during their on_epoch_end takes effect after it."""
        import keras

        def begin(epoch, logs=None):
            self.writing = True

        def end(epoch, logs=None):
            self.writing = False
            if self.pending:
                raise KeyboardInterrupt

        return [keras.callbacks.LambdaCallback(on_epoch_end=begin), *callbacks,
                keras.callbacks.LambdaCallback(on_epoch_end=end)]

    def __enter__(self):
        self.previous = [signal.signal(s, self.handle) for s in self.SIGNALS]
        return self

    def __exit__(self, *exc):
        for s, previous in zip(self.SIGNALS, self.previous):
            signal.signal(s, previous)


@dataclass
class Prepared:
    """The split and its preprocessed arrays, made once for every network of a run."""

    train_ex: list
    val_ex: list
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    twins: tuple | None = None  # (arrays, mask) of downsized copies of the training scans, with --downsize
    repeats: np.ndarray | None = None  # times each training scan is shown per epoch, with --oversample/--balance
    soft: tuple | None = None  # (training, validation) logits of the --teacher
    erased: tuple | None = None  # (arrays, labels, counts) of --erase-lesions, shown once per epoch after the rest

    def epoch_arrays(self) -> tuple:
        """Training arrays, labels, twins and teacher logits with every scan repeated as often as it is shown
        per epoch, then the --erase-lesions scans (which have no downsized twin)."""
        x, y, twins, soft = self.x_train, self.y_train, self.twins, self.soft
        if self.repeats is not None:
            idx = np.repeat(np.arange(len(x)), self.repeats)
            twins = (twins[0][idx], twins[1][idx]) if twins else None
            soft = (soft[0][idx], soft[1]) if soft else None
            x, y = x[idx], y[idx]
        if self.erased is None:
            return x, y, twins, soft
        arrays, labels, _ = self.erased
        if twins:
            twins = (np.concatenate([twins[0], arrays]), np.concatenate([twins[1], np.zeros(len(arrays), bool)]))
        return np.concatenate([x, arrays]), np.concatenate([y, labels]), twins, soft


@dataclass
class Network:
    """One trained network in float32 with what the card says about it."""

    model: object
    seed: int
    history: list
    weights: dict
    earlier_seconds: float = 0.0  # training time spent by earlier processes that --resume continues


def split_seed(cfg: TrainConfig) -> int:
    """The seed that picks the validation split: --split-seed, else --seed."""
    return cfg.seed if cfg.split_seed is None else cfg.split_seed


def prepare(cfg: TrainConfig, params: dict) -> Prepared:
    """Deduplicate, split by the split seed and load the cached arrays."""
    examples = tdata.labelled_examples(Path(cfg.data_root))
    train_ex, val_ex = tdata.split(examples, cfg.val_fraction, split_seed(cfg))
    t0 = time.time()
    x_train = tdata.cached_arrays(train_ex, params, cfg.cache_dir)
    x_val = tdata.cached_arrays(val_ex, params, cfg.cache_dir)
    twins = tdata.downsized_twins(train_ex, params, cfg.cache_dir, cfg.seed) if cfg.downsize > 0 else None
    print(f"data: {len(train_ex)} train, {len(val_ex)} validation scans (deduplicated), "
          + (f"{int(twins[1].sum())} with a downsized twin, " if twins else "")
          + f"preprocessed in {time.time() - t0:.0f}s", flush=True)
    y_train = tdata.label_indices(train_ex)
    repeats = tdata.rare_source_repeats(train_ex, cfg.oversample) if cfg.oversample > 1 else None
    if repeats is not None:
        print(f"oversampling {int((repeats > 1).sum())} scans of their class's rare size group x{cfg.oversample}",
              flush=True)
    if cfg.balance > 1:
        repeats = (repeats if repeats is not None else 1) * intensity_repeats(cfg, train_ex, x_train, y_train, params)
    soft = None
    if cfg.teacher:
        t0 = time.time()
        soft = tuple(distil.teacher_logits(cfg.teacher, params, {e.sha256 for e in val_ex}, x_train, x_val))
        print(f"teacher {cfg.teacher}: logits of {len(x_train)} training and {len(x_val)} validation scans in "
              f"{time.time() - t0:.0f}s", flush=True)
    erased = lesion_free(cfg, train_ex, x_train, y_train) if cfg.erase_lesions else None
    return Prepared(train_ex, val_ex, x_train, y_train, x_val, tdata.label_indices(val_ex), twins, repeats, soft,
                    erased)


def lesion_free(cfg: TrainConfig, train_ex: list, x_train: np.ndarray, y_train: np.ndarray) -> tuple:
    """--erase-lesions: (arrays, labels, counts) from training.lesions.erased_scans with --init's map, as served."""
    from training.lesions import erased_scans
    from vision.modelio import load_model

    if cfg.init is None:
        raise ValueError("--erase-lesions finds each lesion with a trained model's map: give it as --init")
    if cfg.teacher:
        raise ValueError("--erase-lesions scans have no teacher logits: use one or the other")
    t0 = time.time()
    init = load_model(Path(cfg.init))
    explainer = served_explainer(init.keras_model, bool(init.card.get("mirror")))
    x, y, counts = erased_scans(x_train, y_train, train_ex, explainer, list(CLASSES), cfg.erase_lesions, cfg.seed)
    print(f"erased the lesion of {counts['lesion_erased']} of {counts['sure']} figshare meningioma and pituitary "
          f"scans (labelled notumor) and a region of {counts['controls']} others in {time.time() - t0:.0f}s",
          flush=True)
    return x, y, counts


def intensity_repeats(cfg: TrainConfig, train_ex: list, x_train: np.ndarray, labels: np.ndarray,
                      params: dict) -> np.ndarray:
    """data.balanced_repeats over intensity groups of the percentile-scaled scans (equalised ones all share one
    histogram), printed as a class x group table."""
    scaled = x_train if not params.get("equalise") else tdata.cached_arrays(
        train_ex, {k: v for k, v in params.items() if k != "equalise"}, cfg.cache_dir)
    groups = tdata.intensity_groups(scaled, seed=cfg.seed)
    repeats = tdata.balanced_repeats(labels, groups, cfg.balance)
    for c, name in enumerate(CLASSES):
        cells = [(labels == c) & (groups == g) for g in range(tdata.INTENSITY_GROUPS)]
        shown = " ".join(f"{int(m.sum())}x{int(repeats[m].max(initial=0))}" for m in cells)
        print(f"intensity groups (scans x repeats), {name}: {shown}", flush=True)
    return repeats


def fit_network(cfg: TrainConfig, data: Prepared, seed: int, work: Path, policy: str, stages,
                label: str = "", later_epochs: int = 0) -> Network:
    """Train one network (init and augmentation from `seed`), checkpointed in `work`; a finished one is reused
    by --resume."""
    import keras
    import tensorflow as tf

    from training.architecture import build_model

    work.mkdir(parents=True, exist_ok=True)
    finished, state_path = work / "network.keras", work / "history.json"
    if cfg.resume and finished.exists():
        state = json.loads(state_path.read_text())
        print(f"{label}already trained: {finished}", flush=True)
        return Network(keras.saving.load_model(finished, compile=False), seed, state["history"], state["weights"],
                       state["seconds"])
    t0 = time.time()
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(seed)
    x_train, y_train, twins, soft = data.epoch_arrays()
    batch_size = min(cfg.batch_size, len(x_train))  # a tiny data set still makes one batch per epoch
    augmenting = tf.Variable(True, trainable=False)
    train_ds, val_ds = tdata.datasets(x_train, y_train, data.x_val, data.y_val, batch_size, seed,
                                      len(CLASSES), gamma=cfg.gamma, invert=cfg.invert, augmenting=augmenting,
                                      twins=twins, downsize=cfg.downsize, gin=cfg.gin, soft=soft,
                                      rim=cfg.rim_erase, mix=cfg.cutmix)
    model = build_model(cfg.size, len(CLASSES), stages=stages, pool=cfg.pool)
    if cfg.init:
        start_from(model, cfg.init)
    fitted = fitted_model(model, cfg)
    compile_network(fitted, cfg, (len(x_train) // batch_size) * cfg.epochs)
    kept: dict = {}
    history: list[dict] = []
    if cfg.resume and state_path.exists():
        # Epochs of an earlier process, marked so the card's wall time can count them.
        history = [dict(row, resumed=True) for row in json.loads(state_path.read_text())["history"]]
    else:
        # A fresh run must not pick up an old run's backup.
        shutil.rmtree(work / "backup", ignore_errors=True)
        finished.unlink(missing_ok=True)
    interrupts = Interrupts()
    callbacks = interrupts.around([
        keras.callbacks.BackupAndRestore(str(work / "backup"), save_freq="epoch", delete_checkpoint=False),
        EpochLog(cfg.epochs, history, state_path, label, later_epochs, started=t0),
        # The served model (probabilities), whichever of its outputs the loss reads.
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs=None: model.save(work / "last.keras")),
        KeepFinalWeights(cfg.epochs, kept),
        clean_epochs(augmenting, cfg.epochs, cfg.clean_epochs),
    ])
    try:
        with interrupts:
            fitted.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=callbacks, verbose=0)
    except KeyboardInterrupt:
        print(f"interrupted: the last finished epoch is checkpointed in {work}; continue with --resume", flush=True)
        raise

    # fit() has swapped in the weight average; the last epoch's own weights are the other candidate.
    candidates = {"weight_average": model.get_weights(), **kept} if cfg.ema_momentum > 0 else {"final": model.get_weights()}
    # Recalibrate and choose in float32, as the worker serves it: bfloat16 statistics cost a scan or two.
    model = float32_copy(model, cfg.size, stages)
    chosen, scores = choose_weights(model, candidates, data.x_train, data.x_val, data.y_val, cfg.mirror)
    weights = {"kept": chosen, "candidates": scores,
               "note": "candidates are the last epoch's weights and their exponential moving average; "
                       "each gets batch-norm statistics recomputed on the un-augmented training split and "
                       "the more accurate on the validation split, as served, is kept"}
    model.save(finished)
    earlier = sum(row["seconds"] for row in history if row.get("resumed"))
    state_path.write_text(json.dumps({"history": history, "weights": weights, "seconds": earlier + time.time() - t0}))
    return Network(model, seed, history, weights, earlier)


def logistic(cfg: TrainConfig) -> bool:
    """Whether the run learns one logistic loss per class on the logits (--pool cells, --cell-loss logistic or both)."""
    return cfg.pool == "cells" and cfg.cell_loss in ("logistic", "both")


def cells_loss(kind: str, label_smoothing: float):
    """The loss on the logits of a --pool cells run: one logistic loss per class, or with `both` that summed over
    the classes plus softmax cross-entropy (each class's logistic term keeps its best cell low on other classes'
    scans, which softmax alone never asks; softmax ranks the classes, which is what accuracy counts)."""
    import keras

    binary = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=label_smoothing)
    if kind == "logistic":
        return binary
    softmax = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing)

    def both(y_true, logits):
        # BinaryCrossentropy averages over the classes: times their count, each class weighs as in a sum.
        return softmax(y_true, logits) + binary(y_true, logits) * keras.ops.cast(keras.ops.shape(logits)[-1], "float32")

    return both


def fitted_model(model, cfg: TrainConfig):
    """What fit() trains: the model itself, or with --pool cells the same layers ending at the logits, which one
    logistic loss per class reads (Oquab et al. 2015)."""
    import keras

    if not logistic(cfg):
        return model
    if cfg.teacher:
        from vision.errors import ModelError

        raise ModelError("--pool cells learns one logistic loss per class, not a teacher's softmax: use one or the other")
    return keras.Model(model.inputs, model.get_layer("logits").output)


def compile_network(model, cfg: TrainConfig, steps: int) -> None:
    """AdamW with weight decay and a weight average, warm-up then cosine over `steps`, label-smoothed loss
    (with a --teacher, the distillation loss; with --pool cells, one logistic loss per class on the logits)."""
    import keras

    classes = model.output.shape[-1]
    if logistic(cfg):
        loss = cells_loss(cfg.cell_loss, cfg.label_smoothing)
        metric = keras.metrics.CategoricalAccuracy(name="accuracy")
    elif cfg.teacher:
        loss = distil.distillation_loss(classes, cfg.distil_temperature, cfg.distil_weight, cfg.label_smoothing)
        metric = distil.label_accuracy(classes)
    else:
        loss, metric = keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing), "accuracy"
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps, warmup_target=cfg.learning_rate, warmup_steps=max(1, steps // 20)
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay, use_ema=cfg.ema_momentum > 0,
                                         ema_momentum=cfg.ema_momentum or 0.99),
        loss=loss,
        metrics=[metric],
    )


def start_from(model, init: Path) -> None:
    """Load the weights of the trained model at `init` into `model`; ModelError when the two differ in shape."""
    from vision.errors import ModelError
    from vision.modelio import load_model

    source = load_model(Path(init)).keras_model
    shapes = [w.shape for w in model.get_weights()]
    if [w.shape for w in source.get_weights()] != shapes:
        raise ModelError(f"{init}: its layers differ from this run's network (same --size and --width, one tower)")
    model.set_weights(source.get_weights())


def init_fields(init: Path | None) -> dict:
    """What the card says about the model a fine-tuning run started from."""
    if not init:
        return {}
    card = json.loads(Path(init).with_suffix(".json").read_text())
    return {"init_model": {"model": str(init), "sha256": card.get("sha256"),
                           "training_command": card.get("training_command"),
                           "validation_accuracy": card["validation"]["accuracy"],
                           "wall_time_seconds": card["wall_time_seconds"]}}


TOWERS_NOTE = "each tower is a network trained alone; the model's logits are the mean of theirs"


def tower_history(histories: list[list[dict]]) -> list[dict]:
    """The towers' per-epoch rows one after another, each marked with its tower (1-based)."""
    return [dict(row, tower=k + 1) for k, rows in enumerate(histories) for row in rows]


def train(cfg: TrainConfig) -> dict:
    """Run a full training; returns the model card. Ctrl-C leaves a resumable checkpoint."""
    import keras

    # Training switches Keras' process-wide dtype policy; a run that fails or is interrupted must not leave
    # later models of the process (a worker's, a test's) built in bfloat16.
    before = keras.mixed_precision.global_policy().name
    try:
        return _train(cfg)
    finally:
        keras.mixed_precision.set_global_policy(before)


def _train(cfg: TrainConfig) -> dict:
    t_start = time.time()
    hardware, policy = setup_devices(cfg.precision)
    import keras

    from training.architecture import merge_towers, stages_for

    stages = cfg.stages or stages_for(cfg.width, cfg.dilate, cfg.convs)  # a bad shape fails before the data loads
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}-training"
    params = dict(DEFAULTS, size=cfg.size, **({"equalise": True} if cfg.equalise else {}))
    data = prepare(cfg, params)
    train_ex, val_ex, x_val, y_val = data.train_ex, data.val_ex, data.x_val, data.y_val

    networks = []
    for k in range(cfg.towers):
        label = f"tower {k + 1}/{cfg.towers} " if cfg.towers > 1 else ""
        where = work / f"tower{k + 1}" if cfg.towers > 1 else work
        networks.append(fit_network(cfg, data, cfg.seed + k, where, policy, stages, label,
                                    cfg.epochs * (cfg.towers - k - 1)))
    keras.mixed_precision.set_global_policy("float32")
    if cfg.towers == 1:
        model, history, weights = networks[0].model, networks[0].history, networks[0].weights
    else:
        model = merge_towers([n.model for n in networks], cfg.size, stages)
        history = tower_history([n.history for n in networks])
        weights = {"towers": [dict(n.weights, seed=n.seed,
                                   validation_accuracy=accuracy(n.model, x_val, y_val, cfg.mirror))
                              for n in networks],
                   "note": TOWERS_NOTE}
    chosen = weights.get("kept", "per tower")
    probs = served_probabilities(model, x_val, cfg.mirror)
    print(f"kept weights '{chosen}' ({policy} training, served in float32{' with its mirror' * cfg.mirror}): "
          f"validation accuracy "
          f"{float((probs.argmax(axis=1) == y_val).mean()):.4f}", flush=True)
    pred = [CLASSES[i] for i in probs.argmax(axis=1)]
    val_metrics = classification_metrics([e.label for e in val_ex], pred, probs, list(CLASSES))
    unseen_metrics = without_near_copies(val_ex, pred, probs, x_val, data.x_train)
    card = {
        "name": out.name,
        "classes": list(CLASSES),
        "input_size": cfg.size,
        "preprocessing": params,
        **model_fields(model),
        "mirror": cfg.mirror,
        "training_command": cfg.command,
        "seed": cfg.seed,
        "split_seed": split_seed(cfg),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items() if k != "command"},
                   "stages": stages},
        "train_sha256": [e.sha256 for e in train_ex],
        "validation_sha256": [e.sha256 for e in val_ex],
        "history": history,
        "validation": val_metrics,
        "validation_without_near_copies": unseen_metrics,
        "towers": cfg.towers,
        "weights": weights,
        "training_precision": policy,
        # With --resume, this includes the epochs (or whole towers) that earlier processes trained.
        "wall_time_seconds": round(time.time() - t_start + sum(n.earlier_seconds for n in networks), 1),
        "hardware": hardware,
        "keras_version": keras.__version__,
        **init_fields(cfg.init),
        **({"lesion_erase": data.erased[2]} if data.erased else {}),
        **(distil.teacher_fields(cfg.teacher, cfg.distil_temperature, cfg.distil_weight) if cfg.teacher else {}),
    }
    # The model it started from, or learnt from, is part of this one's training cost.
    for source in ("init_model", "teacher"):
        if source in card:
            card["wall_time_seconds"] = round(card["wall_time_seconds"] + card[source]["wall_time_seconds"], 1)
    return write_outputs(model, out, card)


def without_near_copies(val_ex: list, pred: list[str], probs: np.ndarray, x_val: np.ndarray,
                        x_train: np.ndarray) -> dict:
    """Validation metrics on the scans with no near-copy among the training scans (training.near_copies)."""
    novel = nearest_correlation(x_val, x_train) < NEAR_COPY
    keep = np.flatnonzero(novel)
    metrics = classification_metrics([val_ex[i].label for i in keep], [pred[i] for i in keep], probs[keep],
                                      list(CLASSES))
    accuracy_text = "n/a" if metrics["accuracy"] is None else f"{metrics['accuracy']:.4f}"
    print(f"validation without near-copies of training scans (thumbnail correlation >= {NEAR_COPY}): "
          f"{len(keep)} of {len(val_ex)} scans, accuracy {accuracy_text}", flush=True)
    return {"near_copy_correlation": NEAR_COPY, "scans": int(len(keep)), "near_copies": int(len(val_ex) - len(keep)),
            **metrics}


def model_fields(model) -> dict:
    """The card's fields read off the model itself: Grad-CAM layer and grid, logits layer, size, FLOPs."""
    from training.architecture import GRADCAM_LAYER, flops_per_scan, pooling_of

    return {
        "gradcam_layer": GRADCAM_LAYER,
        "gradcam_resolution": list(model.get_layer(GRADCAM_LAYER).output.shape[1:3]),
        "gradcam_note": (
            "Grad-CAM is read at the last conv block (1/8 of the input: 20x20 at 160 px), the finest grid "
            "whose units still see most of the head. Maps are upsampled bilinearly over the square head crop "
            "and pasted back at the crop's place on the scan's own pixel grid, zero outside it. In a "
            "multi-tower model the layer concatenates the towers' last blocks, so the map is their mean."
            + (" The head scores every cell (pooling 'cells'), so the map is the predicted class's own score "
               "map and its peak the cell that gave the class its logit." if pooling_of(model) == "cells" else "")
        ),
        "logits_layer": "logits",
        "pooling": pooling_of(model),
        "parameters": int(model.count_params()),
        "flops_per_scan": flops_per_scan(model),
    }


def write_outputs(model, out: Path, card: dict) -> dict:
    """Save OUT.keras, its card (stamped with the file's SHA-256), OUT-curves.png and OUT-confusion.png."""
    from training.plots import plot_confusion, plot_curves
    from vision.modelio import write_card

    model_path = out.with_suffix(".keras")
    model.save(model_path)
    card = write_card(model_path, card)
    plot_curves(card["history"], out.parent / f"{out.name}-curves.png")
    plot_confusion(card["validation"]["confusion_matrix"]["matrix"], card["classes"],
                   out.parent / f"{out.name}-confusion.png")
    return card

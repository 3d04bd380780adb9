"""Training data: class folders → deduplicated, stratified split → cached preprocessed arrays → tf.data."""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from jobs import sources
from jobs.labels import CLASSES, label_from_path
from jobs.scanning import find_scans
from vision.preprocess import prepare_bytes


@dataclass
class Example:
    path: Path  # root / relpath: a real file only when root is a folder
    sha256: str
    label: str
    root: str = ""  # the folder or ZIP archive, and the scan's relpath in it (with a DICOM frame suffix)
    relpath: str = ""


class DataError(Exception):
    """Training data that cannot be used (no labelled scans, a class missing, contradicting labels)."""


def labelled_examples(root: Path) -> list[Example]:
    """Every scan under root (a folder or ZIP archive) with a class folder, deduplicated by content
    (first path wins)."""
    by_hash: dict[str, Example] = {}
    conflicts = []
    for scan in find_scans(root):
        label = label_from_path(scan.relpath)
        if label is None or not scan.sha256:
            continue
        prior = by_hash.get(scan.sha256)
        if prior is None:
            by_hash[scan.sha256] = Example(Path(root) / scan.relpath, scan.sha256, label, str(root), scan.relpath)
        elif prior.label != label:
            conflicts.append(scan.sha256)
    for sha in conflicts:  # the same bytes under two classes cannot teach either
        by_hash.pop(sha, None)
    examples = sorted(by_hash.values(), key=lambda e: e.sha256)
    missing = set(CLASSES) - {e.label for e in examples}
    if not examples:
        raise DataError(f"{root}: no scans in class folders ({', '.join(CLASSES)})")
    if missing and len(examples) >= len(CLASSES):
        raise DataError(f"{root}: no scans for class(es) {', '.join(sorted(missing))}")
    return examples


def split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Stratified split by label; deterministic for a seed; a hash is never in both parts."""
    labels = [e.label for e in examples]
    counts = {c: labels.count(c) for c in set(labels)}
    stratify = labels if min(counts.values()) >= 2 and len(examples) * val_fraction >= len(counts) else None
    train, val = train_test_split(examples, test_size=val_fraction, random_state=seed, stratify=stratify)
    return sorted(train, key=lambda e: e.sha256), sorted(val, key=lambda e: e.sha256)


def _cached_rows(examples: list[Example], folder: Path, size: int, work, extra: tuple,
                 workers: int) -> tuple[np.ndarray, np.ndarray]:
    """`work(source + (sha256,) + extra)` for each example, computed once and cached in folder by content hash;
    returns the arrays and a mask of the examples whose result was not None (their rows stay zero)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = np.zeros((len(examples), size, size, 1), dtype=np.float32)
    present = np.zeros(len(examples), dtype=bool)
    todo = []
    for i, ex in enumerate(examples):
        f = folder / f"{ex.sha256}.npy"
        if not f.exists():
            todo.append(i)
        elif (arr := np.load(f)).ndim == 3:  # a 0-d array records a None
            out[i], present[i] = arr, True
    if todo:
        # spawn, not fork: TensorFlow may already be loaded in this process.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [_source(examples[i]) + (examples[i].sha256,) + extra for i in todo]
            for i, arr in zip(todo, pool.map(work, jobs, chunksize=32)):
                if arr is not None:
                    out[i], present[i] = arr, True
                np.save(folder / f"{examples[i].sha256}.npy", arr if arr is not None else np.zeros(()))
    return out, present


def _cache_folder(cache_dir: Path, prefix: str, params: dict, **extra) -> Path:
    # float32, as inference sees them: the cache must not round what the model trains on.
    key = hashlib.sha256(json.dumps({**params, "dtype": "float32", **extra}, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"{prefix}-{key[:12]}"


def scan_array(root, relpath: str, params: dict) -> np.ndarray:
    """The array the model sees for one scan of a folder or archive, as inference prepares it."""
    data, frame = sources.load(root, relpath)  # a frame of a multi-frame DICOM object decodes alone
    return prepare_bytes(data, params, frame=frame).array


def _prepare(args):
    root, relpath, _, params = args
    return scan_array(root, relpath, params)


def cached_arrays(examples: list[Example], params: dict, cache_dir: Path, workers: int = 2) -> np.ndarray:
    """Preprocessed arrays for examples, decoded once and cached by content hash and parameters."""
    folder = _cache_folder(cache_dir, "prep", params)
    return _cached_rows(examples, folder, params["size"], _prepare, (params,), workers)[0]


# The small scans of the data set (mostly notumor) are 200-300 px JPEGs; a large scan is shown as one of them.
SMALL_SIDES = (200, 301)
SMALL_QUALITY = (70, 96)


def _downsized(args):
    root, relpath, sha256, params, seed, min_side = args
    from vision.decode import decode

    data, frame = sources.load(root, relpath)
    gray = decode(data, frame=frame)
    h, w = gray.shape
    if min(h, w) < min_side:
        return None
    rng = np.random.default_rng([int(sha256[:16], 16), seed])
    side, quality = int(rng.integers(*SMALL_SIDES)), int(rng.integers(*SMALL_QUALITY))
    image = Image.fromarray(np.round(gray * 255).astype(np.uint8), mode="L")
    image = image.resize((round(w * side / min(h, w)), round(h * side / min(h, w))), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return prepare_bytes(buffer.getvalue(), params).array


def downsized_twins(examples: list[Example], params: dict, cache_dir: Path, seed: int, min_side: int = 300,
                    workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Each scan with a short side >= min_side preprocessed again from a downsized JPEG copy of itself, as the
    small sources look (short side 200-300 px, quality 70-95, drawn from its hash and seed), and a mask of
    the scans that have one; the others' rows are zero. Cached like cached_arrays."""
    folder = _cache_folder(cache_dir, "small", params, seed=seed, min_side=min_side, sides=SMALL_SIDES,
                           quality=SMALL_QUALITY)
    return _cached_rows(examples, folder, params["size"], _downsized, (params, seed, min_side), workers)


def stored_size(ex: Example) -> tuple[int, int] | None:
    """Width and height in pixels of a scan's stored image, in a folder or an archive (None where Pillow cannot
    read it, as for DICOM)."""
    data, _ = sources.load(*_source(ex))
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # any unreadable header just means "no size"
        return None


def short_side(ex: Example) -> int:
    """The short side in pixels of a scan's stored image (0 where it has none: left out of the small group)."""
    size = stored_size(ex)
    return min(size) if size else 0


def rare_source_repeats(examples: list[Example], factor: int, min_side: int = 300, rare: float = 0.25) -> np.ndarray:
    """How often each training scan is shown per epoch: `factor` times for a scan whose size group (short side
    below min_side or not, the trace of the source it came from) holds under `rare` of its class, else once."""
    small = np.array([0 < short_side(e) < min_side for e in examples])
    labels = np.array([e.label for e in examples])
    repeats = np.ones(len(examples), dtype=np.int64)
    for label in set(labels.tolist()):
        for group in (small, ~small):
            members = (labels == label) & group
            if 0 < members.sum() < rare * (labels == label).sum():
                repeats[members] = factor
    return repeats


# k-means clusters of head histograms; at 6 (seed 1337) the T2-like cluster holds 255 notumor, 35 pituitary,
# 13 meningioma and 1 glioma training scans.
INTENSITY_GROUPS = 6


def intensity_groups(x: np.ndarray, groups: int = INTENSITY_GROUPS, seed: int = 0, head_level: float = 0.04,
                     bins: int = 16) -> np.ndarray:
    """Cluster scans by the intensity histogram of their head (k-means), a label-free proxy for the sequence
    or scanner (T1, T2, FLAIR, CT) a scan came from; x are percentile-scaled preprocessed arrays."""
    from sklearn.cluster import KMeans

    def histogram(scan):
        values = scan[scan > head_level]
        counts, _ = np.histogram(values, bins=bins, range=(head_level, 1.0))
        return counts / max(1, counts.sum())

    features = np.array([histogram(scan) for scan in x])
    return KMeans(groups, n_init=10, random_state=seed).fit_predict(features)


def balanced_repeats(labels: np.ndarray, groups: np.ndarray, cap: int) -> np.ndarray:
    """How often each scan is shown per epoch so that each (class, group) cell weighs about as much as its
    class's mean cell: the cell's inverse share, rounded, between 1 and cap."""
    repeats = np.ones(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        in_class = labels == label
        cells = [in_class & (groups == g) for g in np.unique(groups[in_class])]
        mean = in_class.sum() / len(cells)
        for members in cells:
            repeats[members] = int(np.clip(round(mean / members.sum()), 1, cap))
    return repeats


def _source(ex: Example) -> tuple[str, str]:
    # An Example made by hand (a path, no root) is a plain file.
    return (ex.root, ex.relpath) if ex.root else (str(ex.path.parent), ex.path.name)


def label_indices(examples: list[Example], classes=CLASSES) -> np.ndarray:
    return np.array([classes.index(e.label) for e in examples], dtype=np.int32)


def augmenter(seed: int):
    """Augmentation for axial slices: left-right flips, small rotations, shifts, zoom, brightness/contrast."""
    import keras
    from keras import layers

    # float32 whatever the training precision: augmentation is cheap and should not round the scans.
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed, dtype="float32", name="flip"),
            layers.RandomRotation(0.04, fill_mode="constant", seed=seed + 1, dtype="float32"),  # ±15°
            layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed + 2, dtype="float32"),
            layers.RandomZoom((-0.12, 0.12), fill_mode="constant", seed=seed + 3, dtype="float32"),
            layers.RandomContrast(0.2, seed=seed + 4, dtype="float32"),
            layers.RandomBrightness(0.1, value_range=(0.0, 1.0), seed=seed + 5, dtype="float32"),
        ],
        name="augment",
    )


def head_mask(x, head_level: float = 0.04, opening: int = 0):
    """1 on the head, 0 on the background: pixels above head_level, closed by a 9x9 max/min pool so that dark
    fluid, bone and sinuses inside the head belong to it; opened first by an `opening` pool when > 0, so that
    specks of JPEG noise in the background are dropped."""
    import tensorflow as tf

    head = tf.cast(x > head_level, x.dtype)
    if opening:
        head = tf.nn.max_pool2d(-tf.nn.max_pool2d(-head, opening, 1, "SAME"), opening, 1, "SAME")
    return -tf.nn.max_pool2d(-tf.nn.max_pool2d(head, 9, 1, "SAME"), 9, 1, "SAME")


def invert_head(x, head_level: float = 0.04):
    """Negative of the head (head_mask), background kept black: T1 fluid turns bright like T2 fluid, and T2
    like T1; fluid, bone and sinuses inside the head are inverted too rather than left as holes."""
    return head_mask(x, head_level) * (1.0 - x)


def grouped_conv(x, kernel):
    """Each scan of x (n, h, w, c_in) convolved ('SAME') with its own kernel (n, k, k, c_in, c_out).

    TensorFlow has no grouped convolution on CPUs, so the scans become the channels of one image and a
    depthwise convolution (one filter bank per channel) does the work; the c_in partial maps are then summed.
    """
    import tensorflow as tf

    n, h, w, c_in = tf.unstack(tf.shape(x))
    k, c_out = kernel.shape[1], kernel.shape[4]
    stacked = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, h, w, n * c_in])
    filters = tf.reshape(tf.transpose(kernel, [1, 2, 0, 3, 4]), [k, k, n * c_in, c_out])
    out = tf.nn.depthwise_conv2d(stacked, filters, [1, 1, 1, 1], "SAME")  # channel (scan, c_in, c_out)
    out = tf.reduce_sum(tf.reshape(out, [h, w, n, c_in, c_out]), axis=3)
    return tf.transpose(out, [2, 0, 1, 3])


def random_contrast(x, seed: int, layers: int = 4, channels: int = 2, head_level: float = 0.04):
    """Each scan through its own random shallow conv net, blended with itself: a new contrast, same anatomy.

    Global intensity non-linear augmentation (GIN, Ouyang et al., IEEE TMI 2022): 3x3 or 1x1 convolutions with
    weights and shifts drawn from N(0, 1) per scan, leaky ReLU between them. The result, scaled to [0, 1] over
    the head, is mixed with the scan by a weight drawn from U(0, 1), and the background is kept black so the crop
    cues stay as they were. A tumour thus appears in contrasts (T2-like, CT-like, inverted) that its class's
    sources never used.
    """
    import tensorflow as tf

    n = tf.shape(x)[0]
    # Opened, or specks of background noise would be rescaled into grey squares.
    head = head_mask(x, head_level, opening=5)
    y = x
    for i in range(layers):
        c_in, c_out = (1 if i == 0 else channels), (1 if i == layers - 1 else channels)
        kernel = tf.random.normal([n, 3, 3, c_in, c_out], seed=seed + 20 + i)
        # Half the layers, drawn per scan, keep only the centre tap: a pure intensity map, no texture.
        centre_only = tf.cast(tf.random.uniform([n, 1, 1, 1, 1], seed=seed + 30 + i) < 0.5, x.dtype)
        centre = tf.reshape(tf.one_hot(4, 9, dtype=x.dtype), [1, 3, 3, 1, 1])
        kernel = kernel * (centre_only * centre + (1.0 - centre_only))
        y = grouped_conv(y, kernel)
        y = y + tf.random.normal([n, 1, 1, c_out], seed=seed + 40 + i)
        if i < layers - 1:
            y = tf.nn.leaky_relu(y, 0.01)
    big = 1e9
    low = tf.reduce_min(y * head + big * (1.0 - head), axis=[1, 2, 3], keepdims=True)
    high = tf.reduce_max(y * head - big * (1.0 - head), axis=[1, 2, 3], keepdims=True)
    y = (y - low) / tf.maximum(high - low, 1e-6)
    alpha = tf.random.uniform([n, 1, 1, 1], seed=seed + 50)
    return head * tf.clip_by_value(alpha * y + (1.0 - alpha) * x, 0.0, 1.0)


RIM_RADII = (6, 10, 14)  # pixels at 160 px: about the skull and scalp, up to the outer cortex


def strip_rim(x, seed: int, head_level: float = 0.04):
    """Each scan with its head's outer rim blacked out, a rim of one of RIM_RADII drawn per scan.

    The rim is the skull, the scalp and the outer cortex. Where a class rests on how they look (their
    source's sequence and contrast agent), the Grad-CAM peak sits on them instead of on the lesion.
    """
    import tensorflow as tf

    head = head_mask(x, head_level, opening=5)
    # Padded with background, so a head that the crop cuts at the image's edge is eroded from that side too.
    eroded = tf.stack([-tf.nn.max_pool2d(-tf.pad(head, [[0, 0], [r, r], [r, r], [0, 0]]), 2 * r + 1, 1, "VALID")
                       for r in RIM_RADII], axis=0)
    pick = tf.random.uniform([tf.shape(x)[0]], 0, len(RIM_RADII), dtype=tf.int32, seed=seed)
    mask = tf.gather(tf.transpose(eroded, [1, 0, 2, 3, 4]), pick, batch_dims=1)
    return x * mask


def cutmix(x, labels, share: float, seed: int, head_level: float = 0.04):
    """A share of the scans of batch x with a box pasted in from the next scan of the batch, their labels mixed.

    CutMix (Yun et al., ICCV 2019), which with global pooling improves how well class maps localise: a scan
    holds two classes in known places, so evidence spread over the whole slice (its source's look) cannot say
    which class is where. The box covers a U(0, 1) share of the image; the labels are mixed by how much of the
    mixed scan's head each scan supplies, not by the box's area, since a box over the black background carries
    no class.
    """
    import tensorflow as tf

    n, side = tf.shape(x)[0], x.shape[1]
    other, other_labels = tf.roll(x, 1, axis=0), tf.roll(labels, 1, axis=0)
    cut = tf.sqrt(tf.random.uniform([n], seed=seed)) * side
    centre = tf.random.uniform([n, 2], 0, side, seed=seed + 1)
    grid = tf.cast(tf.range(side), x.dtype)
    rows = tf.abs(grid[None, :] - centre[:, :1]) < cut[:, None] / 2
    cols = tf.abs(grid[None, :] - centre[:, 1:]) < cut[:, None] / 2
    chosen = tf.random.uniform([n, 1, 1], seed=seed + 2) < share
    box = tf.cast(rows[:, :, None] & cols[:, None, :] & chosen, x.dtype)[..., None]
    mixed = x * (1.0 - box) + other * box
    kept = tf.reduce_sum(head_mask(x, head_level, opening=5) * (1.0 - box), axis=[1, 2, 3])
    pasted = tf.reduce_sum(head_mask(other, head_level, opening=5) * box, axis=[1, 2, 3])
    w = (pasted / tf.maximum(kept + pasted, 1.0))[:, None]
    return mixed, (1.0 - w) * labels + w * other_labels


def some_of(x, share: float, changed, seed: int):
    """A share of the scans of batch x, drawn at random, replaced by their rows in changed."""
    import tensorflow as tf

    chosen = tf.cast(tf.random.uniform([tf.shape(x)[0], 1, 1, 1], seed=seed) < share, x.dtype)
    return chosen * changed + (1.0 - chosen) * x


def pipeline_options():
    """tf.data options for the training pipeline: one private thread, no autotuning.

    A batch's augmentation takes about 22 ms against a 500 ms train step on 2 cores, so one thread keeps
    ahead of the model. With AUTOTUNE the pipeline took threads from the step: 490-589 ms a step against
    501-533 with one thread, and one stretch of 40 steps at 1,029 ms (bench/train_step.py).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.autotune.enabled = False
    return options


def datasets(x_train, y_train, x_val, y_val, batch_size: int, seed: int, classes: int, gamma: float = 0.0,
             invert: float = 0.0, augmenting=None, twins=None, downsize: float = 0.0, gin: float = 0.0,
             soft=None, rim: float = 0.0, mix: float = 0.0, autotune: bool = False):
    """tf.data pipelines: shuffled and augmented for training, plain for validation.

    The training pipeline runs on one private thread (pipeline_options); autotune=True maps batches in
    parallel on tf.data's shared pool under AUTOTUNE instead, as training did before, for bench/train_step.py.

    augmenting, a boolean tf.Variable, switches the training augmentation down to left-right flips while it
    is False (the clean last epochs), read as each batch is made.

    gamma > 0 raises each training scan to a power drawn log-uniformly from [e^-gamma, e^gamma]: it changes
    how grey and white matter, fluid and lesion compare, the cue that tells T1, T2 and CT sources apart.
    invert > 0 is the share of training scans shown as their negative (invert_head), so a tumour is seen in
    both contrasts whatever sequence its source used.
    gin > 0 is the share of training scans given a random contrast (random_contrast).
    rim > 0 is the share of training scans whose head's outer rim is blacked out (strip_rim).
    mix > 0 is the share of training scans with a box of another scan pasted in, labels mixed (cutmix); not
    with a teacher's logits, which belong to the unmixed scan.
    twins, (arrays, mask) from downsized_twins, with downsize > 0: that share of the training scans that have
    a twin are shown as it, so a tumour is also seen with the small sources' resolution and JPEG artefacts.
    soft, (train logits, validation logits) of a teacher (training.distil): each target row is the one-hot
    label followed by the scan's teacher logits.
    """
    import tensorflow as tf

    if mix > 0 and soft is not None:
        raise ValueError("cutmix mixes labels, not a teacher's logits: train with one or the other")
    aug = augmenter(seed)
    flip = aug.get_layer("flip")
    augmenting = tf.constant(True) if augmenting is None else augmenting

    def target(y, logits):
        return tf.one_hot(y, classes) if logits is None else tf.concat([tf.one_hot(y, classes), logits], axis=1)

    def train_map(row):
        x = tf.cast(row["x"], tf.float32)
        if "small" in row:
            chosen = tf.logical_and(row["has_small"], tf.random.uniform([tf.shape(x)[0]], seed=seed + 8) < downsize)
            x = tf.where(chosen[:, None, None, None], tf.cast(row["small"], tf.float32), x)
        x = tf.cond(augmenting, lambda: tf.clip_by_value(aug(x, training=True), 0.0, 1.0),
                    lambda: flip(x, training=True))
        if gamma > 0:
            power = tf.exp(tf.random.uniform([tf.shape(x)[0], 1, 1, 1], -gamma, gamma, seed=seed + 6))
            x = tf.pow(x, power)
        if invert > 0:
            x = some_of(x, invert, invert_head(x), seed + 7)
        if gin > 0:
            x = some_of(x, gin, random_contrast(x, seed), seed + 9)
        if rim > 0:
            x = some_of(x, rim, strip_rim(x, seed + 11), seed + 10)
        if mix > 0:
            return cutmix(x, target(row["y"], None), mix, seed + 12)
        return x, target(row["y"], row.get("soft"))

    def val_map(row):
        return tf.cast(row["x"], tf.float32), target(row["y"], row.get("soft"))

    rows = {"x": x_train, "y": y_train}
    if twins is not None and downsize > 0:
        rows.update(small=twins[0], has_small=twins[1])
    val_rows = {"x": x_val, "y": y_val}
    if soft is not None:
        rows["soft"], val_rows["soft"] = soft
    train = (
        tf.data.Dataset.from_tensor_slices(rows)
        .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size, drop_remainder=True)
        .map(train_map, num_parallel_calls=tf.data.AUTOTUNE if autotune else None)
        .prefetch(tf.data.AUTOTUNE if autotune else 2)
    )
    if not autotune:
        train = train.with_options(pipeline_options())
    val = tf.data.Dataset.from_tensor_slices(val_rows).batch(128).map(val_map).prefetch(2)
    return train, val

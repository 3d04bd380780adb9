"""Training data and the tiny training run: deterministic leak-free split, one preprocessing, a servable model."""
import json
import shutil

import numpy as np
import pytest

from training.data import cached_arrays, labelled_examples, split
from vision.preprocess import DEFAULTS, prepare_bytes
from vision.runtime import cpu_description
from tests.conftest import EXAMPLES


@pytest.fixture
def folder_with_duplicates(tmp_path):
    folder = tmp_path / "train"
    shutil.copytree(EXAMPLES, folder)
    for src in sorted(EXAMPLES.glob("*/*.jpg"))[::3]:
        shutil.copy(src, folder / src.parent.name / f"copy-of-{src.name}")
    return folder


def test_duplicates_are_removed_before_the_split(folder_with_duplicates):
    examples = labelled_examples(folder_with_duplicates)

    assert len(examples) == 16
    assert len({e.sha256 for e in examples}) == 16


def test_the_split_is_deterministic_for_a_seed_and_never_shares_a_hash(folder_with_duplicates):
    examples = labelled_examples(folder_with_duplicates)
    train_a, val_a = split(examples, 0.25, seed=7)
    train_b, val_b = split(examples, 0.25, seed=7)
    _, val_c = split(examples, 0.25, seed=8)

    assert [e.sha256 for e in val_a] == [e.sha256 for e in val_b]
    assert {e.sha256 for e in train_a} & {e.sha256 for e in val_a} == set()
    assert len(val_a) == 4 and sorted(e.label for e in val_a) == ["glioma", "meningioma", "notumor", "pituitary"]
    assert [e.sha256 for e in val_c] != [e.sha256 for e in val_a]


def test_the_split_seed_fixes_the_split_whatever_the_training_seed(tmp_path):
    from training.train import TrainConfig, prepare, split_seed

    params = dict(DEFAULTS, size=64)
    val_seed_7, val_seed_8 = (
        [e.sha256 for e in prepare(TrainConfig(EXAMPLES, tmp_path / "m", seed=seed, split_seed=7, val_fraction=0.25,
                                               cache_dir=tmp_path), params).val_ex]
        for seed in (7, 8))
    _, val_by_seed_8 = split(labelled_examples(EXAMPLES), 0.25, seed=8)

    assert val_seed_7 == val_seed_8
    assert val_seed_8 != [e.sha256 for e in val_by_seed_8]
    assert split_seed(TrainConfig(EXAMPLES, tmp_path / "m", seed=8)) == 8


def test_training_cache_holds_exactly_the_inference_arrays(tmp_path):
    examples = labelled_examples(EXAMPLES)
    cached = cached_arrays(examples, DEFAULTS, tmp_path)
    again = cached_arrays(examples, DEFAULTS, tmp_path)  # read back from the cache

    for ex, a, b in zip(examples, cached, again):
        expected = prepare_bytes(ex.path.read_bytes(), DEFAULTS).array
        np.testing.assert_array_equal(a, expected)
        np.testing.assert_array_equal(b, expected)


def test_an_average_pooled_training_says_so_in_its_card_and_is_served(tmp_path):
    from training.train import TrainConfig, train
    from vision.runtime import Runtime

    out = tmp_path / "gap"
    card = train(TrainConfig(EXAMPLES, out, epochs=1, size=64, val_fraction=0.25, pool="avg",
                             cache_dir=tmp_path / "cache", command="pytest average pooling"))
    probs, cams = Runtime(out.with_suffix(".keras"), precision="float32").explain(np.zeros((2, 64, 64, 1), np.float32))

    assert card["pooling"] == "avg"
    assert probs.shape == (2, 4) and cams.shape == (2, 8, 8)


def test_a_training_that_scores_every_cell_says_so_in_its_card_checkpoints_and_is_served(tmp_path):
    import keras

    from training.train import TrainConfig, train
    from vision.runtime import Runtime

    out = tmp_path / "cells"
    card = train(TrainConfig(EXAMPLES, out, epochs=1, size=64, val_fraction=0.25, pool="cells",
                             cache_dir=tmp_path / "cache", command="pytest cell scores"))
    last = keras.saving.load_model(tmp_path / ".cells-training" / "last.keras", compile=False)
    probs, cams = Runtime(out.with_suffix(".keras"), precision="float32").explain(np.zeros((2, 64, 64, 1), np.float32))

    assert card["pooling"] == "cells" and card["history"][0]["accuracy"] >= 0
    assert last.output.shape == (None, 4) and last.layers[-1].name == "probs"  # the checkpoint serves as it is
    assert probs.shape == (2, 4) and cams.shape == (2, 8, 8)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_a_training_that_scores_every_cell_refuses_a_teacher(tmp_path):
    from training.architecture import build_model
    from training.train import TrainConfig, fitted_model
    from vision.errors import ModelError

    cfg = TrainConfig(EXAMPLES, tmp_path / "x", pool="cells", teacher=tmp_path / "teacher.keras")

    with pytest.raises(ModelError, match="^--pool cells learns one logistic loss per class, not a teacher's softmax"):
        fitted_model(build_model(64, 4, pool="cells"), cfg)


def test_a_training_that_scores_every_cell_with_softmax_cross_entropy_fits_the_served_model(tmp_path):
    from training.architecture import build_model
    from training.train import TrainConfig, fitted_model

    model = build_model(64, 4, pool="cells")
    logistic = fitted_model(model, TrainConfig(EXAMPLES, tmp_path / "x", pool="cells"))

    assert fitted_model(model, TrainConfig(EXAMPLES, tmp_path / "x", pool="cells", cell_loss="softmax")) is model
    assert logistic is not model and logistic.output.shape == (None, 4) and logistic.layers[-1].name == "logits"
    both = fitted_model(model, TrainConfig(EXAMPLES, tmp_path / "x", pool="cells", cell_loss="both"))
    assert both is not model and both.output.shape == (None, 4)



def test_the_both_cell_loss_is_softmax_cross_entropy_plus_each_classs_logistic_loss():
    from training.train import cells_loss

    logits = np.array([[2.0, -1.0, 0.0, 0.5]], np.float32)
    target = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
    softmax = -np.log(np.exp(2.0) / np.exp(logits).sum())
    logistic = np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0)) + np.log1p(np.exp(0.0)) + np.log1p(np.exp(0.5))

    assert float(cells_loss("both", 0.0)(target, logits)) == pytest.approx(softmax + logistic, rel=1e-5)
    assert float(cells_loss("logistic", 0.0)(target, logits)) == pytest.approx(logistic / 4, rel=1e-5)

def test_the_served_explainer_follows_the_weights_set_after_it_was_built(tiny_model):
    from training.train import explained_probabilities, served_explainer, served_probabilities
    from vision.modelio import load_model

    model = load_model(tiny_model).keras_model
    card = json.loads(tiny_model.with_suffix(".json").read_text())
    arrays = np.stack([prepare_bytes(p.read_bytes(), card["preprocessing"]).array
                       for p in sorted(EXAMPLES.glob("*/*.jpg"))])
    explainer = served_explainer(model, mirror=True)
    before = explained_probabilities(explainer, arrays)
    model.get_layer("logits").set_weights([w * 3 for w in model.get_layer("logits").get_weights()])

    after = explained_probabilities(explainer, arrays)

    assert not np.allclose(after, before, atol=1e-3)
    np.testing.assert_allclose(after, served_probabilities(model, arrays, mirror=True), atol=1e-6)


def test_the_runtime_serves_the_mirror_mean_when_the_card_says_so_and_the_scan_alone_when_not(tiny_model, tmp_path):
    from vision.gradcam import Explainer
    from vision.modelio import load_model
    from vision.runtime import Runtime

    plain = tmp_path / "plain.keras"
    shutil.copy(tiny_model, plain)
    card = json.loads(tiny_model.with_suffix(".json").read_text())
    plain.with_suffix(".json").write_text(json.dumps(dict(card, mirror=False)))
    keras_model = load_model(tiny_model).keras_model
    arrays = np.stack([prepare_bytes(p.read_bytes(), card["preprocessing"]).array
                       for p in sorted(EXAMPLES.glob("*/*.jpg"))])

    for path, mirror in ((tiny_model, True), (plain, False)):
        probs, cams = Runtime(path, precision="float32").explain(arrays)
        want_probs, want_cams = Explainer(keras_model, card["gradcam_layer"], mirror=mirror)(arrays)
        np.testing.assert_allclose(probs, want_probs, atol=1e-5)
        np.testing.assert_allclose(cams, want_cams, atol=1e-5)


def test_tiny_training_writes_model_card_and_plots(tiny_model):
    card = json.loads(tiny_model.with_suffix(".json").read_text())

    assert card["classes"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert card["input_size"] == 64 and card["gradcam_layer"] == "gradcam_features"
    assert len(card["train_sha256"]) + len(card["validation_sha256"]) == 16
    assert set(card["train_sha256"]).isdisjoint(card["validation_sha256"])
    assert len(card["history"]) == 1 and card["training_command"] == "pytest tiny model"
    assert card["split_seed"] == card["seed"]
    assert card["pooling"] == "max" and card["config"]["width"] == 24  # the shipped recipe's defaults
    assert card["mirror"] is True
    assert card["hardware"] == f"CPU: {cpu_description()}"
    assert (tiny_model.parent / "tiny-curves.png").stat().st_size > 0
    assert (tiny_model.parent / "tiny-confusion.png").stat().st_size > 0


@pytest.mark.slow
def test_a_tiny_trained_model_is_served_by_the_local_workers(tiny_model, scan_folder, env_for):
    from jobs.lifecycle import new_job, run_job

    settings, _ = env_for(tiny_model)
    job_id = new_job(settings, scan_folder)
    p = run_job(settings, job_id)

    assert (p.total, p.done, p.failed, p.pending) == (18, 17, 1, 0)


@pytest.mark.slow
def test_ctrl_c_leaves_a_checkpoint_that_resume_continues(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    out = tmp_path / "m"
    cmd = [sys.executable, "cli.py", "train", str(EXAMPLES), "--out", str(out), "--epochs", "12", "--size", "64",
           "--val-fraction", "0.25"]
    env = {**__import__("os").environ, "BRAINSCAN_VAR": str(tmp_path / "var")}
    log = tmp_path / "first.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while b"epoch 3/12" not in log.read_bytes() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    first = log.read_text()
    interrupted_after = max(int(line.split()[1].split("/")[0]) for line in first.splitlines()
                            if line.startswith("epoch "))

    resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    resumed_epochs = [int(line.split()[1].split("/")[0]) for line in resumed.stdout.splitlines()
                      if line.startswith("epoch ")]
    card = json.loads(out.with_suffix(".json").read_text())

    assert proc.returncode == 1 and "continue with --resume" in first
    assert interrupted_after < 12
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert resumed_epochs == list(range(interrupted_after + 1, 13))
    assert [h["epoch"] for h in card["history"]] == list(range(1, 13))


def test_a_signal_while_an_epoch_is_checkpointed_interrupts_only_after_the_checkpoint():
    import os
    import signal

    import keras

    from training.train import Interrupts

    written = []

    class Checkpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            os.kill(os.getpid(), signal.SIGTERM)
            written.append(epoch)

    interrupts = Interrupts()
    callbacks = interrupts.around([Checkpoint(), Checkpoint()])
    with interrupts, pytest.raises(KeyboardInterrupt):
        for callback in callbacks:
            callback.on_epoch_end(4)

    assert written == [4, 4]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signal_outside_the_checkpoint_interrupts_at_once():
    import os
    import signal

    from training.train import Interrupts

    reached = []
    with Interrupts(), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the signal")

    assert reached == []


def test_with_augmentation_switched_off_training_batches_are_the_scans_or_their_mirror_images():
    import tensorflow as tf

    from training.data import datasets

    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(16, 32, 32, 1)).astype(np.float32), np.arange(16, dtype=np.int32) % 4
    train_ds, _ = datasets(x, y, x, y, batch_size=16, seed=1, classes=4, augmenting=tf.Variable(False))
    batch, _ = next(iter(train_ds))

    for row in batch.numpy():  # shuffled: each row is matched to its scan by content
        assert any(np.array_equal(row, scan) or np.array_equal(row, scan[:, ::-1]) for scan in x)


def test_the_last_clean_epochs_switch_augmentation_off():
    import tensorflow as tf

    from training.train import clean_epochs

    augmenting = tf.Variable(True)
    callback = clean_epochs(augmenting, epochs=8, clean=3)
    seen = []
    for epoch in range(8):
        callback.on_epoch_begin(epoch)
        seen.append(bool(augmenting.numpy()))

    assert seen == [True] * 5 + [False] * 3


def test_with_augmentation_on_training_batches_are_transformed():
    import tensorflow as tf

    from training.data import datasets

    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(16, 32, 32, 1)).astype(np.float32), np.arange(16, dtype=np.int32) % 4
    train_ds, _ = datasets(x, y, x, y, batch_size=16, seed=1, classes=4, augmenting=tf.Variable(True))
    batch, _ = next(iter(train_ds))

    assert not any(np.array_equal(row, scan) or np.array_equal(row, scan[:, ::-1]) for row in batch.numpy() for scan in x)


def test_the_training_pipeline_augments_on_one_private_thread_and_the_autotuned_one_is_the_same_data():
    import tensorflow as tf

    from training.data import datasets

    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(16, 32, 32, 1)).astype(np.float32), np.arange(16, dtype=np.int32) % 4
    one, _ = datasets(x, y, x, y, batch_size=8, seed=1, classes=4, augmenting=tf.Variable(False))
    tuned, _ = datasets(x, y, x, y, batch_size=8, seed=1, classes=4, augmenting=tf.Variable(False), autotune=True)

    assert one.options().threading.private_threadpool_size == 1
    assert one.options().autotune.enabled is False
    assert tuned.options().threading.private_threadpool_size is None
    assert sum(len(b) for b, _ in one) == sum(len(b) for b, _ in tuned) == 16


def test_a_model_trained_in_mixed_bfloat16_is_saved_in_float32(tmp_path):
    from tests.conftest import EXAMPLES
    from training.train import TrainConfig, train
    from vision.modelio import load_model

    out = tmp_path / "bf16"
    card = train(TrainConfig(EXAMPLES, out, epochs=1, size=64, batch_size=8, val_fraction=0.25,
                             precision="mixed_bfloat16", cache_dir=tmp_path / "cache", command="pytest bf16"))
    model = load_model(out.with_suffix(".keras")).keras_model

    kept = card["weights"]["candidates"][card["weights"]["kept"]]

    assert card["training_precision"] == "mixed_bfloat16"
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert kept["after_bn_recalibration"] == card["validation"]["accuracy"]  # chosen as it is served


def test_the_card_records_both_weight_candidates_and_keeps_the_better(tiny_model):
    weights = json.loads(tiny_model.with_suffix(".json").read_text())["weights"]
    after = {name: s["after_bn_recalibration"] for name, s in weights["candidates"].items()}

    assert set(after) == {"weight_average", "final"}
    assert after[weights["kept"]] == max(after.values())


def test_the_width_sets_the_filters_of_every_stage_and_is_recorded(tmp_path):
    from training.train import TrainConfig, train
    from vision.modelio import load_model

    out = tmp_path / "narrow"
    card = train(TrainConfig(EXAMPLES, out, epochs=1, size=64, batch_size=8, val_fraction=0.25, width=8,
                             cache_dir=tmp_path / "cache", command="pytest width"))
    model = load_model(out.with_suffix(".keras")).keras_model

    assert [layer.filters for layer in model.layers if hasattr(layer, "filters")] == [8, 16, 32, 32, 64, 64]
    assert card["config"]["width"] == 8


def test_downsized_twins_exist_only_for_large_scans_and_are_the_same_scan_at_a_small_size(tmp_path):
    from PIL import Image

    from training.data import downsized_twins

    examples = labelled_examples(EXAMPLES)
    params = dict(DEFAULTS, size=64)
    twins, has = downsized_twins(examples, params, tmp_path, seed=3)
    clean = cached_arrays(examples, params, tmp_path)
    short_sides = [min(Image.open(e.path).size) for e in examples]

    assert has.tolist() == [side >= 300 for side in short_sides]
    for twin, scan in zip(twins[has], clean[has]):
        assert not np.array_equal(twin, scan)
        assert np.corrcoef(twin.ravel(), scan.ravel())[0, 1] > 0.9
    assert not twins[~has].any()


def test_downsized_twins_are_drawn_from_the_seed_and_cached(tmp_path):
    from training.data import downsized_twins

    examples = labelled_examples(EXAMPLES)
    params = dict(DEFAULTS, size=64)
    first, has = downsized_twins(examples, params, tmp_path / "a", seed=3)
    again, _ = downsized_twins(examples, params, tmp_path / "a", seed=3)
    other, _ = downsized_twins(examples, params, tmp_path / "b", seed=4)

    assert np.array_equal(first, again)
    assert not np.array_equal(first[has], other[has])


def test_with_downsize_one_every_scan_that_has_a_twin_is_shown_as_it():
    import tensorflow as tf

    from training.data import datasets

    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(16, 32, 32, 1)).astype(np.float32), np.arange(16, dtype=np.int32) % 4
    small, has = rng.uniform(size=x.shape).astype(np.float32), np.arange(16) % 2 == 0
    train_ds, _ = datasets(x, y, x, y, batch_size=16, seed=1, classes=4, augmenting=tf.Variable(False),
                           twins=(small, has), downsize=1.0)
    batch, labels = next(iter(train_ds))

    def shown(row, scan):
        return np.array_equal(row, scan) or np.array_equal(row, scan[:, ::-1])

    for row, label in zip(batch.numpy(), labels.numpy().argmax(axis=1)):
        k = next(k for k in range(16) if shown(row, x[k]) or shown(row, small[k]))
        assert y[k] == label and shown(row, small[k] if has[k] else x[k])


def test_fine_tuning_starts_from_the_given_models_weights_and_counts_its_training_time(tiny_model, tmp_path):
    from training.train import TrainConfig, train

    out = tmp_path / "tuned"
    card = train(TrainConfig(EXAMPLES, out, epochs=1, size=64, val_fraction=0.25, init=tiny_model,
                             learning_rate=1e-9, ema_momentum=0, cache_dir=tmp_path / "cache", command="pytest init"))
    source = json.loads(tiny_model.with_suffix(".json").read_text())

    assert card["init_model"]["sha256"] == source["sha256"]
    assert card["wall_time_seconds"] > source["wall_time_seconds"]
    # At a vanishing learning rate only the recalibrated batch-norm statistics can move the predictions.
    assert card["validation"]["accuracy"] == source["validation"]["accuracy"]


def test_fine_tuning_refuses_a_model_of_another_width(tiny_model, tmp_path):
    from training.train import TrainConfig, train
    from vision.errors import ModelError

    with pytest.raises(ModelError, match="its layers differ from this run's network"):
        train(TrainConfig(EXAMPLES, tmp_path / "wide", epochs=1, size=64, val_fraction=0.25, width=8,
                          init=tiny_model, cache_dir=tmp_path / "cache", command="pytest init"))


def test_a_training_that_fails_leaves_the_dtype_policy_as_it_was(tiny_model, tmp_path):
    import keras

    from training.train import TrainConfig, train
    from vision.errors import ModelError

    with pytest.raises(ModelError):
        train(TrainConfig(EXAMPLES, tmp_path / "wide", epochs=1, size=64, val_fraction=0.25, width=8,
                          precision="mixed_bfloat16", init=tiny_model, cache_dir=tmp_path / "cache"))

    assert keras.mixed_precision.global_policy().name == "float32"



    from training.data import rare_source_repeats

    examples = labelled_examples(EXAMPLES)  # meningioma: three scans under 300 px and one of 512 px
    repeats = rare_source_repeats(examples, factor=3, rare=0.3)

    assert {e.path.name: int(k) for e, k in zip(examples, repeats) if k != 1} == {"Tr-me_1104.jpg": 3}


def test_oversampled_epochs_hold_each_scan_as_often_as_it_repeats():
    from training.train import Prepared

    x = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1)
    data = Prepared([], [], x, np.array([0, 1, 2]), x, np.array([0, 1, 2]),
                    twins=(x + 10, np.array([True, False, True])), repeats=np.array([1, 3, 1]))
    x_epoch, y_epoch, (small, has), _ = data.epoch_arrays()

    assert x_epoch.ravel().tolist() == [0, 1, 1, 1, 2]
    assert y_epoch.tolist() == [0, 1, 1, 1, 2]
    assert small.ravel().tolist() == [10, 11, 11, 11, 12] and has.tolist() == [True, False, False, False, True]


def test_an_equalising_model_records_it_in_its_card_and_the_worker_preprocesses_with_it(tmp_path):
    from training.train import TrainConfig, train
    from vision.modelio import load_model

    out = tmp_path / "equalised"
    card = train(TrainConfig(EXAMPLES, out, epochs=1, size=64, batch_size=8, val_fraction=0.25, width=8,
                             equalise=True, cache_dir=tmp_path / "cache", command="pytest equalise"))
    served = load_model(out.with_suffix(".keras")).preprocessing
    scan = (EXAMPLES / "glioma" / "Tr-gl_0207.jpg").read_bytes()

    assert card["preprocessing"]["equalise"] is True and served == card["preprocessing"]
    np.testing.assert_array_equal(prepare_bytes(scan, served).array,
                                  prepare_bytes(scan, dict(DEFAULTS, size=64, equalise=True)).array)


def test_each_rare_intensity_group_of_a_class_is_repeated_to_about_the_weight_of_its_classs_mean_group():
    from training.data import balanced_repeats

    labels = np.array([0] * 8 + [1] * 4)
    groups = np.array([0] * 6 + [1] * 2 + [0, 0, 1, 1])

    assert balanced_repeats(labels, groups, cap=5).tolist() == [1] * 6 + [2] * 2 + [1] * 4
    assert balanced_repeats(labels, groups, cap=1).tolist() == [1] * 12


def test_intensity_groups_are_fixed_by_the_seed_and_a_mirror_image_joins_its_scans_group(tmp_path):
    from training.data import intensity_groups

    x = cached_arrays(labelled_examples(EXAMPLES), DEFAULTS, tmp_path)
    with_mirrors = np.concatenate([x, x[:, :, ::-1]])
    groups = intensity_groups(with_mirrors, groups=3, seed=1)

    assert groups.tolist() == intensity_groups(with_mirrors, groups=3, seed=1).tolist()
    assert groups[:len(x)].tolist() == groups[len(x):].tolist()
    assert len(set(groups.tolist())) == 3


def _example_scans(n: int) -> np.ndarray:
    files = sorted(EXAMPLES.glob("*/*.jpg"))[:n]
    return np.stack([prepare_bytes(f.read_bytes()).array for f in files])


def test_a_random_contrast_stays_in_the_unit_range_and_leaves_the_background_black():
    import tensorflow as tf

    from training.data import random_contrast

    x = _example_scans(4)
    y = random_contrast(tf.constant(x), seed=3).numpy()
    # Far from any head pixel (9 px) the background cannot be part of the closed head mask.
    near_head = tf.nn.max_pool2d(tf.cast(x > 0.04, tf.float32), 19, 1, "SAME").numpy() > 0

    assert y.shape == x.shape and y.min() >= 0.0 and y.max() <= 1.0
    assert np.all(y[~near_head] == 0.0)


def test_a_random_contrast_is_drawn_for_each_scan_of_a_batch():
    import tensorflow as tf

    from training.data import random_contrast

    same = np.repeat(_example_scans(1), 4, axis=0)
    y = random_contrast(tf.constant(same), seed=3).numpy()

    assert all(not np.allclose(y[i], y[j]) for i in range(4) for j in range(i + 1, 4))


def test_stripping_the_rim_blacks_out_the_heads_edge_and_keeps_its_centre_unchanged():
    import tensorflow as tf

    from training.data import RIM_RADII, head_mask, strip_rim

    x = _example_scans(4)
    y = strip_rim(tf.constant(x), seed=3).numpy()
    head = head_mask(tf.constant(x), opening=5).numpy() > 0
    # Pixels of the head within the smallest radius of its edge (or of the image's) are always blacked out.
    core = -tf.nn.max_pool2d(-np.pad(head, [[0, 0], [6, 6], [6, 6], [0, 0]]).astype(np.float32), 13, 1, "VALID")
    rim = head & (core.numpy() == 0)

    assert RIM_RADII[0] == 6 and rim.sum() > 0
    assert np.all(y[rim] == 0.0)
    assert np.all((y == x) | (y == 0.0))
    c = x.shape[1] // 2
    np.testing.assert_array_equal(y[:, c - 10:c + 10, c - 10:c + 10], x[:, c - 10:c + 10, c - 10:c + 10])


def test_the_rim_is_drawn_for_each_scan_of_a_batch():
    import tensorflow as tf

    from training.data import strip_rim

    same = np.repeat(_example_scans(1), 8, axis=0)
    y = strip_rim(tf.constant(same), seed=3).numpy()

    assert len({int((row > 0).sum()) for row in y}) >= 2


def _flat_heads(values) -> np.ndarray:
    """Scans that are all head, each of one grey level, so a pasted box shows by its value."""
    return np.stack([np.full((32, 32, 1), v, np.float32) for v in values])


def test_cutmix_pastes_a_box_of_the_next_scan_and_mixes_the_labels_by_its_share_of_the_head():
    import tensorflow as tf

    from training.data import cutmix

    values = [0.2, 0.4, 0.6, 0.8, 1.0, 0.3, 0.5, 0.7]
    x, labels = _flat_heads(values), np.eye(4, dtype=np.float32)[np.arange(8) % 4]
    mixed, mixed_labels = (t.numpy() for t in cutmix(tf.constant(x), tf.constant(labels), share=1.0, seed=3))

    for i in range(8):
        box = mixed[i] == values[i - 1]
        rows, cols = np.flatnonzero(box.any(axis=(1, 2))), np.flatnonzero(box.any(axis=(0, 2)))
        assert np.all((mixed[i] == values[i]) | box)
        if box.any():  # one rectangle, as a box clipped at the image's edge stays
            assert box.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        w = box.mean()
        np.testing.assert_allclose(mixed_labels[i], (1 - w) * labels[i] + w * labels[i - 1], atol=1e-6)
    assert len({round(float((mixed[i] == values[i - 1]).mean()), 3) for i in range(8)}) > 1  # a size per scan


def test_cutmix_of_a_share_of_zero_leaves_scans_and_labels_as_they_were():
    import tensorflow as tf

    from training.data import cutmix

    x, labels = _example_scans(4), np.eye(4, dtype=np.float32)
    mixed, mixed_labels = cutmix(tf.constant(x), tf.constant(labels), share=0.0, seed=3)

    np.testing.assert_array_equal(mixed.numpy(), x)
    np.testing.assert_array_equal(mixed_labels.numpy(), labels)


def test_a_box_pasted_from_black_background_adds_no_class():
    import tensorflow as tf

    from training.data import cutmix

    x = np.concatenate([_example_scans(1), np.zeros((1, 160, 160, 1), np.float32)])
    labels = np.eye(4, dtype=np.float32)[[1, 2]]
    _, mixed_labels = cutmix(tf.constant(x), tf.constant(labels), share=1.0, seed=3)

    np.testing.assert_array_equal(mixed_labels.numpy()[0], labels[0])


def test_with_cutmix_training_targets_are_mixed_labels():
    import tensorflow as tf

    from training.data import datasets

    x, y = _flat_heads(np.linspace(0.1, 1.0, 16)), np.arange(16, dtype=np.int32) % 4
    train_ds, _ = datasets(x, y, x, y, batch_size=16, seed=1, classes=4, augmenting=tf.Variable(False), mix=1.0)
    _, targets = next(iter(train_ds))
    targets = targets.numpy()

    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
    assert (targets.max(axis=1) < 1.0).any()


def test_cutmix_is_refused_with_a_teachers_logits():
    from training.data import datasets

    x, y = _flat_heads(np.linspace(0.1, 1.0, 4)), np.arange(4, dtype=np.int32)
    soft = (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="^cutmix mixes labels, not a teacher's logits: train with one or the other$"):
        datasets(x, y, x, y, batch_size=4, seed=1, classes=4, soft=soft, mix=0.5)


def test_a_grouped_convolution_convolves_each_scan_with_its_own_kernel():
    import tensorflow as tf

    from training.data import grouped_conv

    rng = np.random.default_rng(0)
    x, kernel = rng.normal(size=(3, 12, 10, 2)).astype(np.float32), rng.normal(size=(3, 3, 3, 2, 4)).astype(np.float32)
    one_at_a_time = [tf.nn.conv2d(x[i:i + 1], kernel[i], 1, "SAME").numpy()[0] for i in range(3)]

    np.testing.assert_allclose(grouped_conv(tf.constant(x), tf.constant(kernel)).numpy(), one_at_a_time, atol=1e-5)


AVX2 = {"avx", "avx2", "fma"}


def test_auto_trains_in_mixed_float16_on_a_gpu():
    from training.train import training_precision

    assert training_precision("auto", ["GPU:0"], AVX2) == ("mixed_float16", None)


def test_auto_trains_in_mixed_bfloat16_on_a_cpu_with_bfloat16_instructions():
    from training.train import training_precision

    assert training_precision("auto", [], AVX2 | {"avx512f", "avx512_bf16"}) == ("mixed_bfloat16", None)
    assert training_precision("auto", [], AVX2 | {"amx_bf16"}) == ("mixed_bfloat16", None)


def test_auto_trains_in_float32_on_a_cpu_without_them():
    from training.train import training_precision

    assert training_precision("auto", [], AVX2 | {"avx512f"}) == ("float32", None)


def test_mixed_bfloat16_asked_for_on_a_cpu_without_bfloat16_instructions_is_kept_with_a_warning():
    from training.train import training_precision

    precision, warning = training_precision("mixed_bfloat16", [], AVX2)

    assert precision == "mixed_bfloat16"
    assert warning == ("this CPU has no bfloat16 instructions (AVX512-BF16 or AMX): mixed_bfloat16 runs on "
                       "fallback kernels, about 20x slower a step than float32; --precision auto trains in "
                       "float32 here")

"""Distillation: a network learns from a teacher's logits as well as the labels, and only from a fair teacher."""
import json

import numpy as np
import pytest

from tests.conftest import EXAMPLES


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def loss_of(labels, teacher, student_logits, temperature, weight, smoothing=0.0):
    from training.distil import distillation_loss

    loss = distillation_loss(4, temperature, weight, smoothing)
    y_true = np.concatenate([np.eye(4, dtype=np.float32)[labels], teacher], axis=1)
    return np.asarray(loss(y_true, softmax(student_logits).astype(np.float32)))


STUDENT = np.array([[2.0, 0.5, -1.0, 0.0], [0.0, 3.0, 1.0, -2.0]], np.float32)
TEACHER = np.array([[4.0, 1.0, -2.0, 0.0], [1.0, 2.0, 0.5, -1.0]], np.float32)


def test_with_no_weight_on_the_teacher_the_loss_is_the_label_smoothed_cross_entropy():
    smoothed = np.eye(4)[[0, 1]] * 0.9 + 0.1 / 4
    expected = -(smoothed * np.log(softmax(STUDENT))).sum(axis=1)

    np.testing.assert_allclose(loss_of([0, 1], TEACHER, STUDENT, 4.0, 0.0, smoothing=0.1), expected, rtol=1e-5)


def test_the_teacher_part_is_the_tempered_kl_divergence_times_the_temperature_squared():
    t, s = softmax(TEACHER / 3.0), softmax(STUDENT / 3.0)
    expected = 9.0 * (t * np.log(t / s)).sum(axis=1)

    np.testing.assert_allclose(loss_of([0, 1], TEACHER, STUDENT, 3.0, 1.0), expected, rtol=1e-5)


def test_a_network_that_matches_its_teacher_up_to_a_constant_has_no_teacher_loss():
    np.testing.assert_allclose(loss_of([0, 1], TEACHER, TEACHER + 5.0, 4.0, 1.0), [0.0, 0.0], atol=1e-5)


def test_training_targets_carry_each_scans_own_teacher_logits_after_its_label():
    import tensorflow as tf

    from training.data import datasets

    x = np.arange(16, dtype=np.float32)[:, None, None, None] * np.ones((1, 8, 8, 1), np.float32) / 16
    y = np.arange(16) % 4
    logits = np.arange(64, dtype=np.float32).reshape(16, 4)
    train_ds, val_ds = datasets(x, y, x, y, batch_size=16, seed=1, classes=4, augmenting=tf.Variable(False),
                                soft=(logits, logits))
    batch, targets = next(iter(train_ds))
    scan = batch.numpy()[:, 0, 0, 0] * 16  # every pixel of scan k is k/16, flipped or not
    _, val_targets = next(iter(val_ds))

    k = np.rint(scan).astype(int)
    np.testing.assert_array_equal(targets.numpy(), np.concatenate([np.eye(4)[y[k]], logits[k]], axis=1))
    np.testing.assert_array_equal(val_targets.numpy(), np.concatenate([np.eye(4)[y], logits], axis=1))


def test_a_distilled_network_names_its_teacher_and_counts_its_training_time(tiny_model, tmp_path):
    from training.train import TrainConfig, train

    card = train(TrainConfig(EXAMPLES, tmp_path / "student", epochs=1, size=64, val_fraction=0.25, width=8,
                             teacher=tiny_model, cache_dir=tmp_path / "cache", command="pytest distil"))
    teacher = json.loads(tiny_model.with_suffix(".json").read_text())

    assert card["teacher"]["sha256"] == teacher["sha256"]
    assert card["distillation"]["temperature"] == 4.0 and card["distillation"]["weight"] == 0.8
    assert card["wall_time_seconds"] > teacher["wall_time_seconds"]
    assert [sorted(row) for row in card["history"]] == [["accuracy", "epoch", "loss", "seconds", "val_accuracy",
                                                         "val_loss"]]


def test_a_teacher_that_trained_on_this_runs_validation_scans_is_refused(tiny_model, tmp_path):
    from training.train import TrainConfig, train
    from vision.errors import ModelError

    with pytest.raises(ModelError, match=r"the teacher trained on \d+ of this run's validation scans"):
        train(TrainConfig(EXAMPLES, tmp_path / "student", epochs=1, size=64, val_fraction=0.25, split_seed=99,
                          teacher=tiny_model, cache_dir=tmp_path / "cache", command="pytest distil"))


def test_a_teacher_that_preprocesses_at_another_size_is_refused(tiny_model, tmp_path):
    from training.train import TrainConfig, train
    from vision.errors import ModelError

    with pytest.raises(ModelError, match="the teacher preprocesses scans differently from this run"):
        train(TrainConfig(EXAMPLES, tmp_path / "student", epochs=1, size=48, val_fraction=0.25,
                          teacher=tiny_model, cache_dir=tmp_path / "cache", command="pytest distil"))

"""Batched Grad-CAM: each row explained for its own predicted class, equal to one-at-a-time maps."""
import numpy as np
import pytest

from training.architecture import GRADCAM_LAYER
from vision.errors import ModelError
from vision.gradcam import Explainer, padded_size
from tests.conftest import random_network


def features_and_logits(model):
    """The model up to its Grad-CAM features and its logits, both as outputs."""
    import keras

    return keras.Model(model.inputs, [model.get_layer(GRADCAM_LAYER).output, model.get_layer("logits").output])


def gradient_grad_cam(model, scans, classes):
    """Grad-CAM the textbook way, as a reference: a tape, each row's target logit, gradients averaged over space."""
    import tensorflow as tf

    inner = features_and_logits(model)
    with tf.GradientTape() as tape:
        features, logits = inner(scans, training=False)
        target = tf.gather(logits, classes, axis=1, batch_dims=1)
    grads = tape.gradient(target, features)
    cam = tf.nn.relu(tf.reduce_sum(tf.reduce_mean(grads, axis=(1, 2), keepdims=True) * features, -1)).numpy()
    return cam / (cam.max(axis=(1, 2), keepdims=True) + 1e-7)


def test_the_closed_form_maps_equal_a_gradient_pass_for_each_rows_predicted_class(mixed_batch):
    explain, scans, model = mixed_batch
    probs, cams = explain(scans)

    np.testing.assert_allclose(cams, gradient_grad_cam(model, scans, probs.argmax(axis=1)), atol=1e-5)


def test_with_global_max_pooling_the_closed_form_maps_still_equal_a_gradient_pass(mixed_batch):
    import keras

    _, scans, _ = mixed_batch
    model = random_network(5, pool="max")
    pooled = keras.Model(model.inputs, model.get_layer("gmp").output)(scans).numpy()
    mean, std = pooled.mean(axis=0), pooled.std(axis=0) + 1e-6  # as mixed_batch: so the scans differ in class
    directions = np.random.default_rng(5).normal(size=(pooled.shape[1], 4)).astype(np.float32)
    model.get_layer("logits").set_weights([directions / std[:, None], -(mean / std) @ directions])
    probs, cams = Explainer(model, GRADCAM_LAYER)(scans)

    assert len(set(probs.argmax(axis=1))) >= 2
    np.testing.assert_allclose(cams, gradient_grad_cam(model, scans, probs.argmax(axis=1)), atol=1e-5)


@pytest.fixture(scope="module")
def cell_scored(mixed_batch):
    """A random-weight net whose head scores every cell (--pool cells), set so that the scans differ in class."""
    import keras

    _, scans, _ = mixed_batch
    model = random_network(6, pool="cells")
    features = keras.Model(model.inputs, model.get_layer(GRADCAM_LAYER).output)(scans).numpy()
    mean, std = features.mean(axis=(0, 1, 2)), features.std(axis=(0, 1, 2)) + 1e-6
    directions = np.random.default_rng(6).normal(size=(features.shape[-1], 4)).astype(np.float32)
    model.get_layer("class_map").set_weights([directions / std[:, None], -(mean / std) @ directions])
    return model, scans


def test_when_the_head_scores_every_cell_the_closed_form_maps_still_equal_a_gradient_pass(cell_scored):
    model, scans = cell_scored
    probs, cams = Explainer(model, GRADCAM_LAYER)(scans)

    assert len(set(probs.argmax(axis=1))) >= 2
    np.testing.assert_allclose(cams, gradient_grad_cam(model, scans, probs.argmax(axis=1)), atol=1e-5)


def test_when_the_head_scores_every_cell_each_map_peaks_at_the_cell_that_gave_its_class_the_logit(cell_scored):
    import keras

    model, scans = cell_scored
    probs, cams = Explainer(model, GRADCAM_LAYER)(scans)
    scores = keras.Model(model.inputs, model.get_layer("class_map").output)(scans).numpy()
    own = scores[np.arange(len(scans)), ..., probs.argmax(axis=1)]  # (scans, h, w): each row's predicted class

    assert [int(c.argmax()) for c in cams] == [int(s.argmax()) for s in own]


def test_a_map_with_no_positive_cell_peaks_where_the_class_score_is_lowered_least():
    from vision.gradcam import class_activation

    features = np.zeros((1, 2, 3, 1), np.float32)
    features[0, :, :, 0] = [[1.0, 3.0, 2.0], [4.0, 6.0, 5.0]]
    logits = np.array([[0.0, -1.0]], np.float32)  # class 0 predicted, whose kernel lowers the score in every cell
    cam = np.asarray(class_activation(features, logits, np.array([[-1.0, 1.0]], np.float32)))

    np.testing.assert_allclose(cam[0], [[1.0, 0.6, 0.8], [0.4, 0.0, 0.2]], atol=1e-6)


def test_a_batch_with_mixed_predicted_classes_equals_maps_computed_one_at_a_time(mixed_batch):
    explain, scans, _ = mixed_batch
    probs, cams = explain(scans)
    singles = [explain(scans[i : i + 1]) for i in range(len(scans))]

    assert len(set(probs.argmax(axis=1))) >= 2
    # Batched and single convolutions round differently in the last bits (oneDNN picks other kernels).
    np.testing.assert_allclose(cams, np.concatenate([c for _, c in singles]), atol=1e-4)
    # Probabilities pass through softmax of large logits: batched and single matmuls differ in the last bits.
    np.testing.assert_allclose(probs, np.concatenate([p for p, _ in singles]), atol=1e-4)


def test_maps_are_at_the_conv_layers_grid_and_scaled_to_one(mixed_batch):
    explain, scans, _ = mixed_batch
    _, cams = explain(scans)

    assert cams.shape == (16, 8, 8)
    assert cams.min() >= 0
    np.testing.assert_allclose(cams.reshape(16, -1).max(axis=1), 1.0, atol=1e-4)


def test_each_row_is_explained_for_its_own_predicted_class(mixed_batch):
    explain, scans, model = mixed_batch
    probs, cams = explain(scans)
    i = int(np.flatnonzero(probs.argmax(axis=1) != probs.argmax(axis=1)[0])[0])
    wrong = gradient_grad_cam(model, scans[i : i + 1], np.array([probs[0].argmax()]))[0]

    assert not np.allclose(cams[i], wrong, atol=1e-3)


def test_a_model_whose_logits_do_not_read_pooled_features_is_refused():
    import keras

    inputs = keras.Input((16, 16, 1))
    features = keras.layers.Conv2D(4, 3, name=GRADCAM_LAYER)(inputs)
    logits = keras.layers.Dense(4, name="logits")(keras.layers.Flatten()(features))

    with pytest.raises(ModelError) as refused:
        Explainer(keras.Model(inputs, logits), GRADCAM_LAYER)

    assert str(refused.value) == ("Grad-CAM needs 'gradcam_features' -> global average or max pooling "
                                  "[-> dropout] -> 'logits' (Dense), or 'gradcam_features' [-> dropout] -> Dense -> "
                                  "'logits' (global max pooling); this model has Dense <- Flatten after it")


def test_batches_run_at_the_next_power_of_two_so_a_worker_compiles_few_shapes():
    assert [padded_size(n) for n in (1, 2, 3, 5, 8, 9, 31, 32, 33)] == [1, 2, 4, 8, 8, 16, 32, 32, 64]
    assert len({padded_size(n) for n in range(1, 33)}) == 6


def test_batches_are_padded_only_where_each_shape_is_compiled(mixed_batch):
    explain, _, _ = mixed_batch

    assert explain.pads is False  # TensorFlow on a CPU: no XLA


def test_a_padded_batch_gives_the_rows_of_its_scans_alone(mixed_batch):
    from vision.gradcam import pad_batch

    explain, scans, _ = mixed_batch
    padded = pad_batch(scans[:5])
    probs, cams = explain(scans[:5])
    padded_probs, padded_cams = explain(padded)

    assert padded.shape == (8, 64, 64, 1) and not padded[5:].any()
    np.testing.assert_allclose(padded_cams[:5], cams, atol=1e-4)
    np.testing.assert_allclose(padded_probs[:5], probs, atol=1e-4)


def plain_features_logits(model, scans):
    return [np.asarray(t, np.float64) for t in features_and_logits(model)(scans)]


def test_mirrored_probabilities_are_the_softmax_of_the_mean_of_a_scans_and_its_mirrors_logits(cell_scored):
    model, scans = cell_scored
    _, logits = plain_features_logits(model, scans)
    _, mirrored = plain_features_logits(model, scans[:, :, ::-1])
    mean = (logits + mirrored) / 2
    want = np.exp(mean - mean.max(axis=1, keepdims=True))

    probs, _ = Explainer(model, GRADCAM_LAYER, mirror=True)(scans)

    np.testing.assert_allclose(probs, want / want.sum(axis=1, keepdims=True), atol=1e-5)


def test_a_mirrored_map_is_grad_cam_of_the_mean_of_the_scans_and_its_flipped_back_mirrors_features(cell_scored):
    from vision.gradcam import class_activation, head_dense

    model, scans = cell_scored
    features, logits = plain_features_logits(model, scans)
    mirrored_features, mirrored_logits = plain_features_logits(model, scans[:, :, ::-1])
    want = class_activation((features + mirrored_features[:, :, ::-1]) / 2, (logits + mirrored_logits) / 2,
                            head_dense(model, GRADCAM_LAYER).kernel)

    _, cams = Explainer(model, GRADCAM_LAYER, mirror=True)(scans)

    np.testing.assert_allclose(cams, np.asarray(want), atol=1e-5)


def test_a_left_right_symmetric_scan_gets_a_symmetric_mirrored_map(cell_scored):
    model, scans = cell_scored
    symmetric = (scans + scans[:, :, ::-1]) / 2

    _, cams = Explainer(model, GRADCAM_LAYER, mirror=True)(symmetric)
    _, plain = Explainer(model, GRADCAM_LAYER)(symmetric)

    np.testing.assert_allclose(cams, cams[:, :, ::-1], atol=1e-5)
    assert not np.allclose(plain, plain[:, :, ::-1], atol=1e-2)  # the network alone is not symmetric

"""Batch norm folded into the convolution before it: the served copy computes what the saved model computes."""
import keras
import numpy as np
import pytest

from training.architecture import GRADCAM_LAYER
from vision.folding import fold_batchnorm, foldable
from vision.gradcam import Explainer
from vision.preprocess import prepare_bytes
from vision.runtime import Runtime
from tests.conftest import EXAMPLES, random_network


@pytest.fixture(scope="module")
def stats_model(mixed_batch):
    _, scans, _ = mixed_batch
    return random_network(5), scans


def test_folded_model_gives_the_same_probabilities_and_heatmaps(stats_model):
    model, scans = stats_model
    probs, cams = Explainer(model, GRADCAM_LAYER)(scans)
    folded_probs, folded_cams = Explainer(fold_batchnorm(model), GRADCAM_LAYER)(scans)
    assert np.abs(folded_probs - probs).max() < 1e-5
    assert np.abs(folded_cams - cams).max() < 1e-5


def test_folded_model_has_no_batch_norm_left_and_a_bias_on_every_conv(stats_model):
    model, _ = stats_model
    folded = fold_batchnorm(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert all(layer.use_bias for layer in folded.layers if isinstance(layer, keras.layers.Conv2D))


def test_folded_model_keeps_every_layer_name(stats_model):
    model, _ = stats_model
    assert [layer.name for layer in fold_batchnorm(model).layers] == [layer.name for layer in model.layers]


def test_saved_model_is_left_unchanged(stats_model):
    model, scans = stats_model
    before = model.get_layer("s0c0_conv").get_weights()
    fold_batchnorm(model)
    assert len(model.get_layer("s0c0_conv").get_weights()) == len(before) == 1
    assert np.array_equal(model.get_layer("s0c0_conv").get_weights()[0], before[0])


def test_conv_with_its_own_bias_and_a_shift_only_batch_norm_folds_exactly():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=True, bias_initializer="random_normal")(inputs)
    x = keras.layers.BatchNormalization(scale=False)(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(1)
    model.layers[-1].set_weights([rng.normal(size=8), rng.normal(size=8), rng.uniform(0.5, 2, 8)])
    images = rng.normal(size=(4, 16, 16, 1)).astype(np.float32)
    assert np.abs(fold_batchnorm(model).predict_on_batch(images) - model.predict_on_batch(images)).max() < 1e-5


def test_conv_read_by_more_than_its_batch_norm_is_not_folded():
    inputs = keras.Input((16, 16, 1))
    conv = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="shared_conv")(inputs)
    normed = keras.layers.BatchNormalization(name="bn")(conv)
    model = keras.Model(inputs, keras.layers.Add()([conv, normed]))
    assert foldable(model) == {}


def test_shipped_model_served_folded_gives_the_saved_models_answers(shipped_model):
    scans = sorted(EXAMPLES.glob("*/*.jpg"))
    folded, kept = (Runtime(shipped_model, precision="float32", fold=fold) for fold in (True, False))
    x = np.stack([prepare_bytes(path.read_bytes(), kept.preprocessing).array for path in scans])
    (probs, cams), (folded_probs, folded_cams) = kept.explain(x), folded.explain(x)
    assert np.abs(folded_probs - probs).max() < 1e-5
    assert np.abs(folded_cams - cams).max() < 1e-5

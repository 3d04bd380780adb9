"""Lesion-erased scans (train --erase-lesions): what is erased, what is kept, how they are labelled."""
import shutil

import numpy as np
import pytest
from PIL import Image
from click.testing import CliRunner

from cli import cli
from training.data import CLASSES, labelled_examples, label_indices
from training.lesions import erased_scans, figshare_rows, head_of, lesion_region, refill
from vision.preprocess import DEFAULTS, prepare_bytes
from tests.conftest import EXAMPLES


def prepared(name: str) -> np.ndarray:
    return prepare_bytes((EXAMPLES / name).read_bytes(), DEFAULTS).array[..., 0]


def test_a_refill_replaces_the_region_and_leaves_the_scan_beyond_its_soft_edge_unchanged():
    a = prepared("meningioma/Tr-me_1104.jpg")
    region = np.zeros_like(a, bool)
    region[60:90, 60:90] = True
    out = refill(a, region, np.random.default_rng(0))
    beyond = np.ones_like(a, bool)
    beyond[56:94, 56:94] = False

    assert out.dtype == np.float32 and out.shape == a.shape
    assert np.array_equal(out[beyond], a[beyond])
    assert np.abs(out[65:85, 65:85] - a[65:85, 65:85]).mean() > 0.01
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_a_refill_leaves_the_background_black():
    a = prepared("pituitary/Tr-pi_0956.jpg")
    out = refill(a, np.ones_like(a, bool), np.random.default_rng(0))

    assert np.array_equal(out[~head_of(a)], a[~head_of(a)])


def test_the_lesion_region_is_the_peaks_connected_cells_grown_by_one_cell():
    cam = np.zeros((20, 20), np.float32)
    cam[5:7, 5:7] = 1.0
    cam[15, 15] = 0.9  # as strong, but not connected to the peak

    region = lesion_region(cam, 160)
    expected = np.zeros((160, 160), bool)
    expected[32:64, 32:64] = True

    assert np.array_equal(region, expected)


def test_erased_scans_are_the_sure_figshare_meningiomas_and_pituitaries_labelled_notumor_then_their_controls(
        shipped_model):
    from training.train import served_explainer
    from vision.modelio import load_model

    examples = labelled_examples(EXAMPLES)
    x = np.stack([prepare_bytes(e.path.read_bytes(), DEFAULTS).array for e in examples])
    y = label_indices(examples)
    explainer = served_explainer(load_model(shipped_model).keras_model, True)
    arrays, labels, counts = erased_scans(x, y, examples, explainer, list(CLASSES), count=3, seed=0)
    # Of 512 x 512 pixels: one meningioma and all four pituitary examples.
    figshare = [i for i, e in enumerate(examples) if e.label in ("meningioma", "pituitary")
                and Image.open(e.path).size == (512, 512)]
    probs, _ = explainer(x[figshare])
    sure = int(((probs.argmax(axis=1) == y[figshare]) & (probs.max(axis=1) >= 0.8)).sum())

    assert counts["candidates"] == 5 and counts["sure"] == sure >= 3
    assert (counts["lesion_erased"], counts["controls"]) == (3, 3)
    assert arrays.shape == (6, *x.shape[1:])
    assert labels[:3].tolist() == [CLASSES.index("notumor")] * 3
    assert not any(np.array_equal(made, scan) for made in arrays for scan in x)


def test_erased_scans_are_shown_once_per_epoch_after_the_repeated_training_scans():
    from training.train import Prepared

    x = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1)
    erased = (np.full((2, 1, 1, 1), 7, np.float32), np.array([2, 0]), {})
    data = Prepared([], [], x, np.array([0, 1, 2]), x, np.array([0, 1, 2]),
                    twins=(x + 10, np.array([True, False, True])), repeats=np.array([1, 2, 1]), erased=erased)
    x_epoch, y_epoch, (small, has), _ = data.epoch_arrays()

    assert x_epoch.ravel().tolist() == [0, 1, 1, 2, 7, 7]
    assert y_epoch.tolist() == [0, 1, 1, 2, 2, 0]
    assert small.ravel().tolist() == [10, 11, 11, 12, 7, 7] and has.tolist() == [True, False, False, True, False, False]


def test_a_training_with_erased_lesions_records_them_in_its_card(tiny_model, tmp_path):
    from training.train import TrainConfig, train

    card = train(TrainConfig(EXAMPLES, tmp_path / "erased", epochs=1, size=64, val_fraction=0.25, init=tiny_model,
                             erase_lesions=2, cache_dir=tmp_path / "cache", command="pytest erase"))

    trained = [e for e in labelled_examples(EXAMPLES) if e.sha256 in set(card["train_sha256"])]
    figshare = [e for e in trained if e.label in ("meningioma", "pituitary") and Image.open(e.path).size == (512, 512)]
    assert card["lesion_erase"]["candidates"] == len(figshare)
    assert set(card["lesion_erase"]) == {"candidates", "sure", "lesion_erased", "controls", "mean_region_share"}
    assert card["lesion_erase"]["lesion_erased"] == card["lesion_erase"]["controls"] <= 2


def test_a_training_with_erased_lesions_needs_a_model_to_find_them(tmp_path):
    from training.train import TrainConfig, train

    with pytest.raises(ValueError, match="give it as --init"):
        train(TrainConfig(EXAMPLES, tmp_path / "erased", epochs=1, size=64, erase_lesions=2,
                          cache_dir=tmp_path / "cache"))


def test_train_refuses_erased_lesions_without_an_init(tmp_path):
    result = CliRunner().invoke(cli, ["train", str(tmp_path), "--erase-lesions", "100"])

    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        "Error: --erase-lesions finds each lesion with a trained model's map: give it as --init")


def test_the_figshare_scans_are_found_by_their_stored_size_in_a_folder_and_in_an_archive(tmp_path):
    archive = shutil.make_archive(str(tmp_path / "scans"), "zip", EXAMPLES)
    for root in (EXAMPLES, archive):
        examples = labelled_examples(root)
        rows = figshare_rows(examples, label_indices(examples), list(CLASSES))

        assert sorted(examples[i].relpath for i in rows) == [
            "meningioma/Tr-me_1104.jpg", "pituitary/Tr-pi_0956.jpg", "pituitary/Tr-pi_0975.jpg",
            "pituitary/Tr-pi_0995.jpg", "pituitary/Tr-pi_1013.jpg"]

"""Near-copies across the split: which validation scans a training scan matches, and the metrics without them."""
import io
import json

import numpy as np
from PIL import Image

from training.data import cached_arrays, labelled_examples
from training.near_copies import NEAR_COPY, nearest_correlation
from vision.preprocess import DEFAULTS, prepare_bytes
from tests.conftest import EXAMPLES


def prepared(*names: str) -> np.ndarray:
    return np.stack([prepare_bytes((EXAMPLES / n).read_bytes(), DEFAULTS).array for n in names])


def test_a_scan_its_darker_copy_and_its_downsized_reencoded_copy_are_near_copies_of_it():
    scan = prepared("glioma/Tr-gl_0207.jpg")
    with Image.open(EXAMPLES / "glioma" / "Tr-gl_0207.jpg") as im:
        small = io.BytesIO()
        im.convert("L").resize((256, 256)).save(small, "JPEG", quality=50)
    copy = prepare_bytes(small.getvalue(), DEFAULTS).array[None]

    assert nearest_correlation(scan, scan)[0] > 0.999
    assert nearest_correlation(np.clip(scan * 0.8, 0, 1), scan)[0] > 0.999
    assert nearest_correlation(copy, scan)[0] >= NEAR_COPY


def test_other_scans_are_not_near_copies_of_each_other():
    x = prepared("glioma/Tr-gl_0207.jpg", "meningioma/Tr-me_0185.jpg", "notumor/Tr-no_0932.jpg",
                 "pituitary/Tr-pi_0956.jpg")

    for i in range(len(x)):
        others = np.delete(x, i, axis=0)
        assert nearest_correlation(x[i:i + 1], others)[0] < NEAR_COPY


def test_with_no_training_scans_nothing_is_a_near_copy():
    assert nearest_correlation(prepared("glioma/Tr-gl_0207.jpg"), np.zeros((0, 160, 160, 1)))[0] == -1.0


def test_the_card_gives_the_validation_metrics_without_the_near_copies_of_training_scans(tiny_model, tmp_path):
    card = json.loads(tiny_model.with_suffix(".json").read_text())
    examples = {e.sha256: e for e in labelled_examples(EXAMPLES)}
    params = card["preprocessing"]
    x_train = cached_arrays([examples[h] for h in card["train_sha256"]], params, tmp_path)
    x_val = cached_arrays([examples[h] for h in card["validation_sha256"]], params, tmp_path)
    novel = int((nearest_correlation(x_val, x_train) < NEAR_COPY).sum())
    unseen = card["validation_without_near_copies"]

    assert (unseen["near_copy_correlation"], unseen["scans"]) == (NEAR_COPY, novel)
    assert unseen["scans"] + unseen["near_copies"] == len(card["validation_sha256"])
    assert sum(row["support"] for row in unseen["per_class"].values()) == novel

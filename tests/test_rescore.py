"""`cli.py rescore`: a trained model's validation split scored again as it will be served, as a model of its own."""
import json
import shutil

import numpy as np
from click.testing import CliRunner

from cli import cli
from tests.conftest import EXAMPLES


def copy_model(tiny_model, folder):
    """The tiny model, its card and its curves as m.keras, m.json, m-curves.png."""
    for suffix in (".keras", ".json"):
        shutil.copy(tiny_model.with_suffix(suffix), folder / f"m{suffix}")
    shutil.copy(tiny_model.parent / f"{tiny_model.stem}-curves.png", folder / "m-curves.png")
    return folder / "m.keras"


def test_rescore_without_the_mirror_scores_the_scans_alone_and_records_the_change(tiny_model, tmp_path):
    from training import data as tdata
    from training.merge import validation_examples
    from training.train import served_probabilities
    from vision.modelio import load_model

    model = copy_model(tiny_model, tmp_path)
    before = json.loads(model.with_suffix(".json").read_text())
    loaded = load_model(model)
    x_val = tdata.cached_arrays(validation_examples(before, EXAMPLES), before["preprocessing"], tmp_path / "cache")
    labels = [before["classes"].index(e.label) for e in validation_examples(before, EXAMPLES)]
    want = float((served_probabilities(loaded.keras_model, x_val, mirror=False).argmax(axis=1) == labels).mean())

    result = CliRunner().invoke(cli, ["rescore", str(model), "--no-mirror", "--data", str(EXAMPLES)])
    card = json.loads(model.with_suffix(".json").read_text())

    assert result.exit_code == 0, result.output
    assert result.output == (f"wrote {model} ({card['sha256'][:12]}, was {before['sha256'][:12]}), without its "
                             f"mirror: validation accuracy {want:.4f} (was {before['validation']['accuracy']:.4f}), "
                             f"macro-F1 {card['validation']['macro_avg']['f1']:.4f}\n")
    assert before["mirror"] is True and card["mirror"] is False
    assert card["validation"]["accuracy"] == want
    assert [{k: v for k, v in entry.items() if k != "date"} for entry in card["rescored"]] == [{
        "command": f"python cli.py rescore {model} --no-mirror --data {EXAMPLES}", "model": str(model),
        "sha256": before["sha256"], "mirror": False, "validation_accuracy_before": before["validation"]["accuracy"],
        "mirror_before": True}]
    assert card["history"] == before["history"] and card["train_sha256"] == before["train_sha256"]
    assert (tmp_path / "m-confusion.png").stat().st_size > 0


def test_a_rescored_model_is_a_new_model_file_with_the_same_weights(tiny_model, tmp_path):
    from vision.modelio import load_model

    model = copy_model(tiny_model, tmp_path)
    result = CliRunner().invoke(cli, ["rescore", str(model), "--no-mirror", "--out", str(tmp_path / "plain"),
                                      "--data", str(EXAMPLES)])
    source, rescored = load_model(model), load_model(tmp_path / "plain.keras")

    assert result.exit_code == 0, result.output
    assert rescored.sha256 != source.sha256 and rescored.card["name"] == "plain"
    assert all(np.array_equal(a, b) for a, b in zip(rescored.keras_model.get_weights(),
                                                    source.keras_model.get_weights()))
    assert (tmp_path / "plain-curves.png").read_bytes() == (tmp_path / "m-curves.png").read_bytes()


def test_the_int8_file_of_the_model_it_was_is_refused_for_the_rescored_one(tiny_model, tmp_path):
    import pytest

    from vision.errors import ModelError
    from vision.runtime import Runtime

    model = copy_model(tiny_model, tmp_path)
    quantized = CliRunner().invoke(cli, ["quantize", str(EXAMPLES), "--model", str(model), "--scans", "4"])
    assert quantized.exit_code == 0, quantized.output
    CliRunner().invoke(cli, ["rescore", str(model), "--no-mirror", "--data", str(EXAMPLES)], catch_exceptions=False)

    with pytest.raises(ModelError, match="was quantized from another model"):
        Runtime(model, precision="int8")


def test_a_rescored_model_is_served_as_its_card_now_says(tiny_model, tmp_path):
    from vision.gradcam import Explainer
    from vision.modelio import load_model
    from vision.preprocess import prepare_bytes
    from vision.runtime import Runtime

    model = copy_model(tiny_model, tmp_path)
    CliRunner().invoke(cli, ["rescore", str(model), "--no-mirror", "--data", str(EXAMPLES)], catch_exceptions=False)
    runtime = Runtime(model, precision="float32")
    arrays = np.stack([prepare_bytes(p.read_bytes(), runtime.preprocessing).array
                       for p in sorted(EXAMPLES.glob("*/*.jpg"))])

    probs, _ = runtime.explain(arrays)

    assert runtime.mirror is False
    np.testing.assert_allclose(probs, Explainer(load_model(model).keras_model, "gradcam_features")(arrays)[0],
                               atol=1e-5)


def test_rescore_on_a_folder_without_the_validation_scans_says_what_to_pass(tiny_model, tmp_path):
    from training.data import labelled_examples

    model = copy_model(tiny_model, tmp_path)
    before = model.with_suffix(".json").read_text()
    count = len(json.loads(before)["validation_sha256"])
    trained = next(e for e in labelled_examples(EXAMPLES) if e.sha256 in json.loads(before)["train_sha256"])
    other = tmp_path / "other"
    (other / trained.label).mkdir(parents=True)
    shutil.copy(trained.path, other / trained.label)

    result = CliRunner().invoke(cli, ["rescore", str(model), "--data", str(other)])

    assert result.exit_code == 1
    assert result.output == (f"Error: {other}: {count} of the model's {count} validation "
                             "scans are not there; pass its training data with --data\n")
    assert model.with_suffix(".json").read_text() == before

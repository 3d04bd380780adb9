"""Int8 serving: `cli.py quantize` writes a calibrated LiteRT file beside a model; BRAINSCAN_PRECISION=int8 serves it."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from cli import cli
from db.models import Result
from db.session import session_scope
from tests.conftest import EXAMPLES
from vision.errors import ModelError
from vision.int8 import int8_card_path, int8_path, read_int8
from vision.preprocess import prepare_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    """A copy of the tiny model with its int8 file, made by `cli.py quantize` on the example scans."""
    folder = tmp_path_factory.mktemp("int8")
    for suffix in (".keras", ".json"):
        shutil.copy(tiny_model.with_suffix(suffix), folder / f"tiny{suffix}")
    model = folder / "tiny.keras"
    result = CliRunner().invoke(cli, ["quantize", str(EXAMPLES), "--model", str(model), "--scans", "8"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return model, result.output


def example_arrays(runtime) -> np.ndarray:
    return np.stack([prepare_bytes(p.read_bytes(), runtime.preprocessing).array
                     for p in sorted(EXAMPLES.glob("*/*.jpg"))])


def bare_copy(tiny_model, folder):
    """The tiny model and its card alone, under the name bare.keras, with no int8 file."""
    for suffix in (".keras", ".json"):
        shutil.copy(tiny_model.with_suffix(suffix), folder / f"bare{suffix}")
    return folder / "bare.keras"


def test_quantize_says_what_it_wrote(quantized):
    model, output = quantized
    assert output.startswith(f"wrote {int8_path(model)}: 8 calibration scans, ")
    assert int8_path(model).stat().st_size > 0


def test_calibration_draws_only_training_scans(quantized):
    model, _ = quantized
    card = json.loads(model.with_suffix(".json").read_text())
    made = json.loads(int8_card_path(model).read_text())
    assert len(made["calibration_sha256"]) == 8
    assert set(made["calibration_sha256"]) <= set(card["train_sha256"])
    assert not set(made["calibration_sha256"]) & set(card["validation_sha256"])
    assert made["model_sha256"] == card["sha256"]


def test_int8_runtime_gives_probabilities_and_heatmaps_of_the_keras_shapes(quantized):
    from vision.runtime import Runtime

    model, _ = quantized
    int8, float32 = Runtime(model, precision="int8"), Runtime(model, precision="float32")
    arrays = example_arrays(int8)
    probs, cams = int8.explain(arrays)
    want_probs, want_cams = float32.explain(arrays)
    assert int8.precision == "int8"
    assert probs.shape == want_probs.shape and cams.shape == want_cams.shape
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert cams.min() >= 0.0 and cams.max() <= 1.0


def test_a_batch_of_another_size_is_served_without_padding(quantized):
    from vision.runtime import Runtime

    runtime = Runtime(quantized[0], precision="int8")
    arrays = example_arrays(runtime)
    whole, _ = runtime.explain(arrays)
    part, _ = runtime.explain(arrays[:5])
    np.testing.assert_allclose(part, whole[:5], atol=1e-6)  # rows do not interact


def test_shipped_int8_file_agrees_with_float32_on_the_example_scans(shipped_model):
    from vision.runtime import Runtime

    int8, float32 = Runtime(shipped_model, precision="int8"), Runtime(shipped_model, precision="float32")
    arrays = example_arrays(int8)
    probs, cams = int8.explain(arrays)
    want_probs, want_cams = float32.explain(arrays)
    assert probs.argmax(axis=1).tolist() == want_probs.argmax(axis=1).tolist()
    # Over the 829 validation scans the shipped network's int8 probabilities (served with its mirror) are within
    # 0.1157 of float32's (median 0.0016, the same class for all 829; README); on these examples within 0.0273.
    assert np.abs(probs - want_probs).max() < 0.12
    peaks = cams.reshape(len(cams), -1).argmax(axis=1)
    want_peaks = want_cams.reshape(len(cams), -1).argmax(axis=1)
    assert (peaks == want_peaks).sum() >= len(cams) - 2


def test_a_model_without_an_int8_file_says_how_to_make_one(tiny_model, tmp_path):
    model = bare_copy(tiny_model, tmp_path)
    with pytest.raises(ModelError) as err:
        read_int8(model, "0" * 64)
    assert str(err.value) == (f"{int8_path(model)}: no int8 model beside bare.keras; "
                              f"run `python cli.py quantize TRAINING_FOLDER --model {model}`")


def test_an_int8_file_of_another_model_is_refused(quantized):
    model, _ = quantized
    other = "f" * 64
    with pytest.raises(ModelError) as err:
        read_int8(model, other)
    sha = json.loads(int8_card_path(model).read_text())["model_sha256"]
    assert str(err.value) == (f"{int8_path(model)} was quantized from another model ({sha[:12]}…, not "
                              f"{other[:12]}…); run `python cli.py quantize TRAINING_FOLDER --model {model}`")


def test_an_altered_int8_file_is_refused(quantized, tmp_path):
    model, _ = quantized
    copy = tmp_path / "tiny.keras"
    for path in (model, model.with_suffix(".json"), int8_card_path(model)):
        shutil.copy(path, tmp_path / path.name)
    data = bytearray(int8_path(model).read_bytes())
    data[-1] ^= 0xFF
    int8_path(copy).write_bytes(bytes(data))
    sha = json.loads(int8_card_path(model).read_text())["model_sha256"]
    with pytest.raises(ModelError, match="SHA-256 does not match tiny.int8.json; the file was changed"):
        read_int8(copy, sha)


def test_quantize_refuses_a_folder_without_the_models_training_scans(tiny_model, tmp_path):
    from PIL import Image

    folder = tmp_path / "other" / "glioma"
    folder.mkdir(parents=True)
    Image.new("L", (64, 64), 7).save(folder / "flat.png")
    result = CliRunner().invoke(cli, ["quantize", str(folder.parent), "--model", str(tiny_model)])
    assert result.exit_code == 1
    assert result.output == (f"Error: {folder.parent}: none of its scans is in the model's training split; "
                             "give the folder the model was trained on\n")


def test_run_in_int8_records_it_on_every_result(quantized, scan_folder, env_for):
    model, _ = quantized
    settings, _ = env_for(model, BRAINSCAN_PRECISION="int8")
    result = CliRunner().invoke(cli, ["run", str(scan_folder), "--format", "json"], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["served_in"] == {"int8": 17}
    with session_scope(settings.database_url) as s:
        assert set(s.execute(select(Result.served_in)).scalars()) == {"int8"}


def test_run_in_int8_without_the_file_stops_before_recording_a_job(tiny_model, scan_folder, env_for, tmp_path):
    model = bare_copy(tiny_model, tmp_path)
    settings, _ = env_for(model, BRAINSCAN_PRECISION="int8")
    result = CliRunner().invoke(cli, ["run", str(scan_folder)])

    assert result.exit_code == 1
    assert result.output == (f"Error: {int8_path(model)}: no int8 model beside bare.keras; "
                             f"run `python cli.py quantize TRAINING_FOLDER --model {model}`\n")
    assert not (tmp_path / "var" / "brainscan.db").exists()


def test_worker_in_int8_without_the_file_refuses_to_start(tiny_model, env_for, tmp_path, redis_url):
    model = bare_copy(tiny_model, tmp_path)
    env_for(model, broker_url=redis_url, BRAINSCAN_PRECISION="int8")
    result = CliRunner().invoke(cli, ["worker"])

    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {int8_path(model)}: no int8 model beside bare.keras; ")


def test_int8_with_the_mirror_serves_the_mean_of_each_scan_and_its_mirror(quantized):
    from vision.gradcam import class_activation, head_dense
    from vision.int8 import Int8Explainer
    from vision.modelio import load_model
    from vision.runtime import Runtime

    model, _ = quantized
    loaded = load_model(model)
    kernel = head_dense(loaded.keras_model, loaded.card["gradcam_layer"]).kernel
    plain = Int8Explainer(read_int8(model, loaded.sha256), kernel, threads=1)
    arrays = example_arrays(Runtime(model, precision="int8"))
    features, logits = plain._run(arrays)
    mirrored_features, mirrored_logits = plain._run(arrays[:, :, ::-1])
    mean = (logits + mirrored_logits) / 2
    want = np.exp(mean - mean.max(axis=1, keepdims=True))

    probs, cams = Int8Explainer(read_int8(model, loaded.sha256), kernel, threads=1, mirror=True)(arrays)

    np.testing.assert_allclose(probs, want / want.sum(axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(cams, class_activation((features + mirrored_features[:, :, ::-1]) / 2, mean, kernel),
                               atol=1e-5)

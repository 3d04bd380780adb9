"""Multi-tower models: separately trained networks served as one model with one logits layer and one Grad-CAM."""
import numpy as np
import pytest

from training.architecture import GRADCAM_LAYER, build_model, merge_towers, stages_for
from vision.errors import ModelError
from vision.gradcam import Explainer
from vision.preprocess import DEFAULTS, prepare_bytes
from tests.conftest import EXAMPLES, random_network

STAGES = stages_for(8)


def logits_of(model, scans) -> np.ndarray:
    """The model's logits layer on scans."""
    import keras

    return keras.Model(model.inputs, model.get_layer("logits").output)(scans).numpy()


DEEP = stages_for(16, convs=(1, 2, 2, 3))


@pytest.fixture(scope="module")
def towers():
    networks = [random_network(1), random_network(2)]
    scans = np.stack([prepare_bytes(p.read_bytes(), dict(DEFAULTS, size=64)).array
                      for p in sorted(EXAMPLES.glob("*/*.jpg"))])
    logits = [logits_of(n, scans) for n in networks]
    return networks, merge_towers(networks, 64, STAGES), scans, logits


@pytest.fixture(scope="module")
def deep(towers):
    """A random network of another width and depth, and its logits on the towers' scans."""
    network = random_network(6, DEEP)
    return network, logits_of(network, towers[2])


def test_merged_logits_are_the_mean_of_the_networks_logits(towers):
    _, merged, scans, logits = towers
    merged_logits = logits_of(merged, scans)

    np.testing.assert_allclose(merged_logits, (logits[0] + logits[1]) / 2, atol=1e-4)


def test_a_multi_tower_model_merges_as_its_towers_so_every_network_weighs_the_same(towers):
    networks, merged, scans, logits = towers
    third = random_network(3)
    logits3 = logits_of(third, scans)
    three = merge_towers([merged, third], 64, STAGES)
    out = logits_of(three, scans)

    assert len(three.get_layer(GRADCAM_LAYER).input) == 3
    np.testing.assert_allclose(out, (logits[0] + logits[1] + logits3) / 3, rtol=1e-4, atol=1e-4)


def test_a_dilated_network_merges_with_a_plain_one_as_the_mean_of_their_logits(towers):
    networks, _, scans, logits = towers
    dilated = random_network(4, stages_for(8, dilate=True))
    dilated_logits = logits_of(dilated, scans)
    both = merge_towers([networks[0], dilated], 64, [STAGES, stages_for(8, dilate=True)])
    out = logits_of(both, scans)

    assert [both.get_layer(f"t{k}_features_conv").dilation_rate for k in (0, 1)] == [(1, 1), (3, 3)]
    np.testing.assert_allclose(out, (logits[0] + dilated_logits) / 2, rtol=1e-4, atol=1e-4)


def test_networks_of_different_widths_and_depths_merge_as_the_mean_of_their_logits(towers, deep):
    networks, _, scans, logits = towers
    other, other_logits = deep
    both = merge_towers([networks[0], other], 64, [STAGES, DEEP])
    out = logits_of(both, scans)

    assert both.get_layer(GRADCAM_LAYER).output.shape[1:] == (8, 8, 64 + 128)
    np.testing.assert_allclose(out, (logits[0] + other_logits) / 2, rtol=1e-4, atol=1e-4)


def test_a_model_with_towers_of_different_widths_merges_as_each_of_its_towers(towers, deep):
    networks, _, scans, logits = towers
    other, other_logits = deep
    three = merge_towers([merge_towers([other, networks[0]], 64, [DEEP, STAGES]), networks[1]], 64,
                         [DEEP, STAGES, STAGES])
    out = logits_of(three, scans)

    np.testing.assert_allclose(out, (other_logits + logits[0] + logits[1]) / 3, rtol=1e-4, atol=1e-4)


def test_max_pooled_networks_merge_as_the_mean_of_their_logits(towers):
    scans = towers[2]
    networks = [random_network(7, pool="max"), random_network(8, pool="max")]
    merged = merge_towers(networks, 64, STAGES)

    assert merged.get_layer("gmp") is not None
    np.testing.assert_allclose(logits_of(merged, scans),
                               (logits_of(networks[0], scans) + logits_of(networks[1], scans)) / 2, atol=1e-4)


def test_average_and_max_pooled_networks_are_not_merged(towers):
    with pytest.raises(ModelError, match="^models with average and max global pooling cannot be merged$"):
        merge_towers([towers[0][0], random_network(7, pool="max")], 64, STAGES)


def test_networks_whose_logits_are_their_best_cell_are_not_merged(towers):
    with pytest.raises(ModelError, match=r"^models whose logits are their best cell's \(--pool cells\) cannot be merged$"):
        merge_towers([random_network(7, pool="cells"), random_network(8, pool="cells")], 64, STAGES)


def test_a_dilated_grad_cam_unit_sees_the_scan_40_px_away_where_a_plain_one_does_not():
    import keras

    rng = np.random.default_rng(0)
    scan = rng.uniform(size=(1, 128, 128, 1)).astype(np.float32)
    far = scan.copy()
    ring = np.ones((128, 128), bool)
    ring[24:104, 24:104] = False  # every pixel more than 40 px from the centre in x or y
    far[0, ring, 0] = rng.uniform(size=ring.sum())
    centre = {}
    for dilate in (False, True):
        net = random_network(5, stages_for(8, dilate=dilate), size=128)
        features = keras.Model(net.inputs, net.get_layer(GRADCAM_LAYER).output)
        centre[dilate] = [features(x).numpy()[0, 8, 8] for x in (scan, far)]

    np.testing.assert_array_equal(centre[False][0], centre[False][1])
    assert np.abs(centre[True][0] - centre[True][1]).max() > 1e-3


def test_the_merged_grad_cam_layer_concatenates_both_towers_on_the_same_grid(towers):
    _, merged, scans, _ = towers
    probs, cams = Explainer(merged, GRADCAM_LAYER)(scans)

    assert merged.get_layer(GRADCAM_LAYER).output.shape[1:] == (8, 8, 128)
    assert cams.shape == (16, 8, 8) and probs.shape == (16, 4)
    np.testing.assert_allclose(cams.reshape(16, -1).max(axis=1), 1.0, atol=1e-4)


def test_a_tiny_two_tower_training_is_one_servable_model_with_both_towers_in_its_card(tmp_path):
    from training.train import TrainConfig, train
    from vision.modelio import load_model

    out = tmp_path / "two"
    card = train(TrainConfig(EXAMPLES, out, epochs=1, size=64, batch_size=8, val_fraction=0.25, width=8,
                             towers=2, cache_dir=tmp_path / "cache", command="pytest towers"))
    model = load_model(out.with_suffix(".keras")).keras_model
    scans = np.zeros((2, 64, 64, 1), np.float32)

    assert card["towers"] == 2
    assert [t["seed"] for t in card["weights"]["towers"]] == [1337, 1338]
    assert [(h["tower"], h["epoch"]) for h in card["history"]] == [(1, 1), (2, 1)]
    assert Explainer(model, card["gradcam_layer"])(scans)[1].shape == (2, 8, 8)


@pytest.fixture(scope="module")
def two_tiny_models(tmp_path_factory):
    """Two tiny networks on the same split (one and two epochs) and one on another split."""
    from training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("merge")
    paths = {}
    for name, epochs, fraction in (("one", 1, 0.25), ("two", 2, 0.25), ("other", 1, 0.5)):
        train(TrainConfig(EXAMPLES, root / name, epochs=epochs, size=64, batch_size=8, val_fraction=fraction,
                          width=8, cache_dir=root / "cache", command=f"pytest {name}"))
        paths[name] = root / f"{name}.keras"
    return paths


def test_merge_scores_the_merged_model_on_the_shared_validation_split(two_tiny_models, tmp_path):
    from click.testing import CliRunner

    from cli import cli
    from vision.modelio import load_model, read_card

    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(two_tiny_models["one"]), str(two_tiny_models["two"]),
                                      "--out", str(out)])
    card = read_card(out.with_suffix(".keras"))
    sources = [read_card(two_tiny_models[name]) for name in ("one", "two")]

    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out}.keras: 2 towers, validation accuracy ")
    assert card["towers"] == 2 and card["validation_sha256"] == sources[0]["validation_sha256"]
    assert sum(map(sum, card["validation"]["confusion_matrix"]["matrix"])) == 4
    assert card["wall_time_seconds"] >= sources[0]["wall_time_seconds"] + sources[1]["wall_time_seconds"]
    assert card["training_command"].startswith("pytest one && pytest two && python cli.py merge ")
    assert load_model(out.with_suffix(".keras")).keras_model.get_layer("gradcam_features").output.shape[-1] == 128


def test_merging_a_merged_model_lists_every_tower_in_the_card(two_tiny_models, tmp_path):
    from training.merge import merge

    pair = merge([two_tiny_models["one"], two_tiny_models["two"]], tmp_path / "pair", command="pytest pair")
    three = merge([tmp_path / "pair.keras", two_tiny_models["one"]], tmp_path / "three", command="pytest three")

    assert three["towers"] == 3
    assert three["seed"] == [1337, 1337, 1337]
    assert [(h["tower"], h["epoch"]) for h in three["history"]] == [(1, 1), (2, 1), (2, 2), (3, 1)]
    assert [t["kept"] for t in three["weights"]["towers"]] == [t["kept"] for t in pair["weights"]["towers"]] + [
        three["weights"]["towers"][0]["kept"]]


def test_models_trained_on_different_splits_are_not_merged(two_tiny_models, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    one, other = str(two_tiny_models["one"]), str(two_tiny_models["other"])
    result = CliRunner().invoke(cli, ["merge", one, other, "--out", str(tmp_path / "m")])

    assert result.exit_code == 1
    assert result.output == (f"Error: {other} and {one} differ in train_sha256: only models trained on the same "
                             "split with the same preprocessing can be merged\n")
    assert not (tmp_path / "m.keras").exists()


def test_a_dilated_model_merges_with_a_plain_one_and_the_card_lists_each_towers_stages(two_tiny_models, tmp_path):
    from training.merge import merge
    from training.train import TrainConfig, train
    from vision.modelio import load_model

    dilated = train(TrainConfig(EXAMPLES, tmp_path / "dilated", epochs=1, size=64, batch_size=8, val_fraction=0.25,
                                width=8, dilate=True, cache_dir=tmp_path / "cache", command="pytest dilated"))
    card = merge([two_tiny_models["one"], tmp_path / "dilated.keras"], tmp_path / "both", command="pytest both")
    model = load_model(tmp_path / "both.keras").keras_model

    assert dilated["config"]["stages"] == ((8, 1), (16, 1), (32, 2), (64, 2, (2, 3)))
    assert card["tower_stages"] == [stages_for(8), stages_for(8, dilate=True)]
    assert [model.get_layer(f"t{k}_features_conv").dilation_rate for k in (0, 1)] == [(1, 1), (3, 3)]


def test_a_model_of_another_width_and_depth_merges_and_the_card_lists_each_towers_stages(two_tiny_models, tmp_path):
    from training.merge import merge
    from training.train import TrainConfig, train

    train(TrainConfig(EXAMPLES, tmp_path / "deep", epochs=1, size=64, batch_size=8, val_fraction=0.25, width=16,
                      convs=(1, 2, 2, 3), cache_dir=tmp_path / "cache", command="pytest deep"))
    card = merge([two_tiny_models["one"], tmp_path / "deep.keras"], tmp_path / "both", command="pytest both")

    assert card["tower_stages"] == [stages_for(8), stages_for(16, convs=(1, 2, 2, 3))]
    assert card["gradcam_resolution"] == [8, 8]


def test_convs_set_the_conv_blocks_of_each_stage():
    model = build_model(64, 4, stages_for(8, convs=(1, 2, 2, 3)))

    assert [layer.filters for layer in model.layers if hasattr(layer, "filters")] == [8, 16, 16, 32, 32, 64, 64, 64]
    assert model.get_layer(GRADCAM_LAYER).output.shape[1:] == (8, 8, 64)


def test_dilation_refuses_a_last_stage_of_other_than_two_convs():
    from vision.errors import ModelError

    with pytest.raises(ModelError, match=r"^--dilate needs 2 convs in the last stage, got 3$"):
        stages_for(8, dilate=True, convs=(1, 1, 2, 3))

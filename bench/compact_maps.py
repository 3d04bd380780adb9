"""Does a more compact class map point at the tumour more often? An experiment on the shipped network.

Fine-tunes a network with the head that scores every cell (`--pool cells`) with its softmax cross-entropy plus a
penalty on the share of the grid its true tumour class's map covers: the rectified map (less the class's bias,
as Grad-CAM exports it) averaged over the grid and divided by its peak, 0 for `notumor`, which has no lesion.
Optionally each class's logistic loss too. Then recalibrates batch norm as `train` does, scores validation with
the mirror and writes `<out>.keras` with a card copied from the start model, for `bench/pointing.py --model`.
Prints one JSON line: the penalty before and after, validation accuracy and wall time.

Measured 2026-12-08 (README, "Other readings"): the maps became 4-5 times more compact and the boxes did not move.
Not a `train` option, since nothing it made was kept.

Usage: python bench/compact_maps.py --out var/runs/focus1 [--weight 1.0] [--logistic 0.0] [--epochs 12]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import DEFAULT_MODEL  # noqa: E402

def map_share(bias, notumor: int):
    """A loss: the share of the grid the true class's rectified map covers (mean over peak), 0 for notumor."""
    import tensorflow as tf

    def share(y_true, class_map):
        raw = tf.nn.relu(tf.einsum("bhwc,bc->bhw", tf.cast(class_map, tf.float32) - bias, y_true))
        covered = tf.reduce_mean(raw, axis=(1, 2)) / (tf.reduce_max(raw, axis=(1, 2)) + 1e-3)
        return covered * (1.0 - y_true[:, notumor])

    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default="../shared/data/brain-tumor-mri/Training")
    parser.add_argument("--out", required=True)
    parser.add_argument("--weight", type=float, default=1.0, help="of the map-share penalty")
    parser.add_argument("--logistic", type=float, default=0.0, help="of each class's logistic loss, summed")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    args = parser.parse_args()

    from training.architecture import build_model, stages_for
    from training.train import (TrainConfig, accuracy, float32_copy, prepare, recalibrate_batchnorm,
                                setup_devices, start_from)
    from training import data as tdata
    from vision.modelio import file_sha256, read_card

    _, policy = setup_devices("auto")
    import keras

    out, card = Path(args.out), read_card(Path(args.init))
    stages = card["config"]["stages"]
    cfg = TrainConfig(data_root=Path(args.data), out=out, pool="cells", cell_loss="softmax", seed=card["seed"],
                      split_seed=card["split_seed"], val_fraction=card["config"]["val_fraction"])
    data = prepare(cfg, card["preprocessing"])
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(cfg.seed)
    model = build_model(card["input_size"], len(card["classes"]), stages=stages, pool="cells")
    start_from(model, Path(args.init))
    class_map = model.get_layer("class_map")
    trained = keras.Model(model.inputs, [model.output, class_map.output, model.get_layer("logits").output])
    train_ds, val_ds = tdata.datasets(data.x_train, data.y_train, data.x_val, data.y_val, cfg.batch_size, cfg.seed,
                                      len(card["classes"]))
    thrice = lambda x, y: (x, (y, y, y))  # noqa: E731
    train_ds, val_ds = train_ds.map(thrice), val_ds.map(thrice)
    steps = (len(data.x_train) // cfg.batch_size) * args.epochs
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps, warmup_target=args.learning_rate,
                                                      warmup_steps=max(1, steps // 20))
    trained.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay, use_ema=True,
                                         ema_momentum=cfg.ema_momentum),
        loss=[keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
              map_share(class_map.bias, card["classes"].index("notumor")),
              keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=cfg.label_smoothing)],
        # BinaryCrossentropy averages over the classes: times their count, each weighs as in a sum.
        loss_weights=[1.0, args.weight, len(card["classes"]) * args.logistic])
    t0 = time.time()
    before = trained.evaluate(val_ds, verbose=0, return_dict=True)["class_map_loss"]
    history = trained.fit(train_ds, validation_data=val_ds, epochs=args.epochs, verbose=2)
    served = float32_copy(model, card["input_size"], stages)
    recalibrate_batchnorm(served, data.x_train)
    served.save(out.with_suffix(".keras"))
    result = {"validation_map_share": {"before": round(before, 4),
                                       "after": round(history.history["val_class_map_loss"][-1], 4)},
              "validation_accuracy": accuracy(served, data.x_val, data.y_val, bool(card.get("mirror"))),
              "seconds": round(time.time() - t0, 1)}
    out.with_suffix(".json").write_text(json.dumps(dict(
        card, name=out.name, sha256=file_sha256(out.with_suffix(".keras")), mirror=bool(card.get("mirror")),
        training_command=" ".join(["python", *sys.argv]), init_model={"model": args.init, "sha256": card["sha256"]},
        compact_maps=result)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

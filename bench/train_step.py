"""Training step time on this machine: the augmentation pipeline as training runs it against the alternatives.

Alternating rounds of `--steps` steps each, after 5 warm-up steps, of the shipped recipe's network and
optimizer on the real training split:
  one-thread   the pipeline as `cli.py train` runs it: augmentation on one private tf.data thread
  autotune     the same map in parallel on tf.data's shared pool under AUTOTUNE (training before 2026-12-07)
  bound        batches augmented beforehand and cached: the train step alone, what no pipeline can beat
One JSON line per round and a summary with each variant's median and its ratio to the bound.

Usage: python bench/train_step.py [--data ../shared/data/brain-tumor-mri/Training] [--rounds 4] [--steps 40]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/brain-tumor-mri/Training")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    from training import data as tdata
    from training import train as T
    from training.architecture import build_model, stages_for
    from vision.preprocess import DEFAULTS

    cfg = T.TrainConfig(data_root=Path(args.data), out=Path("var/runs/bench"), precision=args.precision)
    hardware, policy = T.setup_devices(cfg.precision)
    import keras
    import tensorflow as tf

    data = T.prepare(cfg, dict(DEFAULTS, size=cfg.size))
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg.size, 4, stages=stages_for(cfg.width), pool=cfg.pool)
    steps_per_epoch = len(data.x_train) // cfg.batch_size
    T.compile_network(model, cfg, steps_per_epoch * cfg.epochs)

    def pipeline(autotune: bool):
        return tdata.datasets(data.x_train, data.y_train, data.x_val, data.y_val, cfg.batch_size, cfg.seed, 4,
                              autotune=autotune)[0]

    first = list(pipeline(False).take(args.steps + 5))
    bound = tf.data.Dataset.from_tensor_slices((np.concatenate([np.asarray(x) for x, _ in first]),
                                                np.concatenate([np.asarray(y) for _, y in first])))
    bound = bound.batch(cfg.batch_size).cache()
    variants = {"one-thread": pipeline(False), "autotune": pipeline(True), "bound": bound}
    for _ in bound:  # fill the cache
        pass

    def step_ms(ds) -> float:
        model.fit(ds.take(5), epochs=1, verbose=0)
        t0 = time.perf_counter()
        model.fit(ds.take(args.steps), epochs=1, verbose=0)
        return 1000 * (time.perf_counter() - t0) / args.steps

    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, ds in variants.items():
            times[name].append(step_ms(ds))
        print(json.dumps({"round": r + 1, **{f"{k}_ms_per_step": round(v[-1], 1) for k, v in times.items()}}),
              flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "hardware": hardware, "precision": policy, "batch": cfg.batch_size, "steps": args.steps,
        "rounds": args.rounds,
        **{f"{k}_median_ms": round(v, 1) for k, v in median.items()},
        **{f"{k}_max_ms": round(max(times[k]), 1) for k in times},
        **{f"{k}_to_bound": round(median[k] / median["bound"], 3) for k in ("one-thread", "autotune")},
        "epoch_seconds_at_median": {k: round(v * steps_per_epoch / 1000, 1) for k, v in median.items()},
    }), flush=True)


if __name__ == "__main__":
    main()

"""GPU figures in one run, one JSON line per measurement.

1. model: the shipped model's forward and forward + Grad-CAM, scans/s, at several batch sizes (bench/model.py's
   measurement);
2. run: `cli.py run` end to end (reading, decoding, preprocessing, results and heatmaps into SQLite) on real scans,
   with 1..N local worker processes sharing the GPU, against the bare model on the same scans;
3. train: an epoch of the shipped recipe's training steps (augmentation, network, AdamW + weight average,
   label smoothing, as `training.train.fit_network` compiles it) in each precision, and what 36 epochs of the
   shipped split cost (--no-augment and BENCH_EMA=0 time the network alone).

Runs on whichever Keras backend KERAS_BACKEND names. The device machine lent to this project has JAX and PyTorch
but no TensorFlow, so its figures come from the JAX backend: the same .keras model and the same Explainer, only
the array library under Keras differs. Usage:
    KERAS_BACKEND=jax python bench/gpu.py --scans DIR [--workers 1,4,8] [--batches 64,256,1024]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.model import rate  # noqa: E402
from bench.pipeline import bare_rate, steady_rate  # noqa: E402
from config import DEFAULT_MODEL  # noqa: E402



def emit(kind: str, **fields) -> None:
    print(json.dumps({"bench": kind, **fields}), flush=True)


def device_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or "no GPU"
    except (OSError, subprocess.SubprocessError):
        return "no GPU"


def real_arrays(folder: Path, params: dict, n: int) -> np.ndarray:
    from vision.preprocess import prepare_bytes

    paths = sorted(folder.rglob("*.jpg"))[:n]
    return np.stack([prepare_bytes(p.read_bytes(), params).array for p in paths])


def model_rates(model: str, arrays: np.ndarray, batches: list[int], repeats: int) -> None:
    from vision.runtime import Runtime

    rt = Runtime(model, warm_batch=batches[0])
    for batch in batches:
        x = np.stack([arrays[i % len(arrays)] for i in range(batch)])
        forward = rate(rt.explainer.forward, x, repeats)
        with_cam = rate(rt.explain, x, repeats)
        emit("model", batch=batch, gpus=rt.gpus, forward_scans_per_s=round(forward, 1),
             forward_gradcam_scans_per_s=round(with_cam, 1), gradcam_cost_ratio=round(forward / with_cam, 3))


def run_rates(model: str, folder: Path, workers: list[int], batch_size: int) -> None:
    from config import load_settings
    from jobs.lifecycle import new_job, run_job

    bare = bare_rate(model, folder, batch_size)
    for n in workers:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ.update(BRAINSCAN_MODEL=model, BRAINSCAN_VAR=tmp, BRAINSCAN_BATCH_SIZE=str(batch_size))
            settings = load_settings()
            t0 = time.perf_counter()
            job = new_job(settings, folder)
            progress = run_job(settings, job, workers=n)
            wall = time.perf_counter() - t0
            steady = steady_rate(settings.database_url, job)
            emit("run", workers=n, batch_size=batch_size, scans=progress.total, done=progress.done,
                 failed=progress.failed, wall_s=round(wall, 1), steady_scans_per_s=round(steady, 1),
                 bare_forward_gradcam_scans_per_s=round(bare, 1), run_vs_bare=round(steady / bare, 3))


def train_rates(arrays: np.ndarray, train_scans: int, policies: list[str], batches: list[int],
                augment: bool = True) -> None:
    """One epoch of `train_scans` per precision and batch, timed after a compiling warm-up."""
    import keras

    from training import data as tdata
    from training.architecture import build_model
    from training.train import TrainConfig, compile_network

    cfg = TrainConfig(data_root=ROOT, out=ROOT, ema_momentum=float(os.environ.get("BENCH_EMA", 0.998)))
    y = np.eye(4, dtype=np.float32)[np.arange(len(arrays)) % 4]
    for policy in policies:
        for batch in batches:
            keras.mixed_precision.set_global_policy(policy)
            keras.utils.set_random_seed(cfg.seed)
            net = build_model(cfg.size, 4)
            # The tf.data pipeline maps this augmenter over each batch; here it runs on the GPU inside the step.
            scans = keras.Input((cfg.size, cfg.size, 1))
            augmented = keras.ops.clip(tdata.augmenter(cfg.seed)(scans), 0.0, 1.0) if augment else scans
            model = keras.Model(scans, net(augmented))
            steps = train_scans // batch
            compile_network(model, cfg, steps * cfg.epochs)
            x = np.stack([arrays[i % len(arrays)] for i in range(batch * steps)])
            yy = y[np.arange(len(x)) % len(arrays)]
            try:
                model.fit(x[: batch * 2], yy[: batch * 2], batch_size=batch, epochs=1, verbose=0)  # compile
                t0 = time.perf_counter()
                model.fit(x, yy, batch_size=batch, epochs=1, verbose=0, shuffle=False)
            except Exception as exc:  # noqa: BLE001
                emit("error", part="train", policy=policy, batch=batch, error=f"{type(exc).__name__}: {exc}"[:1000])
                continue
            per_s = len(x) / (time.perf_counter() - t0)
            emit("train", policy=policy, batch=batch, augment=augment, ema=cfg.ema_momentum, steps=steps,
                 scans_per_s=round(per_s, 1),
                 shipped_recipe_minutes=round(cfg.epochs * train_scans / per_s / 60, 2))
    keras.mixed_precision.set_global_policy("float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=Path, required=True, help="a folder of real .jpg scans")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--workers", default="1,4,8")
    parser.add_argument("--run-batch", type=int, default=32)
    parser.add_argument("--policies", default="float32,mixed_float16,mixed_bfloat16")
    parser.add_argument("--train-batches", default="32,128")
    parser.add_argument("--no-augment", action="store_true", help="time the network's step alone")
    parser.add_argument("--only", default="model,run,train")
    args = parser.parse_args()
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731

    import keras

    from vision.modelio import read_card

    emit("device", gpu=device_name(), backend=keras.backend.backend(), keras=keras.__version__,
         cpus=os.cpu_count(), machine=platform.machine())
    card = read_card(Path(args.model))
    arrays = real_arrays(args.scans, card["preprocessing"], 512)
    parts = {
        "model": lambda: model_rates(args.model, arrays, ints(args.batches), args.repeats),
        "run": lambda: run_rates(args.model, args.scans, ints(args.workers), args.run_batch),
        "train": lambda: train_rates(arrays, len(card["train_sha256"]), args.policies.split(","),
                                     ints(args.train_batches), not args.no_augment),
    }
    for name in args.only.split(","):
        try:  # one failing part must not cost the others' figures: device time is scarce
            parts[name]()
        except Exception as exc:  # noqa: BLE001
            emit("error", part=name, error=f"{type(exc).__name__}: {exc}"[:2000])


if __name__ == "__main__":
    main()

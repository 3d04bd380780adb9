"""Model throughput on this machine: forward-only vs forward + batched Grad-CAM, scans/s, one JSON line.

Usage: python bench/model.py [--model models/brainscan-v1.keras] [--batch 64] [--repeats 10]
                             [--precision auto[,float32,mixed_bfloat16,int8]] [--batchnorm folded[,kept]]
One line per precision and batch-norm treatment, all in one run: `kept` serves the saved graph as it is.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from config import DEFAULT_MODEL  # noqa: E402


def rate(fn, batch: np.ndarray, repeats: int) -> float:
    fn(batch)  # trace and warm up
    fn(batch)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(batch)
    return repeats * len(batch) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--precision", default="auto", help="comma-separated serving precisions to measure")
    parser.add_argument("--batchnorm", default="folded", help="folded (as served), kept, or both comma-separated")
    args = parser.parse_args()
    for precision in args.precision.split(","):
        for batchnorm in args.batchnorm.split(","):
            if precision == "int8" and batchnorm == "kept":
                continue  # the int8 file is quantized from the folded graph: there is no kept variant
            measure(args, precision, batchnorm)


def measure(args, precision: str, batchnorm: str) -> None:
    """Print one JSON line of rates for the model served in `precision`, batch norm folded or kept."""
    from vision.preprocess import prepare_bytes
    from vision.runtime import Runtime, cpu_description

    rt = Runtime(args.model, warm_batch=args.batch, precision=precision, fold=batchnorm == "folded")
    scans = sorted((Path(__file__).resolve().parent.parent / "examples" / "scans").glob("*/*.jpg"))
    arrays = [prepare_bytes(p.read_bytes(), rt.preprocessing).array for p in scans]
    batch = np.stack([arrays[i % len(arrays)] for i in range(args.batch)])
    forward = rate(rt.explainer.forward, batch, args.repeats)
    with_cam = rate(rt.explain, batch, args.repeats)
    print(json.dumps({
        "model": Path(args.model).name, "model_sha256": rt.sha256[:12], "batch": args.batch,
        "parameters": rt.model.card.get("parameters"), "flops_per_scan": rt.model.card.get("flops_per_scan"),
        "forward_scans_per_s": round(forward, 1), "forward_gradcam_scans_per_s": round(with_cam, 1),
        "gradcam_cost_ratio": round(forward / with_cam, 3), "precision": rt.precision, "batchnorm": batchnorm,
        "mirror": rt.mirror,
        "device": "GPU" if rt.gpus else f"CPU ({cpu_description()})",
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
    }))


if __name__ == "__main__":
    main()

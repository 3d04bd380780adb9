"""What a worker spends per scan outside the model: `process_batch` on real scans (SQLite), its time split into the
model's forward + Grad-CAM and everything else (reading, checking, decoding, preprocessing, recording). On a GPU the
model is nearly free, so the second figure bounds what one worker process can feed it. Then the preparation
alone (`prepare_new`, batch by batch) with one thread and with the worker's threads, on the same scans. One JSON line.

Usage: python bench/batch.py [--scans 320] [--batch 32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pipeline import link_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scans", type=int, default=320)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.pop("DATABASE_URL", None)
        os.environ["BRAINSCAN_VAR"] = str(Path(tmp) / "var")
        from sqlalchemy import select

        from config import load_settings
        from db.models import Scan
        from db.session import session_scope
        from jobs.lifecycle import new_job
        from jobs.processing import process_batch
        from vision.runtime import Runtime

        settings = load_settings()
        job = new_job(settings, link_folder(Path(tmp) / "archive", args.scans))
        with session_scope(settings.database_url) as s:
            ids = list(s.scalars(select(Scan.id).where(Scan.job_id == job).order_by(Scan.id)))
        runtime = Runtime(settings.model_path, warm_batch=args.batch)
        explain, in_model = runtime.explain, [0.0]

        def timed(arrays):
            t0 = time.perf_counter()
            try:
                return explain(arrays)
            finally:
                in_model[0] += time.perf_counter() - t0

        runtime.explain = timed
        t0 = time.perf_counter()
        for i in range(0, len(ids), args.batch):
            process_batch(settings.database_url, runtime, job, ids[i : i + args.batch])
        total = time.perf_counter() - t0
        prepare = prepare_rates(settings.database_url, job, args.batch, runtime)
    print(json.dumps({"scans": len(ids), "batch": args.batch, "seconds": round(total, 2),
                      "model_ms_per_scan": round(1000 * in_model[0] / len(ids), 2),
                      "host_ms_per_scan": round(1000 * (total - in_model[0]) / len(ids), 2), **prepare}))


def prepare_rates(url: str, job_id: int, batch: int, runtime, rounds: int = 3) -> dict:
    """ms per scan of prepare_new with 1 thread and with the runtime's, alternating; the best round of each."""
    from sqlalchemy import select

    from db.models import Job, Scan
    from db.session import session_scope
    from jobs.processing import prepare_new

    with session_scope(url) as s:
        job = s.get(Job, job_id)
        scans = list(s.scalars(select(Scan).where(Scan.job_id == job_id).order_by(Scan.id)))
        s.expunge_all()
    best = {1: float("inf"), runtime.threads: float("inf")}
    for _ in range(rounds):
        for threads in best:
            t0 = time.perf_counter()
            for i in range(0, len(scans), batch):
                prepare_new(job, scans[i : i + batch], {}, runtime.preprocessing, threads)
            best[threads] = min(best[threads], 1000 * (time.perf_counter() - t0) / len(scans))
    return {f"prepare_ms_per_scan_{t}_threads": round(ms, 2) for t, ms in best.items()}


if __name__ == "__main__":
    main()

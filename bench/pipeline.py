"""End-to-end throughput: `cli.py run` and one Celery worker vs the bare model on the same decoded scans.

Prints one JSON line: scans/s through `cli.py run` (SQLite, one local worker process) and through
one Celery worker (Redis + PostgreSQL), the bare forward+Grad-CAM rate on the same scans already
decoded, their ratios, and the time `submit` takes to record a 20,000-file folder.

Usage: python bench/pipeline.py [--scans 2000] [--submit-files 20000]
Needs ../shared/data/brain-tumor-mri/Training, Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TRAINING = ROOT.parent / "shared" / "data" / "brain-tumor-mri" / "Training"


def link_folder(dest: Path, n: int, repeat: bool = False) -> Path:
    """n files in class folders, hard links of real scans (distinct scans unless repeat)."""
    sources = sorted(TRAINING.glob("*/*.jpg"))
    if not repeat:
        sources = sources[:: max(1, len(sources) // n)][:n]
    for i in range(n):
        src = sources[i % len(sources)]
        target = dest / src.parent.name / f"{i // len(sources):02d}" / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, target)
    return dest


def steady_rate(url: str, job_id: int) -> float:
    """Scans/s from the first batch's results to the last (process start and model load excluded)."""
    from sqlalchemy import func, select

    from db.models import Scan
    from db.session import session_scope

    with session_scope(url) as s:
        first, last, n = s.execute(select(func.min(Scan.finished_at), func.max(Scan.finished_at), func.count())
                                   .where(Scan.job_id == job_id)).one()
        in_first = s.scalar(select(func.count()).where(Scan.job_id == job_id, Scan.finished_at == first))
    return (n - in_first) / (last - first).total_seconds()


def bare_rate(model: str, folder: Path, batch: int) -> float:
    """Forward + Grad-CAM on the scans already decoded and preprocessed, in batches like the pipeline."""
    import numpy as np

    from config import load_settings
    from vision.preprocess import prepare_bytes
    from vision.runtime import Runtime

    rt = Runtime(model, warm_batch=batch, precision=load_settings().precision)  # as `run` and the worker serve
    arrays = np.stack([prepare_bytes(p.read_bytes(), rt.preprocessing).array for p in sorted(folder.rglob("*.jpg"))])
    rt.explain(arrays[len(arrays) - len(arrays) % batch :] if len(arrays) % batch else arrays[:batch])
    # The short last batch is a second shape: compiled here, as a warm worker has it, not inside the timing.
    t0 = time.perf_counter()
    for i in range(0, len(arrays), batch):
        rt.explain(arrays[i : i + batch])
    return len(arrays) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scans", type=int, default=2000)
    parser.add_argument("--submit-files", type=int, default=20000)
    parser.add_argument("--model", default=str(ROOT / "models" / "brainscan-v1.keras"))
    args = parser.parse_args()

    from config import load_settings
    from jobs.lifecycle import enqueue_job, new_job, run_job, wait
    from tests.services import Worker, drop_database, fresh_database

    out: dict = {"scans": args.scans}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = link_folder(tmp / "archive", args.scans)
        base_env = {"BRAINSCAN_MODEL": args.model, "BRAINSCAN_QUEUE": f"bench-{os.getpid()}"}

        os.environ.update(base_env, BRAINSCAN_VAR=str(tmp / "var-run"))
        os.environ.pop("DATABASE_URL", None), os.environ.pop("BROKER_URL", None)
        settings = load_settings()
        t0 = time.perf_counter()
        job = new_job(settings, folder)
        run_job(settings, job)
        out["run_wall_s"] = round(time.perf_counter() - t0, 2)
        out["run_scans_per_s"] = round(steady_rate(settings.database_url, job), 1)

        pg = fresh_database()
        try:
            os.environ.update(DATABASE_URL=pg, BROKER_URL="redis://127.0.0.1:6379/0",
                              BRAINSCAN_VAR=str(tmp / "var-celery"))
            settings = load_settings()
            new_job(settings, folder / "glioma")  # creates the schema; the worker then finds it warm
            worker = Worker({**os.environ, "PYTHONPATH": str(ROOT)}, tmp / "worker.log").wait_ready()
            try:
                t0 = time.perf_counter()
                job = new_job(settings, folder)
                enqueue_job(settings, job)
                wait(settings, job, poll=0.2)
                out["celery_wall_s"] = round(time.perf_counter() - t0, 2)
                out["celery_scans_per_s"] = round(steady_rate(settings.database_url, job), 1)
            finally:
                worker.stop()
        finally:
            from db.session import dispose_engines

            dispose_engines()
            drop_database(pg)

        out["bare_forward_gradcam_scans_per_s"] = round(bare_rate(args.model, folder, settings.batch_size), 1)
        out["run_vs_bare"] = round(out["run_scans_per_s"] / out["bare_forward_gradcam_scans_per_s"], 3)
        out["celery_vs_bare"] = round(out["celery_scans_per_s"] / out["bare_forward_gradcam_scans_per_s"], 3)

        big = link_folder(tmp / "big", args.submit_files, repeat=True)
        os.environ.pop("DATABASE_URL"), os.environ.pop("BROKER_URL")
        os.environ["BRAINSCAN_VAR"] = str(tmp / "var-submit")
        settings = load_settings()
        new_job(settings, folder / "glioma")  # schema first, so only recording the folder is timed
        t0 = time.perf_counter()
        new_job(settings, big)
        out["submit_files"] = args.submit_files
        out["submit_seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

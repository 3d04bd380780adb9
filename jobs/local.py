"""`run` without a broker: local worker processes calling the same batch function as the Celery task.

Processes are spawned, not forked, and the parent never imports TensorFlow. A worker that dies
breaks the pool; the pool is rebuilt, its leases released, and retried scans go one at a time
so a poison scan is quarantined while the rest of its batch completes. A process that cannot load the
model does not die: it raises that error from its first batch, so `run` stops at once with the reason
instead of rebuilding a pool that would fail the same way.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from sqlalchemy import select

from config import Settings
from db.models import Job, Scan
from db.session import session_scope
from jobs.submission import batches

_RUNTIME = None
_INIT_ERROR: Exception | None = None


def _init(model_path: str, threads: int, precision: str) -> None:
    global _RUNTIME, _INIT_ERROR
    from vision.runtime import Runtime

    try:
        _RUNTIME = Runtime(model_path, cpu_threads=threads, precision=precision)
    except Exception as exc:  # an initializer that raises only breaks the pool, and the reason is lost
        _INIT_ERROR = exc


def _batch(url: str, job_id: int, ids: list[int], max_attempts: int, lease_seconds: int) -> dict:
    from jobs.processing import process_batch

    if _INIT_ERROR is not None:
        raise _INIT_ERROR
    outcome = process_batch(url, _RUNTIME, job_id, ids, max_attempts=max_attempts, lease_seconds=lease_seconds)
    return {**outcome.as_dict(), "n": len(ids)}


def _pending(url: str, job_id: int) -> list[int]:
    with session_scope(url) as session:
        return list(session.scalars(
            select(Scan.id).where(Scan.job_id == job_id, Scan.status == "pending").order_by(Scan.id)))


def run_local(settings: Settings, job_id: int, workers: int | None = None, on_batch=None, max_rounds: int = 20) -> None:
    """Process every pending scan of a job with local worker processes until none is left."""
    from jobs.processing import release_leases
    from vision.runtime import check_servable

    check_servable(settings.model_path, settings.precision)
    workers = max(1, workers or settings.local_workers)
    threads = max(1, (os.cpu_count() or 1) // workers)
    url = settings.database_url
    with session_scope(url) as session:
        batch_size = session.get(Job, job_id).batch_size
    context = multiprocessing.get_context("spawn")
    for _ in range(max_rounds):
        pending = _pending(url, job_id)
        if not pending:
            return
        # After a crash every remaining scan was leased by a process that is gone.
        release_leases(url, pending)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init,
                                 initargs=(str(settings.model_path), threads, settings.precision)) as pool:
            futures = [pool.submit(_batch, url, job_id, ids, settings.max_attempts, settings.lease_seconds)
                       for ids in batches(pending, batch_size)]
            try:
                for future in as_completed(futures):
                    counts = future.result()
                    if on_batch:
                        on_batch(counts)
            except BrokenProcessPool:
                continue  # a worker died mid-batch: rebuild the pool and go again
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the model failed to load: don't wait for the other batches
                raise
    raise RuntimeError(f"job {job_id}: scans still pending after {max_rounds} rounds of local workers")

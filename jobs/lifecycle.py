"""Submitting a job (commit, then enqueue), waiting on it with reconciliation, and running it locally."""
from __future__ import annotations

import time
from pathlib import Path

from config import Settings
from db.models import Job
from db.session import session_scope, upgrade, with_retry
from jobs.progress import Progress, finish_if_complete, progress, resume
from jobs.queue import enqueue_batches, queue_length
from jobs.submission import batches, create_job, pending_ids


def open_database(settings: Settings) -> None:
    """Create or upgrade the schema (Alembic), retrying while the database comes up."""
    with_retry(lambda: upgrade(settings.database_url), url=settings.database_url)


def new_job(settings: Settings, folder: Path, labels_csv: Path | None = None, batch_size: int | None = None,
            follow_links: bool = False) -> int:
    """Record a job and all its scans in one committed transaction; returns its id."""
    open_database(settings)
    with session_scope(settings.database_url) as session:
        job = create_job(session, Path(folder), settings.model_path, batch_size or settings.batch_size,
                         labels_csv=labels_csv, follow_links=follow_links)
        job_id = job.id
    return job_id


def enqueue_job(settings: Settings, job_id: int) -> int:
    """Enqueue every pending scan of a committed job in batches; returns tasks sent."""
    with session_scope(settings.database_url) as session:
        ids = pending_ids(session, job_id, respect_leases=False)
        size = session.get_one(Job, job_id).batch_size
    return enqueue_batches(settings, job_id, batches(ids, size))


def submit_and_enqueue(settings: Settings, folder, labels_csv=None, batch_size=None) -> int:
    """Record a job, commit, then enqueue it; returns the job id."""
    job_id = new_job(settings, Path(folder), labels_csv, batch_size)
    enqueue_job(settings, job_id)
    return job_id


def wait(settings: Settings, job_id: int, on_progress=None, poll: float = 1.0, stall_seconds: float = 30.0,
         timeout: float | None = None) -> Progress:
    """Poll until the job is complete; re-enqueue lost work when nothing moves and the queue is empty."""
    last_finished, last_change = -1, time.monotonic()
    started = time.monotonic()
    while True:
        with session_scope(settings.database_url) as session:
            p = with_retry(lambda: progress(session, job_id), url=settings.database_url)
            if p.pending == 0:
                finish_if_complete(session, job_id)
                p = progress(session, job_id)
        if on_progress:
            on_progress(p)
        if p.pending == 0:
            return p
        now = time.monotonic()
        if p.finished != last_finished:
            last_finished, last_change = p.finished, now
        elif now - last_change > stall_seconds and p.leased == 0 and queue_length(settings) == 0:
            # Nothing is queued, nobody holds a lease and nothing moved: the messages were lost.
            with session_scope(settings.database_url) as session:
                resume(settings, session, job_id)
            last_change = now
        if timeout is not None and now - started > timeout:
            return p
        time.sleep(poll)


def run_job(settings: Settings, job_id: int, workers: int | None = None, on_batch=None) -> Progress:
    """Process a job with local worker processes and mark it complete."""
    from jobs.local import run_local

    run_local(settings, job_id, workers=workers, on_batch=on_batch)
    with session_scope(settings.database_url) as session:
        finish_if_complete(session, job_id)
        return progress(session, job_id)

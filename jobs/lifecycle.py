"""Submitting a job (commit, then enqueue), waiting on it with reconciliation, and running it locally."""
from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy.exc import OperationalError

from config import Settings
from db.models import Job
from db.session import DatabaseUnavailable, safe_url, session_scope, upgrade, with_retry
from jobs.progress import Progress, finish_if_complete, progress, resume
from jobs.queue import BrokerUnavailable, enqueue_batches, queue_length
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


def _poll(settings: Settings, job_id: int) -> Progress:
    """Where the job stands, marking it complete (metrics stored) once nothing is pending."""
    with session_scope(settings.database_url) as session:
        p = progress(session, job_id)
        if p.pending == 0:
            finish_if_complete(session, job_id)
            p = progress(session, job_id)
    return p


def wait(settings: Settings, job_id: int, on_progress=None, poll: float = 1.0, stall_seconds: float = 30.0,
         timeout: float | None = None, outage_seconds: float = 600.0) -> Progress:
    """Poll until the job is complete; re-enqueue lost work when nothing moves and the queue is empty.

    The database and the broker may restart meanwhile. A poll that cannot reach the database is tried
    again, in a fresh session, until the database has been unreachable for outage_seconds (then
    DatabaseUnavailable); a reconciliation that fails is tried again after the next stall.
    """
    last_finished, last_change = -1, time.monotonic()
    started = time.monotonic()
    down_since = None
    while True:
        now = time.monotonic()
        try:
            p = _poll(settings, job_id)
        except OperationalError as exc:
            down_since = down_since or now
            if now - down_since > outage_seconds or (timeout is not None and now - started > timeout):
                raise DatabaseUnavailable(
                    f"database {safe_url(settings.database_url)} unreachable for {now - down_since:.0f} s "
                    f"while waiting on job {job_id}: {type(exc.orig).__name__}") from None
            time.sleep(max(poll, 2.0))
            continue
        if down_since is not None:
            # Nothing could move while the database was down: let the workers' retries catch up
            # before deciding that messages were lost.
            down_since, last_change = None, now
        if on_progress:
            on_progress(p)
        if p.pending == 0:
            return p
        if p.finished != last_finished:
            last_finished, last_change = p.finished, now
        elif now - last_change > stall_seconds and p.leased == 0 and queue_length(settings) == 0:
            # Nothing is queued, nobody holds a lease and nothing moved: the messages were lost.
            try:
                with session_scope(settings.database_url) as session:
                    resume(settings, session, job_id)
            except (OperationalError, BrokerUnavailable):
                pass  # a service went away again; the next stall tries again
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

"""Celery tasks: take ids, re-read the world from the database, call a plain function."""
from __future__ import annotations

from sqlalchemy.exc import OperationalError

from db.session import session_scope
from jobs.processing import process_batch
from jobs.progress import finish_if_complete
from jobs.queue import PROCESS_BATCH, SUBMIT_ARCHIVE
from worker.app import app, runtime, settings


def _backoff(retries: int) -> int:
    return min(2 ** retries, 30)


@app.task(name=PROCESS_BATCH, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=50)
def process_batch_task(self, job_id: int, scan_ids: list[int]) -> dict:
    """Classify one batch of a job's scans; redelivery-safe."""
    try:
        outcome = process_batch(settings.database_url, runtime(), job_id, scan_ids,
                                max_attempts=settings.max_attempts, lease_seconds=settings.lease_seconds)
        with session_scope(settings.database_url) as session:
            finish_if_complete(session, job_id)
    except OperationalError as exc:
        # Database down or restarting: back off and try the same batch again.
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from None
    if outcome.deferred:
        # Another worker held these when we looked; come back when its lease ends.
        raise self.retry(args=[job_id, outcome.deferred], countdown=outcome.retry_after, max_retries=None)
    return outcome.as_dict()


@app.task(name=SUBMIT_ARCHIVE, bind=True, max_retries=5)
def submit_archive_task(self, folder: str) -> int:
    """The nightly job of one archive root, as the scheduler submits it."""
    from jobs.lifecycle import submit_and_enqueue

    try:
        return submit_and_enqueue(settings, folder)
    except OperationalError as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from None

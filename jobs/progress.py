"""Where a job stands: counts by status, rate, ETA; completion; resuming lost work."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from db.models import Job, Scan
from jobs.submission import batches, pending_ids


class JobNotFound(Exception):
    """No job with that id, or no job at all."""


@dataclass
class Progress:
    job_id: int
    total: int
    done: int
    failed: int
    pending: int
    leased: int
    elapsed: float
    status: str

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def rate(self) -> float:
        """Scans finished per second since the job was created."""
        return self.finished / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        return self.pending / self.rate if self.rate > 0 else None

    def as_dict(self) -> dict:
        return {"job": self.job_id, "status": self.status, "total": self.total, "done": self.done,
                "failed": self.failed, "pending": self.pending, "in_progress": self.leased,
                "scans_per_second": round(self.rate, 2), "eta_seconds": None if self.eta is None else round(self.eta)}


def _aware(ts: datetime | None) -> datetime | None:
    return ts if ts is None or ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def resolve_job(session: Session, job_id: int | None) -> Job:
    """The job with that id, or the latest job when id is None."""
    job = session.get(Job, job_id) if job_id is not None else session.scalars(
        select(Job).order_by(Job.id.desc()).limit(1)).first()
    if job is None:
        raise JobNotFound(f"job {job_id} not found" if job_id is not None else "no jobs yet: submit a folder first")
    return job


def progress(session: Session, job_id: int) -> Progress:
    """Counts of a job's scans by status, in one query."""
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} not found")
    now = datetime.now(timezone.utc)
    row = session.execute(
        select(
            func.count(),
            func.sum(case((Scan.status == "done", 1), else_=0)),
            func.sum(case((Scan.status == "failed", 1), else_=0)),
            func.sum(case((Scan.status == "pending", 1), else_=0)),
            func.sum(case(((Scan.status == "pending") & (Scan.lease_until > now), 1), else_=0)),
        ).where(Scan.job_id == job_id)
    ).one()
    total, done, failed, pending, leased = (int(v or 0) for v in row)
    end = _aware(job.finished_at) or now
    return Progress(job_id, total, done, failed, pending, leased, (end - _aware(job.created_at)).total_seconds(),
                    job.status)


def finish_if_complete(session: Session, job_id: int) -> bool:
    """Mark a job complete, with its metrics stored, once no scan is pending. True if complete."""
    from jobs.report import store_report

    p = progress(session, job_id)
    if p.pending:
        return False
    job = session.get(Job, job_id)
    if job.status != "complete":
        last = session.scalar(select(func.max(Scan.finished_at)).where(Scan.job_id == job_id))
        job.status = "complete"
        job.finished_at = last or datetime.now(timezone.utc)
    store_report(session, job_id)
    return True


def resume(settings, session: Session, job_id: int) -> int:
    """Re-enqueue every pending scan of a job that no worker holds a live lease on; returns scans sent."""
    from jobs.queue import enqueue_batches

    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} not found")
    ids = pending_ids(session, job_id, now=datetime.now(timezone.utc))
    if ids:
        enqueue_batches(settings, job_id, batches(ids, job.batch_size))
    return len(ids)

"""`jobs`: every job newest first, with its counts, accuracy, status and model, in two queries."""
from __future__ import annotations

from datetime import timezone

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Job, Model, Scan

COLUMNS = ("id", "started", "folder", "scans", "failed", "accuracy", "status", "model")


def list_jobs(session: Session, limit: int | None = None) -> list[dict]:
    """Jobs newest first (by start, then id): id, started (ISO 8601 UTC), folder, scans, failed, accuracy,
    status, model name."""
    query = (select(Job.id, Job.created_at, Job.folder, Job.total, Job.accuracy, Job.status, Model.name)
             .join(Model, Job.model_sha256 == Model.sha256)
             .order_by(Job.created_at.desc(), Job.id.desc()))
    if limit:
        query = query.limit(limit)
    rows = session.execute(query).all()
    ids = [r.id for r in rows]
    failed = dict(session.execute(
        select(Scan.job_id, func.count()).where(Scan.job_id.in_(ids), Scan.status == "failed").group_by(Scan.job_id)
    ).all()) if ids else {}
    return [
        {
            "id": r.id,
            "started": (r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=timezone.utc))
            .astimezone(timezone.utc).isoformat(timespec="seconds"),
            "folder": r.folder,
            "scans": r.total,
            "failed": int(failed.get(r.id, 0)),
            "accuracy": r.accuracy,
            "status": r.status,
            "model": r.name,
        }
        for r in rows
    ]


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def format_jobs(jobs: list[dict], folder_width: int = 40) -> str:
    """Aligned text, one job a line; long folders keep their last characters."""
    if not jobs:
        return "no jobs yet: submit a folder first"
    lines = [f"{'id':>5}  {'started (UTC)':<16}  {'folder':<{folder_width}}  {'scans':>7}  {'failed':>6}  "
             f"{'accuracy':>8}  {'status':<8}  model"]
    for j in jobs:
        acc = "-" if j["accuracy"] is None else f"{j['accuracy']:.4f}"
        lines.append(f"{j['id']:>5}  {j['started'][:16].replace('T', ' '):<16}  "
                     f"{_short(j['folder'], folder_width):<{folder_width}}  {j['scans']:>7}  {j['failed']:>6}  "
                     f"{acc:>8}  {j['status']:<8}  {j['model']}")
    return "\n".join(lines)

"""The batch function: the one thing a Celery task and a local worker process both call.

It re-reads the world from the database, claims its scans with a lease, reuses cached
results, classifies the rest in one batched pass and writes everything in one commit.
"""
from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
from sqlalchemy import bindparam, select, update

from db.models import Job, Result, Scan
from db.session import session_scope
from db.upsert import insert_ignore
from jobs import sources
from jobs.heatmaps import to_stored
from vision.decode import HEAD_BYTES, sniff
from vision.errors import ModelError, ScanError
from vision.preprocess import prepare_bytes

# pydicom is not documented as safe in threads (its global config is not: pydicom issue 2220), so DICOM scans are
# decoded one at a time; image files go through Pillow, which releases the GIL and keeps no shared state.
_ONE_DICOM_AT_A_TIME = threading.Lock()


@dataclass
class BatchOutcome:
    done: int = 0
    cached: int = 0
    failed: int = 0
    quarantined: int = 0
    skipped: int = 0
    errors: dict = field(default_factory=dict)
    # Pending scans another worker holds a live lease on, and when the earliest lease ends.
    deferred: list = field(default_factory=list)
    retry_after: float = 0.0

    def merge(self, other: "BatchOutcome") -> "BatchOutcome":
        for name in ("done", "cached", "failed", "quarantined", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.update(other.errors)
        return self

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("done", "cached", "failed", "quarantined", "skipped")}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def read_scan(folder: str, relpath: str, expected_sha: str) -> bytes:
    """The bytes of a scan's file as submitted (from a folder or ZIP archive; for a frame of a multi-frame
    DICOM object, its whole file); ScanError if missing, unreadable or changed since submit."""
    file_relpath, frame = sources.split_frame(relpath)
    data = sources.read_bytes(folder, file_relpath)
    if expected_sha and sources.scan_sha256(hashlib.sha256(data).hexdigest(), frame) != expected_sha:
        raise ScanError("file changed after submit (SHA-256 differs)")
    if not expected_sha:
        raise ScanError("file could not be read at submit")
    return data


def claim(session, scan_ids: list[int], lease_seconds: int) -> list[int]:
    """Take a lease on the pending, unleased scans among scan_ids, counting an attempt for each."""
    now = _now()
    claimed = session.scalars(
        update(Scan)
        .where(Scan.id.in_(scan_ids), Scan.status == "pending",
               (Scan.lease_until.is_(None)) | (Scan.lease_until < now))
        .values(attempts=Scan.attempts + 1, lease_until=now + timedelta(seconds=lease_seconds))
        .returning(Scan.id)
    ).all()
    return sorted(claimed)


def quarantine(session, scan_ids: list[int], max_attempts: int) -> int:
    """Fail scans that were claimed max_attempts times without a result: they kill their worker."""
    result = session.execute(
        update(Scan)
        .where(Scan.id.in_(scan_ids), Scan.status == "pending", Scan.attempts >= max_attempts)
        .values(status="failed", lease_until=None, finished_at=_now(),
                error=f"quarantined: processing was interrupted {max_attempts} times "
                      "(the scan kills or hangs its worker)")
    )
    return result.rowcount or 0


def prepare_scan(job: Job, scan: Scan, params: dict):
    """Read, check and preprocess one scan; ScanError with the reason."""
    data = read_scan(job.folder, scan.path, scan.sha256)
    frame = sources.split_frame(scan.path)[1]
    if sniff(data[:HEAD_BYTES]) == "DICOM":
        with _ONE_DICOM_AT_A_TIME:
            return prepare_bytes(data, params, frame=frame)
    return prepare_bytes(data, params, frame=frame)


def prepare_new(job: Job, scans: list[Scan], cached: dict, params: dict, threads: int = 1) -> tuple[dict, dict, dict]:
    """The batch's contents without a result yet, prepared `threads` at a time: (prepared arrays by SHA-256, the
    scan whose result each one becomes, failure reasons by scan id). A content whose file fails at one path is
    tried at the next path that holds it; its later copies reuse the result."""
    twins: dict[str, list[Scan]] = {}
    for scan in scans:
        if scan.sha256 not in cached:
            twins.setdefault(scan.sha256, []).append(scan)

    def first_readable(group: list[Scan]):
        reasons = {}
        for scan in group:
            try:
                return scan.id, prepare_scan(job, scan, params), reasons
            except ScanError as exc:
                reasons[scan.id] = str(exc)
        return None, None, reasons

    if threads > 1 and len(twins) > 1:
        # Pillow decodes and resizes with the GIL released: 2 threads prepare batches of 32 1.09-1.28x faster than
        # one on 2 cores (bench/batch.py); a GPU host has the cores and nothing else to do with them.
        with ThreadPoolExecutor(min(threads, len(twins))) as pool:
            outcomes = list(pool.map(first_readable, twins.values()))
    else:
        outcomes = [first_readable(group) for group in twins.values()]
    prepared, computed_by, failures = {}, {}, {}
    for sha, (scan_id, array, reasons) in zip(twins, outcomes):
        failures.update(reasons)
        if scan_id is not None:
            prepared[sha], computed_by[sha] = array, scan_id
    return prepared, computed_by, failures


def classify(url: str, runtime, job: Job, scans: list[Scan]) -> BatchOutcome:
    """Results for claimed scans: cached ones linked, new ones computed, broken ones failed; one commit."""
    outcome = BatchOutcome()
    with session_scope(url) as session:
        shas = {s.sha256 for s in scans if s.sha256}
        cached = dict(session.execute(
            select(Result.sha256, Result.id).where(Result.sha256.in_(shas), Result.model_sha256 == runtime.sha256)
        ).all()) if shas else {}
        prepared, computed_by, failures = prepare_new(job, scans, cached, runtime.preprocessing, runtime.threads)
        if prepared:
            shas_new = list(prepared)
            probs, cams = runtime.explain(np.stack([prepared[s].array for s in shas_new]))
            rows = []
            for i, sha in enumerate(shas_new):
                cam = to_stored(cams[i])
                rows.append({
                    "sha256": sha, "model_sha256": runtime.sha256,
                    "predicted_label": runtime.classes[int(np.argmax(probs[i]))],
                    "probabilities": [round(float(p), 6) for p in probs[i]],
                    "heatmap": cam.tobytes(), "heatmap_height": cam.shape[0], "heatmap_width": cam.shape[1],
                    "geometry": prepared[sha].geometry(), "served_in": runtime.precision, "created_at": _now(),
                })
            # A redelivered batch, or two jobs racing on the same bytes, keep the first result.
            insert_ignore(session, Result.__table__, rows, ["sha256", "model_sha256"])
            fresh = dict(session.execute(
                select(Result.sha256, Result.id).where(Result.sha256.in_(shas_new),
                                                       Result.model_sha256 == runtime.sha256)
            ).all())
        else:
            fresh = {}
        failed, done = [], []
        for scan in scans:
            if scan.id in failures:
                failed.append({"scan_id": scan.id, "reason": failures[scan.id]})
                outcome.failed += 1
                outcome.errors[scan.path] = failures[scan.id]
            elif scan.sha256 in cached or computed_by[scan.sha256] != scan.id:
                # A byte-identical copy later in the same batch reuses its twin's result, as a cache hit.
                done.append({"scan_id": scan.id, "result": cached.get(scan.sha256) or fresh[scan.sha256],
                             "cache_hit": True})
                outcome.cached += 1
            else:
                done.append({"scan_id": scan.id, "result": fresh[scan.sha256], "cache_hit": False})
                outcome.done += 1
        finish(session, failed, done)
    return outcome


def finish(session, failed: list[dict], done: list[dict]) -> None:
    """Mark scans failed (scan_id, reason) and done (scan_id, result, cache_hit), each kind in one executemany;
    a scan that is no longer pending is left as it is."""
    scans = Scan.__table__
    pending = update(scans).where(scans.c.id == bindparam("scan_id"), scans.c.status == "pending")
    now = _now()
    if failed:
        session.execute(pending.values(status="failed", error=bindparam("reason"), lease_until=None, finished_at=now),
                        failed)
    if done:
        session.execute(pending.values(status="done", result_id=bindparam("result"), from_cache=bindparam("cache_hit"),
                                       lease_until=None, finished_at=now), done)


def process_batch(url: str, runtime, job_id: int, scan_ids: list[int], *, max_attempts: int = 3,
                  lease_seconds: int = 600) -> BatchOutcome:
    """Process one batch of a job's scans; safe to run again for the same ids (redelivery)."""
    outcome = BatchOutcome()
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        if job is None:
            outcome.skipped = len(scan_ids)
            return outcome
        if job.model_sha256 != runtime.sha256:
            raise ModelError(f"job {job_id} was submitted for model {job.model_sha256[:12]}…, "
                             f"this worker serves {runtime.sha256[:12]}…")
        session.expunge(job)
        outcome.quarantined = quarantine(session, scan_ids, max_attempts)
        outcome.skipped -= outcome.quarantined  # counted again below as not claimed
        retried = set(session.scalars(
            select(Scan.id).where(Scan.id.in_(scan_ids), Scan.status == "pending", Scan.attempts > 0)
        ))
    if retried:
        # Someone died on this batch before: go one scan at a time so only a poison scan pays.
        groups = [[sid] for sid in scan_ids]
    else:
        groups = [list(scan_ids)]
    for group in groups:
        with session_scope(url) as session:
            ids = claim(session, group, lease_seconds)
            scans = list(session.scalars(select(Scan).where(Scan.id.in_(ids)).order_by(Scan.id))) if ids else []
            for s in scans:
                session.expunge(s)
        if len(scans) < len(group):
            defer(url, outcome, group, ids)
        if scans:
            outcome.merge(classify(url, runtime, job, scans))
    return outcome


def defer(url: str, outcome: BatchOutcome, group: list[int], claimed: list[int]) -> None:
    """Note the scans of a group that are still pending under someone else's live lease."""
    with session_scope(url) as session:
        rows = session.execute(
            select(Scan.id, Scan.lease_until).where(Scan.id.in_(set(group) - set(claimed)), Scan.status == "pending")
        ).all()
    now = _now()
    for scan_id, lease in rows:
        outcome.deferred.append(scan_id)
        if lease is not None:
            lease = lease if lease.tzinfo else lease.replace(tzinfo=timezone.utc)
            wait = max(1.0, (lease - now).total_seconds())
            outcome.retry_after = wait if not outcome.retry_after else min(outcome.retry_after, wait)
    outcome.skipped += len(group) - len(claimed) - len(rows)


def release_leases(url: str, scan_ids: list[int]) -> None:
    """Drop the leases of scans whose worker is known to be dead, so they can be claimed at once."""
    with session_scope(url) as session:
        session.execute(update(Scan).where(Scan.id.in_(scan_ids), Scan.status == "pending").values(lease_until=None))

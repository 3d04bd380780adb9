"""Creating a job: find the scans, label them, record the job and every scan row in one commit."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from db.models import Job, Model, Scan
from jobs.labels import LabelError, label_from_path, label_keys, labelled, read_labels_csv
from jobs.scanning import list_scans
from vision.dicom import DicomInfo
from vision.modelio import read_card

NOT_DICOM = DicomInfo(0).columns()  # every row carries the DICOM columns: executemany needs one shape


def register_model(session: Session, model_path: Path) -> Model:
    """The database row of a model file, created from its card on first use."""
    card = read_card(model_path)
    model = session.get(Model, card["sha256"])
    if model is None:
        model = Model(sha256=card["sha256"], name=card.get("name", Path(model_path).stem),
                      path=str(model_path), card=card)
        session.add(model)
        session.flush()
    return model


def create_job(session: Session, folder: Path, model_path: Path, batch_size: int,
               labels_csv: Path | None = None, follow_links: bool = False) -> Job:
    """Record a job and all its scans (not yet committed: the caller commits, then enqueues).

    folder may be a ZIP archive; DICOM objects without pixel data are counted in job.skipped.
    """
    folder = Path(folder)
    labels = read_labels_csv(labels_csv) if labels_csv else None
    listing = list_scans(folder, follow_links=follow_links)
    found = listing.scans
    if labels is not None:
        unknown = sorted(set(labels) - {key for f in found for key in label_keys(f.relpath, _uid(f))})
        if unknown:
            raise LabelError(f"{labels_csv}: {len(unknown)} path(s) are not scans of {folder}, e.g. {unknown[0]!r}")
    model = register_model(session, model_path)
    job = Job(folder=str(folder.resolve()), model_sha256=model.sha256, batch_size=batch_size,
              labels_source=str(labels_csv) if labels_csv else "folders", total=len(found),
              skipped=listing.skipped)
    session.add(job)
    session.flush()
    rows = [
        {
            "job_id": job.id, "path": f.relpath, "sha256": f.sha256, "size": f.size,
            "true_label": labelled(labels, f.relpath, _uid(f)) if labels is not None else label_from_path(f.relpath),
            "status": "pending", "attempts": 0, "from_cache": False,
            **(f.dicom.columns() if f.dicom else NOT_DICOM),
        }
        for f in found
    ]
    # Executemany in chunks keeps memory flat for archives of tens of thousands of files.
    for start in range(0, len(rows), 5000):
        session.execute(insert(Scan), rows[start : start + 5000])
    return job


def _uid(found) -> str | None:
    return found.dicom.sop_instance_uid if found.dicom else None


def batches(scan_ids: list[int], size: int) -> list[list[int]]:
    """Consecutive groups of at most `size` ids."""
    return [scan_ids[i : i + size] for i in range(0, len(scan_ids), size)]


def pending_ids(session: Session, job_id: int, now=None, respect_leases: bool = True) -> list[int]:
    """Scans of a job with no result and, unless told otherwise, no live lease."""
    query = select(Scan.id).where(Scan.job_id == job_id, Scan.status == "pending")
    if respect_leases and now is not None:
        query = query.where((Scan.lease_until.is_(None)) | (Scan.lease_until < now))
    return list(session.scalars(query.order_by(Scan.id)))

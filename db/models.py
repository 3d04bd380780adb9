"""Tables: jobs, their scans, results cached by (scan content, model), models, stored metrics."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Model(Base):
    """A model file as identified by its SHA-256, with its card (classes, training hashes, validation)."""

    __tablename__ = "models"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)
    card: Mapped[dict] = mapped_column(JSON)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """One submission of a folder: its scans are all recorded before any is enqueued."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    folder: Mapped[str] = mapped_column(Text)
    model_sha256: Mapped[str] = mapped_column(ForeignKey("models.sha256"))
    batch_size: Mapped[int] = mapped_column(Integer)
    labels_source: Mapped[str] = mapped_column(Text, default="folders")
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | complete
    total: Mapped[int] = mapped_column(Integer, default=0)
    accuracy: Mapped[float | None] = mapped_column(Float)
    macro_f1: Mapped[float | None] = mapped_column(Float)
    report: Mapped[dict | None] = mapped_column(JSON)  # the stored `report --format json` object
    skipped: Mapped[int | None] = mapped_column(Integer)  # DICOM objects without pixel data left out at submit
    model: Mapped[Model] = relationship()


class Result(Base):
    """The classification of one scan content by one model; shared by every scan with those bytes."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("sha256", "model_sha256", name="uq_results_content_model"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(ForeignKey("models.sha256"))
    predicted_label: Mapped[str] = mapped_column(String(32))
    probabilities: Mapped[list] = mapped_column(JSON)  # in the model card's class order
    heatmap: Mapped[bytes] = mapped_column(LargeBinary)  # uint8, row-major, at the Grad-CAM layer's grid
    heatmap_height: Mapped[int] = mapped_column(Integer)
    heatmap_width: Mapped[int] = mapped_column(Integer)
    geometry: Mapped[dict] = mapped_column(JSON)  # {box: [l, t, r, b], width, height} on the scan's pixel grid
    # float32 or mixed_bfloat16 (vision.precision); NULL for results made before revision 0003 recorded it.
    served_in: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Scan(Base):
    """A file of a job. Ends `done` with a result or `failed` with a reason; `pending` until then."""

    __tablename__ = "scans"
    __table_args__ = (
        UniqueConstraint("job_id", "path", name="uq_scans_job_path"),
        Index("ix_scans_job_status", "job_id", "status"),
        Index("ix_scans_sha256", "sha256"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer, default=0)
    true_label: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | done | failed
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"))
    from_cache: Mapped[bool] = mapped_column(Boolean, default=False)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # DICOM scans only; Text because malformed files carry over-long values that must not fail a submit.
    study_instance_uid: Mapped[str | None] = mapped_column(Text)
    series_instance_uid: Mapped[str | None] = mapped_column(Text)
    sop_instance_uid: Mapped[str | None] = mapped_column(Text)
    modality: Mapped[str | None] = mapped_column(Text)
    series_description: Mapped[str | None] = mapped_column(Text)
    result: Mapped[Result | None] = relationship()


class ClassMetric(Base):
    """Per-class metrics of a job, one row per class and scope, so trends across nights are one query."""

    __tablename__ = "class_metrics"
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    scope: Mapped[str] = mapped_column(String(16), primary_key=True)  # all | unseen
    cls: Mapped[str] = mapped_column(String(32), primary_key=True)
    precision: Mapped[float | None] = mapped_column(Float)
    recall: Mapped[float | None] = mapped_column(Float)
    f1: Mapped[float | None] = mapped_column(Float)
    support: Mapped[int] = mapped_column(Integer)
    auc: Mapped[float | None] = mapped_column(Float)

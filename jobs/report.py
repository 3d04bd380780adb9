"""A job's report: metrics over labelled scans, with and without scans the model was trained on."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from db.models import ClassMetric, Job, Model, Result, Scan
from jobs.metrics import classification_metrics
from jobs.progress import JobNotFound

METRIC_FIELDS = ("accuracy", "per_class", "macro_avg", "weighted_avg", "confusion_matrix")


def seen_hashes(card: dict) -> set[str]:
    """SHA-256s of every scan the model was trained or validated on, from its card."""
    return set(card.get("train_sha256", [])) | set(card.get("validation_sha256", []))


def labelled_rows(session: Session, job_id: int):
    """(sha256, true label, predicted label, probabilities) of the job's done, labelled scans."""
    return session.execute(
        select(Scan.sha256, Scan.true_label, Result.predicted_label, Result.probabilities)
        .join(Result, Scan.result_id == Result.id)
        .where(Scan.job_id == job_id, Scan.status == "done", Scan.true_label.is_not(None))
        .order_by(Scan.id)
    ).all()


def _metrics(rows, classes: list[str]) -> dict:
    probs = np.array([r.probabilities for r in rows], dtype=np.float64).reshape(len(rows), len(classes))
    return classification_metrics([r.true_label for r in rows], [r.predicted_label for r in rows], probs, classes)


def job_report(session: Session, job_id: int) -> dict:
    """The report object of the output contract, plus unlabelled counts, failures and seen-in-training."""
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} not found")
    model = session.get(Model, job.model_sha256)
    classes = list(model.card["classes"])
    counts = Counter(dict(session.execute(
        select(Scan.status, func.count()).where(Scan.job_id == job_id).group_by(Scan.status)).all()))
    unlabelled = session.scalar(
        select(func.count()).where(Scan.job_id == job_id, Scan.status == "done", Scan.true_label.is_(None)))
    reasons = Counter(dict(session.execute(
        select(Scan.error, func.count()).where(Scan.job_id == job_id, Scan.status == "failed").group_by(Scan.error)
    ).all()))
    modalities = dict(session.execute(
        select(Scan.modality, func.count()).where(Scan.job_id == job_id, Scan.modality.is_not(None))
        .group_by(Scan.modality).order_by(Scan.modality)).all())
    served_in = dict(session.execute(
        select(func.coalesce(Result.served_in, "unrecorded"), func.count()).select_from(Scan)
        .join(Result, Scan.result_id == Result.id)
        .where(Scan.job_id == job_id, Scan.status == "done").group_by(Result.served_in).order_by(Result.served_in)
    ).all())
    rows = labelled_rows(session, job_id)
    seen = seen_hashes(model.card)
    unseen_rows = [r for r in rows if r.sha256 not in seen]
    metrics = _metrics(rows, classes)
    return {
        "job": job.id,
        "status": job.status,
        "folder": job.folder,
        "model_sha256": job.model_sha256,
        "model": model.name,
        "scans": job.total,
        "labelled": len(rows),
        "unlabelled": int(unlabelled or 0),
        "failed": int(counts.get("failed", 0)),
        "pending": int(counts.get("pending", 0)),
        **metrics,
        "seen_in_training": len(rows) - len(unseen_rows),
        "unseen": {"labelled": len(unseen_rows), **_metrics(unseen_rows, classes)},
        "failures": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0] or ""))),
        # DICOM: scans by modality, and objects without pixel data (SR, presentation states) not submitted.
        "modalities": modalities,
        "skipped": int(job.skipped or 0),
        # Done scans by the precision their result was served in; cache hits keep the precision that made them.
        "served_in": served_in,
    }


def store_report(session: Session, job_id: int) -> dict:
    """Compute the report and store it on the job, with one metrics row per class and scope."""
    report = job_report(session, job_id)
    job = session.get(Job, job_id)
    job.report = json.loads(json.dumps(report))
    job.accuracy = report["accuracy"]
    job.macro_f1 = report["macro_avg"]["f1"]
    session.execute(delete(ClassMetric).where(ClassMetric.job_id == job_id))
    for scope, block in (("all", report), ("unseen", report["unseen"])):
        for cls, m in block["per_class"].items():
            session.add(ClassMetric(job_id=job_id, scope=scope, cls=cls, precision=m["precision"],
                                    recall=m["recall"], f1=m["f1"], support=m["support"], auc=m["auc"]))
    return report


def _fmt(value) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def served_in_text(report: dict) -> str:
    """`float32 16, int8 1`: a report's done scans by the precision they were served in ('' when none)."""
    return ", ".join(f"{p} {n}" for p, n in report.get("served_in", {}).items())


def format_table(report: dict) -> str:
    """The report as aligned text: summary, per-class table, averages, confusion matrix."""
    lines = [
        f"job {report['job']} ({report['status']}): {report['scans']} scans, {report['labelled']} labelled, "
        f"{report['unlabelled']} unlabelled (not in metrics), {report['failed']} failed, {report['pending']} pending",
        f"model {report['model']} {report['model_sha256'][:12]}",
    ]
    if report.get("modalities") or report.get("skipped"):
        by_modality = ", ".join(f"{m} {n}" for m, n in report.get("modalities", {}).items()) or "none"
        lines.append(f"DICOM scans by modality: {by_modality}; {report.get('skipped', 0)} object(s) without "
                     "pixel data skipped at submit")
    if len(report.get("served_in", {})) > 1:
        # Probabilities differ by up to 0.01 (bfloat16) or 0.02 (int8) from float32's: say so where a job mixes them.
        lines.append(f"results served in more than one precision: {served_in_text(report)}")
    if not report["labelled"]:
        lines.append("no labelled scans: metrics need labels (class folders or --labels FILE.csv)")
    else:
        lines.append(f"accuracy {report['accuracy']:.4f}")
        lines.append("")
        lines.append(f"{'class':<12}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}{'auc':>8}")
        for cls, m in report["per_class"].items():
            lines.append(f"{cls:<12}{_fmt(m['precision']):>10}{_fmt(m['recall']):>8}{_fmt(m['f1']):>8}"
                         f"{m['support']:>9}{_fmt(m['auc']):>8}")
        for name in ("macro_avg", "weighted_avg"):
            m = report[name]
            lines.append(f"{name:<12}{_fmt(m['precision']):>10}{_fmt(m['recall']):>8}{_fmt(m['f1']):>8}")
        cm = report["confusion_matrix"]
        lines.append("")
        lines.append("confusion matrix (rows = true, columns = predicted)")
        lines.append(" " * 12 + "".join(f"{c[:10]:>11}" for c in cm["labels"]))
        for cls, row in zip(cm["labels"], cm["matrix"]):
            lines.append(f"{cls:<12}" + "".join(f"{v:>11}" for v in row))
        if report["seen_in_training"]:
            u = report["unseen"]
            acc = "n/a" if u["accuracy"] is None else f"{u['accuracy']:.4f}"
            lines.append("")
            lines.append(f"{report['seen_in_training']} labelled scans were in the model's training or validation "
                         f"set; on the {u['labelled']} unseen ones: accuracy {acc}, macro-F1 {_fmt(u['macro_avg']['f1'])}")
    if report["failures"]:
        lines.append("")
        lines.append("failed scans by reason:")
        for reason, n in report["failures"].items():
            lines.append(f"  {n:>6}  {reason}")
    return "\n".join(lines)

"""`export`: results.csv plus a grayscale heatmap and an overlay PNG per scan, never outside the out folder."""
from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Job, Model, Result, Scan
from jobs import sources
from jobs.heatmaps import gray_png, overlay, scan_heatmap
from jobs.progress import JobNotFound
from vision.dicom import META_COLUMNS
from vision.decode import decode
from vision.errors import ScanError


class ExportError(Exception):
    """An export that would write outside its folder, or cannot write at all."""


def inside(out: Path, relpath: str, sub: str) -> Path:
    """out/sub/relpath.png, refusing any path that escapes out/sub (absolute paths, `..`)."""
    base = (out / sub).resolve()
    try:
        target = (base / f"{relpath}.png").resolve()
    except (ValueError, OSError) as exc:  # a NUL byte (SQLite stores one), a symlink loop
        raise ExportError(f"refusing to write scan path {relpath!r}: {exc}") from None
    if base != target and base not in target.parents:
        raise ExportError(f"refusing to write outside {base}: scan path {relpath!r}")
    return target


def export_job(session: Session, job_id: int, out: Path, progress=None) -> dict:
    """Write results.csv, heatmaps/ and overlays/ for a job; returns counts written."""
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} not found")
    classes = session.get(Model, job.model_sha256).card["classes"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = session.execute(
        select(Scan, Result).outerjoin(Result, Scan.result_id == Result.id)
        .where(Scan.job_id == job_id).order_by(Scan.path)
    ).all()
    images = skipped = 0
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "sha256", "true_label", "predicted_label", *[f"p_{c}" for c in classes],
                         "status", "error", "model_sha256", "served_in", *META_COLUMNS])
        for scan, result in rows:
            probs = result.probabilities if result else [""] * len(classes)
            writer.writerow([scan.path, scan.sha256, scan.true_label or "",
                             result.predicted_label if result else "", *probs, scan.status, scan.error or "",
                             result.model_sha256 if result else "", (result.served_in or "") if result else "",
                             *(getattr(scan, name) or "" for name in META_COLUMNS)])
            if result is not None:
                try:
                    written = write_images(out, scan, result, Path(job.folder))
                except ScanError:
                    written = False  # the scan vanished since it was classified; the CSV still has it
                images += written
                skipped += not written
            if progress:
                progress(1)
    return {"rows": len(rows), "images": images, "skipped_images": skipped}


def write_images(out: Path, scan: Scan, result: Result, folder: Path) -> bool:
    """Heatmap and overlay PNGs of one scan (file, archive member or DICOM frame) on its own pixel grid."""
    heat_path = inside(out, scan.path, "heatmaps")
    over_path = inside(out, scan.path, "overlays")
    data, frame = sources.load(folder, scan.path)  # ScanError when it is gone
    gray = decode(data, frame=frame)
    cam = scan_heatmap(result.heatmap, result.heatmap_height, result.heatmap_width, result.geometry)
    if cam.shape != gray.shape:
        return False
    for path, image in ((heat_path, Image.fromarray(gray_png(cam), mode="L")),
                        (over_path, Image.fromarray(overlay(gray, cam), mode="RGB"))):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        except OSError as exc:
            raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from None
    return True

"""End to end through real Celery workers on Redis with PostgreSQL, with the shipped model."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score
from sqlalchemy import func, select

from db.models import Result, Scan
from db.session import session_scope
from jobs.lifecycle import enqueue_job, new_job, wait
from jobs.progress import resume
from jobs.report import job_report
from tests import services
from tests.conftest import variant_folder
from vision.modelio import write_card

pytestmark = pytest.mark.slow
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def scans_of(url, job_id):
    with session_scope(url) as s:
        return s.execute(select(Scan.path, Scan.status, Scan.error, Scan.true_label, Scan.result_id, Scan.sha256)
                         .where(Scan.job_id == job_id).order_by(Scan.path)).all()


def test_celery_job_gives_one_result_per_scan_and_sklearn_metrics(scan_folder, shipped_model, pg_url, redis_url,
                                                                  env_for, start_worker):
    settings, env = env_for(shipped_model, pg_url, redis_url)
    start_worker(env)
    job_id = new_job(settings, scan_folder)
    enqueue_job(settings, job_id)
    p = wait(settings, job_id, timeout=300)

    assert (p.total, p.done, p.failed, p.pending) == (18, 17, 1, 0)
    rows = {r.path: r for r in scans_of(settings.database_url, job_id)}
    assert rows["glioma/truncated.jpg"].status == "failed"
    assert rows["glioma/truncated.jpg"].error.startswith("corrupt JPEG")
    assert rows["unsorted/scan 1.jpg"].true_label is None and rows["unsorted/scan 1.jpg"].status == "done"
    with session_scope(settings.database_url) as s:
        labelled = s.execute(select(Scan.true_label, Result.predicted_label, Result.probabilities)
                             .join(Result, Scan.result_id == Result.id)
                             .where(Scan.job_id == job_id, Scan.true_label.is_not(None))).all()
        report = job_report(s, job_id)
    y_true = [r[0] for r in labelled]
    y_pred = [r[1] for r in labelled]
    probs = np.array([r[2] for r in labelled])
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=CLASSES,
                                                                     zero_division=np.nan)
    assert report["labelled"] == 16 and report["unlabelled"] == 1 and report["failed"] == 1
    assert report["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    for i, c in enumerate(CLASSES):
        got = report["per_class"][c]
        assert got["support"] == support[i]
        assert got["recall"] == pytest.approx(recall[i])
        assert got["auc"] == pytest.approx(roc_auc_score([t == c for t in y_true], probs[:, i]))
    assert report["confusion_matrix"]["matrix"] == confusion_matrix(y_true, y_pred, labels=CLASSES).tolist()


def test_sigkilled_worker_mid_batch_is_redelivered_with_one_result_per_scan(tmp_path, shipped_model, pg_url,
                                                                            redis_url, env_for, start_worker):
    folder = variant_folder(tmp_path / "variants")  # 128 distinct real scans
    settings, env = env_for(shipped_model, pg_url, redis_url, BRAINSCAN_LEASE_SECONDS=5,
                            BRAINSCAN_VISIBILITY_TIMEOUT=10, BRAINSCAN_BATCH_SIZE=32)
    first = start_worker(env)
    job_id = new_job(settings, folder)
    enqueue_job(settings, job_id)
    caught_mid_batch = False
    deadline = time.time() + 120
    while time.time() < deadline and not caught_mid_batch:
        with session_scope(settings.database_url) as s:
            caught_mid_batch = bool(s.scalar(select(func.count()).where(
                Scan.job_id == job_id, Scan.status == "pending", Scan.attempts > 0)))
        if caught_mid_batch:
            first.kill()
        time.sleep(0.005)
    assert caught_mid_batch, "never saw a batch in flight"
    start_worker(env)
    p = wait(settings, job_id, timeout=300, stall_seconds=600)  # no reconciliation: redelivery alone

    assert (p.done, p.failed, p.pending) == (128, 0, 0)
    with session_scope(settings.database_url) as s:
        per_content = s.execute(select(Result.sha256, func.count()).where(
            Result.sha256.in_(select(Scan.sha256).where(Scan.job_id == job_id))).group_by(Result.sha256)).all()
        unlinked = s.scalar(select(func.count()).where(Scan.job_id == job_id, Scan.result_id.is_(None)))
    assert len(per_content) == 128 and {n for _, n in per_content} == {1}
    assert unlinked == 0


def test_purged_queue_is_completed_by_resume(pg_url, redis_url, tmp_path, shipped_model, env_for, start_worker):
    folder = variant_folder(tmp_path / "variants", per_scan=4)  # 64 distinct scans
    settings, env = env_for(shipped_model, pg_url, redis_url, BRAINSCAN_BATCH_SIZE=8)
    job_id = new_job(settings, folder)
    enqueue_job(settings, job_id)
    # The broker loses every message (as a restart without persistence would) before any worker runs.
    r = redis.Redis.from_url(redis_url)
    assert r.llen(settings.queue) == 8
    r.delete(settings.queue)
    start_worker(env)
    time.sleep(2)
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).where(Scan.job_id == job_id, Scan.status == "pending")) == 64
        sent = resume(settings, s, job_id)
    p = wait(settings, job_id, timeout=300, stall_seconds=600)

    assert sent == 64
    assert (p.done, p.failed, p.pending) == (64, 0, 0)


def test_resubmitting_a_folder_computes_nothing_new(scan_folder, shipped_model, pg_url, redis_url, env_for,
                                                    start_worker):
    settings, env = env_for(shipped_model, pg_url, redis_url)
    start_worker(env)
    first = new_job(settings, scan_folder)
    enqueue_job(settings, first)
    wait(settings, first, timeout=300)
    with session_scope(settings.database_url) as s:
        results_before = s.scalar(select(func.count()).select_from(Result))
    second = new_job(settings, scan_folder)
    enqueue_job(settings, second)
    p = wait(settings, second, timeout=300)
    with session_scope(settings.database_url) as s:
        results_after = s.scalar(select(func.count()).select_from(Result))
        from_cache = s.scalar(select(func.count()).where(Scan.job_id == second, Scan.from_cache.is_(True)))

    assert (p.done, p.failed) == (17, 1)
    assert results_after == results_before
    assert from_cache == 17


def test_a_worker_whose_processes_cannot_load_the_model_stops_with_the_reason(scan_folder, shipped_model, pg_url,
                                                                             redis_url, env_for, tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a model")
    write_card(bad, json.loads(shipped_model.with_suffix(".json").read_text()))  # a card that matches the bytes
    settings, env = env_for(bad, pg_url, redis_url)
    job_id = new_job(settings, scan_folder)
    enqueue_job(settings, job_id)
    worker = services.Worker(env, tmp_path / "worker.log")
    try:
        exit_code = worker.proc.wait(timeout=180)
    finally:
        worker.stop()

    assert exit_code == 1
    assert f"{bad}: cannot be loaded in safe mode: " in worker.log.read_text()
    with session_scope(settings.database_url) as s:  # nothing was attempted, so nothing is lost: resume can rerun it
        assert s.execute(select(Scan.status, func.count(), func.sum(Scan.attempts)).where(Scan.job_id == job_id)
                         .group_by(Scan.status)).all() == [("pending", 18, 0)]

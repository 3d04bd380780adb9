"""Recording a batch's outcome: each kind of scan in one statement, and never over a scan already finished."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from db.models import Scan
from db.session import session_scope
from jobs.lifecycle import new_job
from jobs.processing import finish
from tests.conftest import EXAMPLES


@pytest.fixture(params=["sqlite", "postgresql"])
def job_scans(request, shipped_model, env_for):
    """A recorded job of the 16 example scans, on each database; returns (url, scan ids)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    settings, _ = env_for(shipped_model, database_url=url)
    job = new_job(settings, EXAMPLES)
    with session_scope(settings.database_url) as s:
        return settings.database_url, list(s.scalars(select(Scan.id).where(Scan.job_id == job).order_by(Scan.id)))


def states(url, ids):
    with session_scope(url) as s:
        return [tuple(row) for row in s.execute(select(Scan.status, Scan.error, Scan.result_id, Scan.from_cache)
                                                 .where(Scan.id.in_(ids)).order_by(Scan.id))]


def test_failed_scans_get_their_reason_and_done_scans_their_result_and_cache_flag(job_scans):
    url, ids = job_scans
    with session_scope(url) as s:
        finish(s, [{"scan_id": ids[0], "reason": "corrupt JPEG"}],
               [{"scan_id": ids[1], "result": None, "cache_hit": False},
                {"scan_id": ids[2], "result": None, "cache_hit": True}])

    assert states(url, ids[:4]) == [("failed", "corrupt JPEG", None, False), ("done", None, None, False),
                                    ("done", None, None, True), ("pending", None, None, False)]


def test_a_scan_that_is_no_longer_pending_is_left_as_it_is(job_scans):
    url, ids = job_scans
    with session_scope(url) as s:
        finish(s, [{"scan_id": ids[0], "reason": "corrupt JPEG"}],
               [{"scan_id": ids[1], "result": None, "cache_hit": True}])
    with session_scope(url) as s:  # a redelivered batch that got further this time
        finish(s, [{"scan_id": ids[1], "reason": "file changed after submit"}],
               [{"scan_id": ids[0], "result": None, "cache_hit": False}])

    assert states(url, ids[:2]) == [("failed", "corrupt JPEG", None, False), ("done", None, None, True)]

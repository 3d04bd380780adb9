"""The suite fails, never skips, when Redis or PostgreSQL is unreachable."""
import subprocess
import sys

import pytest

from tests.services import ROOT, ServiceUnavailable, require_postgres, require_redis


def test_an_unreachable_postgres_raises():
    with pytest.raises(ServiceUnavailable, match="PostgreSQL unreachable at postgresql://postgres@127.0.0.1:1/test"):
        require_postgres("postgresql://postgres@127.0.0.1:1/test")


def test_an_unreachable_redis_raises():
    with pytest.raises(ServiceUnavailable, match="Redis unreachable at redis://127.0.0.1:1"):
        require_redis("redis://127.0.0.1:1")


@pytest.mark.slow
def test_a_suite_run_against_a_closed_postgres_port_fails_rather_than_skips():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         "tests/test_pipeline_celery.py::test_purged_queue_is_completed_by_resume"],  # asks for pg_url first
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "TEST_POSTGRES_URL": "postgresql://postgres@127.0.0.1:1/test"},
    )
    assert result.returncode == 1
    assert "1 error" in result.stdout and "skipped" not in result.stdout
    assert "PostgreSQL unreachable at postgresql://postgres@127.0.0.1:1/test" in result.stdout


def test_no_process_that_forks_imports_tensorflow():
    code = ("import sys; import cli, worker.tasks, worker.beat, jobs.local, jobs.lifecycle, jobs.export; "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert out.stdout.strip() == "False False", out.stderr

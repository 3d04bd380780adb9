"""Real services for the tests: a fresh PostgreSQL database, a Redis database, Celery worker processes.

Unreachable services raise, so CI fails instead of skipping.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")


class ServiceUnavailable(Exception):
    pass


def require_postgres(admin_url: str = PG_ADMIN_URL) -> None:
    """Raise ServiceUnavailable unless PostgreSQL answers at admin_url."""
    try:
        engine = create_engine(admin_url, connect_args={"connect_timeout": 5})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:
        raise ServiceUnavailable(f"PostgreSQL unreachable at {admin_url}: {type(exc).__name__}") from None


def require_redis(url: str = REDIS_URL) -> None:
    """Raise ServiceUnavailable unless Redis answers PING at url."""
    try:
        redis.Redis.from_url(url, socket_connect_timeout=5).ping()
    except Exception as exc:
        raise ServiceUnavailable(f"Redis unreachable at {url}: {type(exc).__name__}") from None


def fresh_database(admin_url: str = PG_ADMIN_URL) -> str:
    """Create an empty database on the PostgreSQL server and return its URL."""
    require_postgres(admin_url)
    name = f"brainscan_t{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(url: str, admin_url: str = PG_ADMIN_URL) -> None:
    from db.session import dispose_engines, get_engine

    try:
        get_engine(url).dispose()
    finally:
        dispose_engines()
    name = url.rsplit("/", 1)[1]
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


class Worker:
    """A `python cli.py worker` subprocess in its own process group."""

    def __init__(self, env: dict, log: Path):
        self.log = log
        self.fh = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "cli.py", "worker", "--loglevel=INFO"], cwd=ROOT,
                                     env=env, stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> "Worker":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if b"ready." in self.log.read_bytes():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole worker: main process and pool children, nothing gets to clean up."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.fh.close()

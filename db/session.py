"""Engine and sessions for the configured database, and schema upgrades with Alembic."""
from __future__ import annotations

import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from config import SettingsError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class DatabaseUnavailable(Exception):
    """The database could not be reached after retrying; the message never carries the password."""


def parse_url(url: str):
    """The parsed DATABASE_URL; SettingsError, never echoing a password, when it is not a database URL."""
    try:
        return make_url(url)
    except ValueError as exc:  # sqlalchemy's ArgumentError is not one: it covers what the regex rejects
        reason = "its port is not a number" if "int()" in str(exc) else str(exc)
    except ArgumentError:
        reason = "it does not parse"
    raise SettingsError(f"DATABASE_URL is not a database URL: {reason} "
                        "(expected e.g. postgresql://user:password@host:5432/brainscan)")


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    return parse_url(url).render_as_string(hide_password=True)


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine per URL and process (engines are not shared across fork: see dispose_engines)."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _):
            # WAL lets the reporting process read while local workers write.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    try:
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5,
                             connect_args={"connect_timeout": 10})
    except NoSuchModuleError:
        raise SettingsError(f"DATABASE_URL names database driver {parsed.drivername!r}, which is not installed "
                            "(brainscan runs on postgresql:// and sqlite:///)") from None


def dispose_engines() -> None:
    """Forget engines inherited from a parent process, so a child opens its own connections."""
    get_engine.cache_clear()


def sessions(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str):
    """A session that commits on success and rolls back on error."""
    session = sessions(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def with_retry(fn, *, attempts: int = 6, first_delay: float = 1.0, url: str = ""):
    """Call fn, retrying OperationalError (database down or restarting) with exponential backoff."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OperationalError as exc:
            if attempt == attempts:
                raise DatabaseUnavailable(
                    f"database {safe_url(url) if url else ''} unreachable after {attempts} attempts: "
                    f"{type(exc.orig).__name__}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 30)


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    """Create or upgrade the schema to the newest Alembic revision."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = alembic_config(url)
    head = ScriptDirectory.from_config(cfg).get_current_head()

    def current():
        with get_engine(url).connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    if with_retry(current, url=url, attempts=3) == head:
        return
    command.upgrade(cfg, "head")


def has_schema(url: str) -> bool:
    return inspect(get_engine(url)).has_table("jobs")

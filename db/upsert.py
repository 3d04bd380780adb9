"""INSERT … ON CONFLICT DO NOTHING for both PostgreSQL and SQLite."""
from __future__ import annotations

from sqlalchemy.orm import Session


def insert_ignore(session: Session, table, rows: list[dict], conflict: list[str]) -> None:
    """Insert rows, silently keeping existing ones that collide on the `conflict` columns."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"upsert on {dialect}")
    session.execute(insert(table).on_conflict_do_nothing(index_elements=conflict), rows)

"""The index's database connection: SQLite (embedded) or PostgreSQL (at scale).

SQLite runs in WAL mode with a busy timeout so the embedded server's threads
and a reading API share one file; PostgreSQL URLs get the psycopg 3 driver this
package installs. The schema is Alembic's (``migrations/``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

MIGRATIONS_INI = Path(__file__).with_name("alembic.ini")


def engine_url(database_url: str) -> str:
    """``database_url`` with the driver this package installs (psycopg 3 for PostgreSQL)."""
    url = make_url(database_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def json_dumps(value: Any) -> str:
    """Compact JSON: smaller rows, and a fixed text form the export can parse quickly."""
    return json.dumps(value, separators=(",", ":"))


def create_engine(database_url: str) -> Engine:
    url = make_url(engine_url(database_url))
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True, json_serializer=json_dumps)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30}, json_serializer=json_dumps)
    sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run while a worker writes; the busy timeout makes writers queue
    # instead of failing at once; NORMAL sync is crash-safe in WAL mode.
    cursor.execute("PRAGMA busy_timeout=30000")
    enable_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # PostgreSQL's LIKE is case sensitive; make SQLite's agree.
    cursor.execute("PRAGMA case_sensitive_like=ON")
    cursor.close()


def enable_wal(cursor: Any, attempts: int = 100) -> None:
    """Switch the file to WAL (the first connection to a new file does). Connections racing
    to switch a new file get "database is locked" at once, without the busy timeout
    (SQLite does not wait where waiting could deadlock), so they try again."""
    for attempt in range(attempts):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


def alembic_config() -> Any:
    from alembic.config import Config

    return Config(str(MIGRATIONS_INI))

"""SQLAlchemy engines for the warehouse and the state store (no Airflow needed here)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, create_engine, event

from leadsync.config import leadsync_home

# Airflow connection types → SQLAlchemy driver names.
_DRIVERS = {
    "postgres": "postgresql+psycopg2",
    "postgresql": "postgresql+psycopg2",
    "sqlite": "sqlite",
    "mysql": "mysql+pymysql",
}


class ConnectionConfigError(ValueError):
    """A database connection cannot be turned into a SQLAlchemy URL (names the field)."""


def default_url(name: str) -> str:
    """The embedded SQLite database ``$LEADSYNC_HOME/<name>.db``."""
    return f"sqlite:///{leadsync_home() / f'{name}.db'}"


def url_from_fields(
    conn_id: str,
    conn_type: str | None,
    host: str | None,
    login: str | None,
    password: str | None,
    schema: str | None,
    port: int | None,
    extra: Mapping[str, Any],
) -> str:
    """A SQLAlchemy URL from an Airflow connection's fields.

    ``extra.sqlalchemy_url`` wins; otherwise the URL is built from the typed fields.
    """
    from sqlalchemy.engine import URL

    explicit = extra.get("sqlalchemy_url")
    if explicit:
        if not isinstance(explicit, str):
            raise ConnectionConfigError(f"connection {conn_id!r}: extra 'sqlalchemy_url' "
                                        "must be a string")
        return explicit
    kind = (conn_type or "").lower()
    driver = _DRIVERS.get(kind)
    if driver is None:
        raise ConnectionConfigError(
            f"connection {conn_id!r}: conn_type {conn_type!r} is not a database; use "
            f"{', '.join(sorted(_DRIVERS))} or set extra 'sqlalchemy_url'"
        )
    if driver == "sqlite":
        path = host or schema
        if not path:
            raise ConnectionConfigError(f"connection {conn_id!r}: field 'host' (the SQLite "
                                        "file path) is empty")
        return f"sqlite:///{path}"
    if not host:
        raise ConnectionConfigError(f"connection {conn_id!r}: field 'host' is empty")
    return URL.create(driver, username=login or None, password=password or None, host=host,
                      port=port or None, database=schema or None).render_as_string(
                          hide_password=False)


_SQLITE_BUSY_TIMEOUT = 60.0


def _enable_wal(cur: Any) -> None:
    # Switching a database that is not in WAL mode yet takes an exclusive lock and, unlike
    # other statements, fails at once with "database is locked" instead of waiting for the
    # busy timeout: workers that open a new database at the same time would fail.
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def make_engine(url: str) -> Engine:
    """An engine tuned for our access pattern (SQLite: WAL + busy timeout; Postgres: UTC)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            try:
                _enable_wal(cur)
                cur.execute("PRAGMA synchronous=NORMAL")
            finally:
                cur.close()

        return engine
    engine = create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)
    if engine.dialect.name == "postgresql":

        @event.listens_for(engine, "connect", insert=True)
        def _utc_session(dbapi_conn: Any, _record: Any) -> None:
            # The contract reads a timestamp without time zone as UTC. Postgres compares such
            # a column with our (aware, UTC) cursor bounds in the session's time zone, so a
            # server set to anything else shifts the window and breaks keyset paging.
            autocommit = dbapi_conn.autocommit
            dbapi_conn.autocommit = True
            cur = dbapi_conn.cursor()
            cur.execute("SET TIME ZONE 'UTC'")
            cur.close()
            dbapi_conn.autocommit = autocommit

    return engine

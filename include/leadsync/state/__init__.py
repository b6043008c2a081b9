"""The state store: watermarks, ledger, outbox batches, quarantine, runs and leases.

A SQLAlchemy database of its own (embedded SQLite by default, Postgres in production). The
schema is created and migrated by :meth:`StateStore.migrate`; a change is a new entry in
``MIGRATIONS`` (:mod:`leadsync.state.schema`), never an edit of an old one.

Nothing here holds raw personal data: the ledger and quarantine are keyed by the CRM's
lead_id and stage, and the outbox holds payloads whose identifiers are already hashed.

The store is one class composed of parts with one job each, all over one engine:
:mod:`~leadsync.state.schema` (tables, migrations), :mod:`~leadsync.state.leases`,
:mod:`~leadsync.state.runs` (runs, watermarks), :mod:`~leadsync.state.ledger` (ledger, outbox),
:mod:`~leadsync.state.outcomes` (push lanes' batch claims, request outcomes),
:mod:`~leadsync.state.quarantine`, :mod:`~leadsync.state.requests` and
:mod:`~leadsync.state.monitoring` (match-key coverage, alert states).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import Connection

from leadsync.state.leases import LeasePart
from leadsync.state.ledger import LedgerPart
from leadsync.state.model import (
    BATCH_DONE,
    BATCH_HELD,
    BATCH_PENDING,
    DELIVERED,
    EXPIRED,
    FAILED,
    FAILED_REASONS,
    PENDING,
    REEVALUATE,
    SKIPPED,
    TERMINAL,
    Batch,
    Cursor,
    EventOutcome,
    LeaseBusyError,
    LedgerEntry,
    LedgerRecord,
    QuarantineRecord,
    StagedBatch,
    json_lead_id,
    utcnow,
)
from leadsync.state.monitoring import MonitorPart
from leadsync.state.outcomes import OutcomePart
from leadsync.state.quarantine import QuarantinePart
from leadsync.state.requests import RequestPart
from leadsync.state.runs import RunPart
from leadsync.state.schema import (
    MIGRATIONS,
    REQUEST_SENT,
    SCHEMA_VERSION,
    SchemaPart,
    UTCDateTime,
    alert_states,
    leases,
    ledger,
    metadata,
    outbox,
    outbox_payloads,
    platform_requests,
    quarantine,
    run_coverage,
    runs,
    schema_version,
    watermarks,
)

__all__ = [
    "BATCH_DONE", "BATCH_HELD", "BATCH_PENDING", "DELIVERED", "EXPIRED", "FAILED",
    "FAILED_REASONS", "MIGRATIONS", "PENDING", "REEVALUATE", "REQUEST_SENT", "SCHEMA_VERSION",
    "SKIPPED", "TERMINAL", "Batch",
    "Cursor", "EventOutcome", "LeaseBusyError", "LedgerEntry", "LedgerRecord", "QuarantineRecord",
    "StagedBatch", "StateStore", "UTCDateTime", "alert_states", "json_lead_id", "leases",
    "ledger", "metadata", "outbox", "outbox_payloads", "platform_requests", "quarantine",
    "run_coverage", "runs", "schema_version", "utcnow", "watermarks",
]


class StateStore(SchemaPart, LeasePart, RunPart, LedgerPart, OutcomePart, QuarantinePart,
                 RequestPart, MonitorPart):
    """All reads and writes of leadsync's own state."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._migrated = False

    @contextmanager
    def pinned(self) -> Iterator[StateStore]:
        """This store over one connection, checked out once, for a loop of short
        transactions in one thread (a push lane's claims and outcomes).

        Each transaction through the pool checks a connection out and, on Postgres, pings it
        first (a round trip): two per batch, 4.1 s of a 1,000-batch lane's 41.8 s. Here the
        connection is pinged once; a transaction that fails on a lost connection invalidates
        it, and the next one reconnects. Not for other threads: the returned store's
        transactions run one at a time on its connection.
        """
        with self.engine.connect() as conn:
            store = StateStore.__new__(StateStore)
            store.engine = _OneConnection(conn)  # type: ignore[assignment]
            store._migrated = True
            yield store


class _OneConnection:
    """What the store's parts use of an :class:`Engine` (``begin``, ``connect``,
    ``dialect``, ``url``), over one connection held by the caller."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.dialect = conn.dialect
        self.url = conn.engine.url

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        with self._conn.begin():
            yield self._conn

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        try:
            yield self._conn
        finally:
            if self._conn.in_transaction():  # a read's implicit transaction ends with it
                self._conn.rollback()

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"{name}: a pinned state store offers begin() and connect() only")

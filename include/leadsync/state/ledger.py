"""The ledger (one row per destination + event) and the outbox (one batch one request; its
hashed payload in a table of its own, purged once delivered)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import Text, any_, bindparam, delete, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Row
from sqlalchemy.sql.elements import ColumnElement

from leadsync.state.model import (
    BATCH_HELD,
    BATCH_PENDING,
    DELIVERED,
    FAILED,
    PENDING,
    Batch,
    Cursor,
    LedgerEntry,
    LedgerRecord,
    StagedBatch,
    StorePart,
    _cursor_from_json,
    _cursor_json,
    utcnow,
)
from leadsync.state.runs import _update_run
from leadsync.state.schema import driver_time, ledger, naive_utc, outbox, outbox_payloads


class _StoredEnvelope(msgspec.Struct):
    """An outbox envelope decoded with its body left as the JSON it was stored as."""

    event_id: str
    event_time: int
    body: msgspec.Raw


_EVENTS_ENCODER = msgspec.json.Encoder()
_RAW_ENVELOPES = msgspec.json.Decoder(list[_StoredEnvelope])


def _encode_events(events: Sequence[Mapping[str, Any]]) -> str:
    """An outbox payload: the envelopes as JSON (bodies given as ``msgspec.Raw`` are stored
    as they are: an event is serialised once, when it is staged)."""
    return _EVENTS_ENCODER.encode(events).decode()


def _decode_events(payload: str, raw_bodies: bool) -> list[dict[str, Any]]:
    if not raw_bodies:
        decoded: list[dict[str, Any]] = msgspec.json.decode(payload)
        return decoded
    return [{"event_id": e.event_id, "event_time": e.event_time, "body": e.body}
            for e in _RAW_ENVELOPES.decode(payload)]



class LedgerPart(StorePart):
    """Event outcomes and the outbox batches that carry pending events."""

    def ledger_lookup(self, destination: str, event_ids: Sequence[str]) -> dict[str, LedgerEntry]:
        """Status of the given events (absent = never seen)."""
        found: dict[str, LedgerEntry] = {}
        ids = list(dict.fromkeys(event_ids))
        with self.engine.connect() as conn:
            for row in _select_events(conn, destination, ids, ledger.c.event_id,
                                      ledger.c.status, ledger.c.source_ts):
                found[row.event_id] = LedgerEntry(row.status, row.source_ts)
        return found

    def _upsert_ledger(
        self, conn: Connection, destination: str, records: Sequence[LedgerRecord], run_id: str,
        existing: set[str] | None = None, batch_id: str | None = None,
    ) -> None:
        """Inserts new events and updates known ones, each as one set operation.

        ``existing``: the ids among ``records`` the ledger already holds, when the caller
        looked them up in this run and nothing else writes them meanwhile (the lease):
        saves looking them up again. ``batch_id``: the outbox batch every record belongs to
        (else each record's own).
        """
        if not records:
            return
        now = utcnow()
        ids = [r.event_id for r in records]
        if existing is not None:
            ids = []
        else:
            existing = set()
        existing.update(row.event_id
                        for row in _select_events(conn, destination, ids, ledger.c.event_id))
        fresh = [r for r in records if r.event_id not in existing]
        again = [r for r in records if r.event_id in existing]
        if fresh:
            _insert_ledger(conn, destination, run_id, fresh, now, batch_id)
        if again:
            # One statement, many parameter sets (executemany): a set operation, not a
            # round trip per event.
            conn.execute(
                update(ledger)
                .where(ledger.c.destination == bindparam("b_destination"),
                       ledger.c.event_id == bindparam("b_event_id"))
                .values(
                    status=bindparam("b_status"),
                    reason=bindparam("b_reason"),
                    detail=bindparam("b_detail"),
                    batch_id=bindparam("b_batch_id"),
                    event_name=bindparam("b_event_name"),
                    source_ts=bindparam("b_source_ts", type_=ledger.c.source_ts.type),
                    event_time=bindparam("b_event_time", type_=ledger.c.event_time.type),
                    run_id=bindparam("b_run_id"),
                    updated_at=bindparam("b_updated_at", type_=ledger.c.updated_at.type),
                ),
                [
                    {"b_destination": destination, "b_event_id": r.event_id,
                     "b_status": r.status, "b_reason": r.reason, "b_detail": r.detail,
                     "b_batch_id": batch_id or r.batch_id, "b_event_name": r.event_name,
                     "b_source_ts": r.source_ts, "b_event_time": r.event_time,
                     "b_run_id": run_id, "b_updated_at": now}
                    for r in again
                ],
            )

    def record_terminal(
        self, destination: str, run_id: str, records: Sequence[LedgerRecord]
    ) -> None:
        """Writes events that end without a send (expired, skipped)."""
        with self.engine.begin() as conn:
            self._upsert_ledger(conn, destination, records, run_id)

    # -- outbox -------------------------------------------------------------------------

    def stage_batch(
        self,
        destination: str,
        run_id: str,
        batch_id: str,
        seq: int,
        events: list[dict[str, Any]],
        records: Sequence[LedgerRecord],
        prev_cursor: Cursor | None,
        *,
        status: str = BATCH_PENDING,
        existing: set[str] | None = None,
    ) -> None:
        """Writes one outbox batch and its pending ledger rows (``records``, whose
        ``batch_id`` is taken to be this batch's) in one transaction.

        ``status`` :data:`BATCH_HELD` stages a batch that push does not see until
        :meth:`release_held` (a run whose data contract is still being checked).
        ``existing``: see :meth:`_upsert_ledger`.
        """
        self.stage_batches(destination, run_id,
                           [StagedBatch(batch_id, seq, events, records, prev_cursor)],
                           status=status, existing=existing)

    def stage_batches(
        self,
        destination: str,
        run_id: str,
        batches: Sequence[StagedBatch],
        *,
        status: str = BATCH_PENDING,
        existing: set[str] | None = None,
    ) -> None:
        """Writes outbox batches and their pending ledger rows in one transaction (see
        :meth:`stage_batch`; ``existing`` covers the events of all of them).

        Several batches per transaction: on SQLite a commit writes every page it dirtied,
        and the ledger's indexes (random keys) dirty pages all over; batches committed
        together share those writes (10 per commit: 35 % less CPU, 45 % less time).
        """
        now = utcnow()
        with self.engine.begin() as conn:
            for batch in batches:
                conn.execute(
                    insert(outbox).values(
                        batch_id=batch.batch_id,
                        destination=destination,
                        run_id=run_id,
                        seq=batch.seq,
                        status=status,
                        n_events=len(batch.events),
                        prev_cursor=_cursor_json(batch.prev_cursor),
                        attempts=0,
                        created_at=now,
                        updated_at=now,
                    )
                )
                conn.execute(insert(outbox_payloads).values(
                    batch_id=batch.batch_id, payload=_encode_events(batch.events)))
                self._upsert_ledger(conn, destination, batch.records, run_id, existing,
                                    batch.batch_id)

    def release_held(self, destination: str, run_id: str, *,
                     window_max: Cursor | None = None,
                     counts: Mapping[str, int] | None = None) -> int:
        """The run's contract passed: its held batches become pending, and the run running,
        in one transaction. Returns how many batches were released."""
        with self.engine.begin() as conn:
            released = conn.execute(
                update(outbox)
                .where(outbox.c.destination == destination, outbox.c.run_id == run_id,
                       outbox.c.status == BATCH_HELD)
                .values(status=BATCH_PENDING, updated_at=utcnow())
            ).rowcount
            _update_run(conn, run_id, destination, counts, window_max, status="running")
            return int(released or 0)

    def discard_held(self, destination: str, run_id: str | None = None, *,
                     status: str | None = None) -> int:
        """Forgets what runs whose contract never passed staged, in one transaction.

        Deletes the destination's held batches (of ``run_id``, and of any run that died
        before its verdict) and the ledger rows those runs wrote that were never sent (all
        but delivered and failed ones: the next run plans their rows again). With ``status``,
        the run ``run_id`` is marked so in the same transaction. Returns the batches deleted.
        """
        with self.engine.begin() as conn:
            owners = set(conn.execute(
                select(outbox.c.run_id).distinct()
                .where(outbox.c.destination == destination, outbox.c.status == BATCH_HELD)
            ).scalars())
            if run_id is not None:
                owners.add(run_id)
            owners.discard(None)
            deleted = 0
            if owners:
                conn.execute(
                    delete(ledger).where(
                        ledger.c.destination == destination,
                        ledger.c.run_id.in_(sorted(owners)),
                        ledger.c.status.not_in((DELIVERED, FAILED)),
                    )
                )
                held = select(outbox.c.batch_id).where(outbox.c.destination == destination,
                                                       outbox.c.status == BATCH_HELD)
                conn.execute(delete(outbox_payloads).where(outbox_payloads.c.batch_id.in_(held)))
                deleted = conn.execute(
                    delete(outbox).where(outbox.c.destination == destination,
                                         outbox.c.status == BATCH_HELD)
                ).rowcount
            if status is not None and run_id is not None:
                _update_run(conn, run_id, destination, None, status=status)
            return int(deleted or 0)

    def take_back_unsent(self, destination: str, run_id: str) -> int:
        """Takes back the batches ``run_id`` released that no lane has touched yet (pending,
        never claimed, never attempted) with their pending ledger rows, in one transaction:
        a check run again after it passed stages those rows again. Batches a lane has taken
        stay (their events are in flight). Returns how many batches were taken back."""
        with self.engine.begin() as conn:
            pick = select(outbox.c.batch_id).where(
                outbox.c.destination == destination, outbox.c.run_id == run_id,
                outbox.c.status == BATCH_PENDING, outbox.c.attempts == 0,
                outbox.c.claimed_by.is_(None), outbox.c.claim_run.is_(None))
            if self.engine.dialect.name == "postgresql":
                pick = pick.with_for_update(skip_locked=True)  # a lane claiming one keeps it
            ids = list(conn.execute(pick).scalars())
            for start in range(0, len(ids), 900):
                part = ids[start:start + 900]
                conn.execute(delete(ledger).where(ledger.c.destination == destination,
                                                  ledger.c.batch_id.in_(part),
                                                  ledger.c.status == PENDING))
                conn.execute(delete(outbox_payloads).where(outbox_payloads.c.batch_id.in_(part)))
                conn.execute(delete(outbox).where(outbox.c.batch_id.in_(part)))
            return len(ids)

    def pending_batch_ids(self, destination: str) -> list[str]:
        """Batches still to send, oldest first (earlier runs' leftovers before new work)."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(outbox.c.batch_id)
                    .where(outbox.c.destination == destination, outbox.c.status == BATCH_PENDING)
                    .order_by(outbox.c.created_at, outbox.c.seq)
                ).scalars()
            )

    def load_batch(self, batch_id: str, *, raw_bodies: bool = False) -> Batch | None:
        """One outbox batch with its payload.

        With ``raw_bodies`` each event's ``body`` is its JSON as stored (``msgspec.Raw``),
        for destinations whose requests embed events as they are (``RAW_EVENT_BODIES``):
        nothing is decoded and encoded again to send it.
        """
        with self.engine.connect() as conn:
            row = conn.execute(
                select(outbox, outbox_payloads.c.payload)
                .select_from(outbox.outerjoin(outbox_payloads,
                                              outbox_payloads.c.batch_id == outbox.c.batch_id))
                .where(outbox.c.batch_id == batch_id)
            ).first()
        if row is None:
            return None
        return Batch(
            batch_id=row.batch_id,
            destination=row.destination,
            run_id=row.run_id,
            status=row.status,
            events=_decode_events(row.payload, raw_bodies) if row.payload else [],
            attempts=row.attempts,
            prev_cursor=_cursor_from_json(row.prev_cursor),
        )

    def note_attempt(self, batch_id: str, error: str | None) -> None:
        """Counts a send attempt that left the batch pending."""
        with self.engine.begin() as conn:
            conn.execute(
                update(outbox)
                .where(outbox.c.batch_id == batch_id)
                .values(attempts=outbox.c.attempts + 1, last_error=error, updated_at=utcnow())
            )

    def ledger_rows(self, destination: str) -> list[dict[str, Any]]:
        """Every ledger row of a destination (tests and inspection)."""
        with self.engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(select(ledger).where(ledger.c.destination == destination))
            ]


# Ledger rows per statement on Postgres (arrays of this length per parameter).
_PG_CHUNK = 5000
_COPY_READ = 1 << 20  # bytes of COPY text handed to the server per read


def _select_events(conn: Connection, destination: str, ids: Sequence[str],
                   *columns: ColumnElement[Any]) -> Iterator[Row[Any]]:
    """``columns`` of the ledger rows of the given events. Postgres: the ids as one array
    parameter (``= ANY``; an ``IN`` of 900 parameters cost 2.5 times the CPU and 1.6 times
    the time per 1,000 ids); SQLite: ``IN`` lists of 900 (its limit on parameters)."""
    if conn.dialect.name == "postgresql":
        stmt = select(*columns).where(
            ledger.c.destination == destination,
            ledger.c.event_id == any_(bindparam("ids", type_=ARRAY(Text))))
        for start in range(0, len(ids), _PG_CHUNK):
            yield from conn.execute(stmt, {"ids": list(ids[start : start + _PG_CHUNK])})
        return
    for start in range(0, len(ids), 900):
        yield from conn.execute(select(*columns).where(
            ledger.c.destination == destination,
            ledger.c.event_id.in_(ids[start : start + 900])))


# Columns of a new ledger row, in the order the bulk insert below binds them.
_LEDGER_COLUMNS = ("destination", "event_id", "lead_id", "stage", "event_name", "status",
                   "reason", "detail", "batch_id", "attempts", "source_ts", "event_time",
                   "run_id", "created_at", "updated_at")
# Postgres: new ledger rows go through COPY, in its text format (see _copy_rows).
_PG_COPY_LEDGER = f"COPY ls_ledger ({', '.join(_LEDGER_COLUMNS)}) FROM STDIN"
# COPY's text format: a tab between columns, a newline after each row, \N for NULL, and a
# backslash, tab, newline or carriage return inside a value escaped with a backslash.
_COPY_NULL = "\\N"
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_column(values: Sequence[str | None]) -> list[str]:
    """One column of COPY text: NULLs as \\N, and values escaped only when the column holds
    a character to escape at all (one search over the whole column; most hold none)."""
    present = [v for v in values if v is not None]
    try:
        joined = "".join(present)
    except TypeError:  # a value that is not text: COPY gets its text form, as a cast gave
        values = [None if v is None else str(v) for v in values]
        present = [v for v in values if v is not None]
        joined = "".join(present)
    if _COPY_SPECIAL.search(joined):
        return [_COPY_NULL if v is None else v.translate(_COPY_ESCAPES) for v in values]
    if len(present) == len(values):
        return present
    return [_COPY_NULL if v is None else v for v in values]


def _copy_time(value: datetime | None) -> str:
    return _COPY_NULL if value is None else naive_utc(value).isoformat(" ")


def _copy_times(values: Iterable[datetime | None]) -> list[str]:
    """A column of times as COPY text. An aware UTC time (the usual case) is written as it
    is, offset included: Postgres ignores the offset of a ``timestamp without time zone``,
    so the text reads back as the naive UTC time the column holds (one call per value
    instead of three: ``_copy_rows`` takes 2.0 instead of 2.9 ms per 1,000 rows); any other
    zone is converted first."""
    return [_COPY_NULL if v is None else v.isoformat(" ") if v.tzinfo is UTC else _copy_time(v)
            for v in values]


def _copy_rows(destination: str, run_id: str, records: Sequence[LedgerRecord],
               now: datetime, batch_id: str | None) -> str:
    """``records`` as the text COPY reads, column by column (see _PG_COPY_LEDGER)."""
    n = len(records)
    stamp = _copy_time(now)

    def same(value: str) -> list[str]:
        return [value] * n

    columns = (
        same(_copy_column([destination])[0]),
        _copy_column([r.event_id for r in records]),
        _copy_column([r.lead_id for r in records]),
        _copy_column([r.stage for r in records]),
        _copy_column([r.event_name for r in records]),
        _copy_column([r.status for r in records]),
        _copy_column([r.reason for r in records]),
        _copy_column([r.detail for r in records]),
        same(_copy_column([batch_id])[0]) if batch_id is not None
        else _copy_column([r.batch_id for r in records]),
        same("0"),  # attempts
        _copy_times([r.source_ts for r in records]),
        _copy_times([r.event_time for r in records]),
        same(_copy_column([run_id])[0]),
        same(stamp),  # created_at
        same(stamp),  # updated_at
    )
    return "\n".join(map("\t".join, zip(*columns, strict=True))) + "\n"


_SQLITE_INSERT_LEDGER = (f"INSERT INTO ls_ledger ({', '.join(_LEDGER_COLUMNS)}) "
                         f"VALUES ({', '.join('?' for _ in _LEDGER_COLUMNS)})")


def _insert_ledger(conn: Connection, destination: str, run_id: str,
                   records: Sequence[LedgerRecord], now: datetime, batch_id: str | None) -> None:
    """Inserts new ledger rows through the driver, times formatted as :class:`UTCDateTime`
    stores them: SQLAlchemy's executemany processed 15 parameters per row in Python (4 time
    conversions each), which cost more than the inserts themselves. Postgres: one ``COPY``
    of all of them (an ``INSERT … SELECT FROM unnest(arrays)`` per 5,000 rows before: COPY
    took 40 % less time and a third less of the server's and the client's CPU); SQLite: the
    driver's executemany (a loop in C over one prepared statement)."""
    dialect = conn.dialect
    stamp = driver_time(now, dialect)
    if dialect.name == "postgresql":
        data = _copy_rows(destination, run_id, records, now, batch_id)
        cursor = conn.connection.cursor()
        try:
            cursor.copy_expert(_PG_COPY_LEDGER, io.StringIO(data), size=_COPY_READ)
        finally:
            cursor.close()
        return
    conn.exec_driver_sql(_SQLITE_INSERT_LEDGER, [
        (destination, r.event_id, r.lead_id, r.stage, r.event_name, r.status, r.reason,
         r.detail, batch_id or r.batch_id, 0, driver_time(r.source_ts, dialect),
         driver_time(r.event_time, dialect), run_id, stamp, stamp)
        for r in records])

"""The state store on SQLite and Postgres: schema, leases, watermark, outbox, ledger, privacy."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import Engine, String, Text, inspect, select
from sqlalchemy.exc import IntegrityError

from leadsync.db import make_engine
from leadsync.destinations.http import encode_event
from leadsync.state import (
    BATCH_DONE,
    BATCH_PENDING,
    DELIVERED,
    EXPIRED,
    FAILED,
    PENDING,
    SCHEMA_VERSION,
    SKIPPED,
    Cursor,
    EventOutcome,
    LeaseBusyError,
    LedgerRecord,
    QuarantineRecord,
    StateStore,
    metadata,
    outbox,
    outbox_payloads,
    quarantine,
    schema_version,
)
from leadsync.state.model import utcnow
from leadsync.state.outcomes import _write_outcomes

DEST = "meta"
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(minutes=5)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_empty_url"))
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> StateStore:
    store = StateStore(engine)
    store.migrate()
    return store


def cur(minutes: float, lead: Any = "L1", stage: str = "lead") -> Cursor:
    return Cursor(T0 + timedelta(minutes=minutes), lead, stage)


def record(event_id: str, status: str = PENDING, minutes: float = 0, **kw: Any) -> LedgerRecord:
    return LedgerRecord(event_id=event_id, lead_id=f"lead-{event_id}", stage="qualified",
                        event_name="Marketing Qualified Lead", status=status,
                        source_ts=T0 + timedelta(minutes=minutes), event_time=T0, **kw)


def envelope(event_id: str) -> dict[str, Any]:
    return {"event_id": event_id, "event_time": int(T0.timestamp()),
            "body": {"event_id": event_id, "user_data": {"em": ["0" * 64]}}}


def stage(store: StateStore, run_id: str, batch_id: str, ids: list[str],
          prev: Cursor | None, seq: int = 1) -> None:
    store.stage_batch(DEST, run_id, batch_id, seq, [envelope(i) for i in ids],
                      [record(i, batch_id=batch_id) for i in ids], prev)


def start(store: StateStore, run_id: str, window_max: Cursor | None) -> None:
    store.start_run(run_id, DEST, None, T0 + timedelta(days=1), store.get_watermark(DEST))
    if window_max is not None:
        store.update_run(run_id, DEST, window_max=window_max)


def outbox_row(store: StateStore, batch_id: str) -> Any:
    with store.engine.connect() as conn:
        return conn.execute(select(outbox).where(outbox.c.batch_id == batch_id)).first()


def payload_of(store: StateStore, batch_id: str) -> str | None:
    """A batch's stored payload (None once it is purged)."""
    with store.engine.connect() as conn:
        return conn.execute(select(outbox_payloads.c.payload)
                            .where(outbox_payloads.c.batch_id == batch_id)).scalar()


def ledger_by_id(store: StateStore) -> dict[str, dict[str, Any]]:
    return {r["event_id"]: r for r in store.ledger_rows(DEST)}


# -- schema ---------------------------------------------------------------------------------


def test_migrate_creates_every_table_and_records_the_version(store: StateStore) -> None:
    assert store.version() == SCHEMA_VERSION
    tables = set(inspect(store.engine).get_table_names())
    assert {t.name for t in metadata.sorted_tables} <= tables


@pytest.mark.postgres
def test_postgres_ledger_indexes_leave_the_columns_a_delivery_changes_alone(
        pg_empty_url: str) -> None:
    """Migration 9 replaces the ledger's indexes on status and reason (migrations 2 and 7) by
    indexes on columns a delivery does not change, and leaves room on its pages, so that
    recording a delivery rewrites each row in place (HOT): from a version-8 database with
    events pending, and in a database made at once."""
    from sqlalchemy import delete, text

    def indexes(engine: Engine) -> dict[str, str]:
        with engine.connect() as conn:
            return {str(n): str(d) for n, d in conn.execute(text(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'ls_ledger'"))}

    expected = {"ls_ledger_pkey", "ix_ls_ledger_batch", "ix_ls_ledger_run",
                "ix_ls_ledger_failed", "ix_ls_ledger_receipt"}
    engine = make_engine(pg_empty_url)
    try:
        store = StateStore(engine)
        store.migrate()
        assert set(indexes(engine)) == expected
        with engine.begin() as conn:  # back to version 8, with its indexes
            for name in expected - {"ls_ledger_pkey"}:
                conn.exec_driver_sql(f"DROP INDEX {name}")
            conn.exec_driver_sql("ALTER TABLE ls_ledger RESET (fillfactor)")
            conn.exec_driver_sql("CREATE INDEX ix_ls_ledger_status ON ls_ledger "
                                 "(destination, status) WHERE status <> 'delivered'")
            conn.exec_driver_sql("CREATE INDEX ix_ls_ledger_reason ON ls_ledger "
                                 "(destination, reason, updated_at) WHERE reason IS NOT NULL")
            conn.execute(delete(schema_version).where(schema_version.c.version == 9))
        start(store, "r1", cur(1))
        stage(store, "r1", "b1", ["e1", "e2", "e3"], prev=cur(0))
        assert StateStore(engine).migrate() == SCHEMA_VERSION
        found = indexes(engine)
        assert set(found) == expected
        assert "rejected" in found["ix_ls_ledger_failed"]
        assert "'receipt'" in found["ix_ls_ledger_receipt"]
        with engine.connect() as conn:
            assert conn.execute(text(
                "SELECT reloptions FROM pg_class WHERE relname = 'ls_ledger'")).scalar() == [
                    "fillfactor=50"]
        # Rows staged before the migration were written full; rows staged now have room.
        stage(store, "r1", "b2", ["e4", "e5", "e6"], prev=cur(0))
        with engine.connect() as conn, conn.begin():
            _write_outcomes(conn, DEST, {e: EventOutcome(DELIVERED) for e in ("e4", "e5", "e6")},
                            utcnow(), "b2")
            upd, hot = conn.execute(text(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
                "WHERE relname = 'ls_ledger'")).one()
        assert (upd, hot) == (3, 3)
        assert {r["event_id"]: r["status"] for r in store.ledger_rows(DEST)} == {
            "e1": PENDING, "e2": PENDING, "e3": PENDING,
            "e4": DELIVERED, "e5": DELIVERED, "e6": DELIVERED}
    finally:
        engine.dispose()


def test_the_ledger_has_no_index_by_lead(engine: Engine) -> None:
    """Migration 8 drops the ledger's index by lead (no query used it; every write paid for
    it); a database made at once never has it."""
    from sqlalchemy import delete

    def indexes() -> set[str]:
        return {str(i["name"]) for i in inspect(engine).get_indexes("ls_ledger")}

    store = StateStore(engine)
    store.migrate()
    assert "ix_ls_ledger_lead" not in indexes()
    # SQLite keeps its status index; Postgres replaces it (migration 9).
    assert ("ix_ls_ledger_status" in indexes()) == (engine.dialect.name == "sqlite")
    start(store, "r1", cur(1))
    stage(store, "r1", "b1", ["e1", "e2"], prev=cur(0))
    with engine.begin() as conn:  # back to version 7, with its index
        conn.exec_driver_sql("CREATE INDEX ix_ls_ledger_lead ON ls_ledger (destination, lead_id)")
        conn.execute(delete(schema_version).where(schema_version.c.version == 8))
    assert "ix_ls_ledger_lead" in indexes()
    assert StateStore(engine).migrate() == SCHEMA_VERSION
    assert "ix_ls_ledger_lead" not in indexes()
    assert store.pending_batch_ids(DEST) == ["b1"]
    assert set(store.ledger_lookup(DEST, ["e1", "e2"])) == {"e1", "e2"}


def test_migrate_is_idempotent(engine: Engine) -> None:
    first = StateStore(engine)
    assert first.migrate() == SCHEMA_VERSION
    assert first.migrate() == SCHEMA_VERSION
    # A fresh store object (another worker) on the migrated database changes nothing.
    again = StateStore(engine)
    assert again.migrate() == SCHEMA_VERSION
    with engine.connect() as conn:
        versions = list(conn.execute(select(schema_version.c.version)).scalars())
    assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_migrate_keeps_existing_data(engine: Engine) -> None:
    store = StateStore(engine)
    store.migrate()
    store.record_terminal(DEST, "r1", [record("e1", SKIPPED, reason="opted_out")])
    StateStore(engine).migrate()
    assert ledger_by_id(store)["e1"]["status"] == SKIPPED


def test_concurrent_migrators_on_a_fresh_database(url: str) -> None:
    """Workers starting at once on an empty database must all succeed (no CREATE race)."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def migrate() -> None:
        engine = make_engine(url)
        try:
            barrier.wait()
            StateStore(engine).migrate()
        except BaseException as exc:  # noqa: BLE001 - asserted empty below
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=migrate) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert StateStore(make_engine(url)).version() == SCHEMA_VERSION


def test_sqlite_store_opens_while_a_new_database_is_locked(tmp_path: Path) -> None:
    """Switching a new SQLite file to WAL ignored the busy timeout: a worker opening the
    state store while another held the fresh file's lock failed with "database is locked"."""
    path = tmp_path / "state.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another worker, the file still in rollback mode
    timer = threading.Timer(0.2, holder.execute, args=("COMMIT",))
    timer.start()
    engine = make_engine(f"sqlite:///{path}")
    try:
        assert StateStore(engine).migrate() == SCHEMA_VERSION
    finally:
        timer.join()
        holder.close()
        engine.dispose()


# -- leases ---------------------------------------------------------------------------------


def test_lease_acquire_renew_release(store: StateStore) -> None:
    assert store.acquire_lease(DEST, "run-a", TTL)
    assert store.lease_holder(DEST) == "run-a"
    assert store.acquire_lease(DEST, "run-a", TTL)  # re-entrant for the holder
    assert store.renew_lease(DEST, "run-a", TTL)

    store.release_lease(DEST, "run-a")
    assert store.lease_holder(DEST) is None
    assert not store.renew_lease(DEST, "run-a", TTL)  # renewing a released lease fails
    assert store.acquire_lease(DEST, "run-b", TTL)
    assert store.lease_holder(DEST) == "run-b"


def test_second_holder_is_refused(store: StateStore) -> None:
    assert store.acquire_lease(DEST, "run-a", TTL)
    assert not store.acquire_lease(DEST, "run-b", TTL)
    assert not store.renew_lease(DEST, "run-b", TTL)
    store.release_lease(DEST, "run-b")  # not the holder: no effect
    assert store.lease_holder(DEST) == "run-a"


def test_leases_are_per_destination(store: StateStore) -> None:
    assert store.acquire_lease("meta", "run-a", TTL)
    assert store.acquire_lease("tiktok", "run-b", TTL)
    assert store.lease_holder("meta") == "run-a"
    assert store.lease_holder("tiktok") == "run-b"


def test_expired_lease_can_be_taken_over(store: StateStore) -> None:
    assert store.acquire_lease(DEST, "run-a", timedelta(milliseconds=50))
    assert not store.acquire_lease(DEST, "run-b", TTL)
    time.sleep(0.1)
    assert store.lease_holder(DEST) is None
    assert store.acquire_lease(DEST, "run-b", TTL)
    assert store.lease_holder(DEST) == "run-b"
    # The old holder has lost it for good.
    assert not store.renew_lease(DEST, "run-a", TTL)
    assert not store.acquire_lease(DEST, "run-a", TTL)


def test_renew_extends_the_lease(store: StateStore) -> None:
    assert store.acquire_lease(DEST, "run-a", timedelta(milliseconds=300))
    time.sleep(0.15)
    assert store.renew_lease(DEST, "run-a", TTL)
    time.sleep(0.25)  # past the first expiry
    assert not store.acquire_lease(DEST, "run-b", TTL)
    assert store.lease_holder(DEST) == "run-a"


def test_wait_for_lease_raises_naming_the_holder_after_the_wait(store: StateStore) -> None:
    assert store.acquire_lease(DEST, "scheduled__2025-06-01T12:00", TTL)
    started = time.monotonic()
    with pytest.raises(LeaseBusyError) as info:
        store.wait_for_lease(DEST, "manual__x", TTL, timedelta(milliseconds=300))
    waited = time.monotonic() - started
    assert 0.3 <= waited < 3
    assert "scheduled__2025-06-01T12:00" in str(info.value)
    assert "'meta'" in str(info.value)
    assert store.lease_holder(DEST) == "scheduled__2025-06-01T12:00"


def test_wait_for_lease_gets_a_lease_released_during_the_wait(store: StateStore) -> None:
    assert store.acquire_lease(DEST, "run-a", TTL)
    timer = threading.Timer(0.2, store.release_lease, args=(DEST, "run-a"))
    timer.start()
    try:
        store.wait_for_lease(DEST, "run-b", TTL, timedelta(seconds=5))
    finally:
        timer.join()
    assert store.lease_holder(DEST) == "run-b"


def _race(store: StateStore, holders: list[str]) -> list[str]:
    barrier = threading.Barrier(len(holders))
    winners: list[str] = []
    errors: list[BaseException] = []

    def go(holder: str) -> None:
        try:
            barrier.wait()
            if store.acquire_lease(DEST, holder, TTL):
                winners.append(holder)
        except BaseException as exc:  # noqa: BLE001 - asserted empty below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(h,)) for h in holders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    return winners


def test_racing_threads_exactly_one_wins(store: StateStore) -> None:
    for round_ in range(3):
        store.release_lease(DEST, store.lease_holder(DEST) or "")
        winners = _race(store, [f"r{round_}-{i}" for i in range(8)])
        assert len(winners) == 1
        assert store.lease_holder(DEST) == winners[0]


def test_racing_threads_over_an_expired_lease_exactly_one_wins(store: StateStore) -> None:
    assert store.acquire_lease(DEST, "crashed-run", timedelta(milliseconds=10))
    time.sleep(0.05)
    winners = _race(store, [f"r{i}" for i in range(8)])
    assert len(winners) == 1
    assert store.lease_holder(DEST) == winners[0]


def _acquire_in_process(url: str, holder: str, barrier: Any, results: Any) -> None:
    engine = make_engine(url)
    try:
        barrier.wait()
        results.put((holder, StateStore(engine).acquire_lease(DEST, holder, TTL)))
    finally:
        engine.dispose()


def test_racing_processes_exactly_one_wins(store: StateStore, url: str) -> None:
    store.engine.dispose()  # no pooled connections inherited by the children
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [ctx.Process(target=_acquire_in_process, args=(url, f"proc-{i}", barrier, results))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    outcomes = dict(results.get(timeout=5) for _ in procs)
    winners = [h for h, won in outcomes.items() if won]
    assert len(winners) == 1
    assert store.lease_holder(DEST) == winners[0]


# -- watermark ------------------------------------------------------------------------------


def test_first_commit_sets_the_watermark(store: StateStore) -> None:
    assert store.get_watermark(DEST) is None
    start(store, "r1", cur(10, "L9", "won"))
    before, after = store.commit_run("r1", DEST, "success")
    assert before is None
    assert after == cur(10, "L9", "won")
    assert store.get_watermark(DEST) == cur(10, "L9", "won")
    assert store.get_run("r1", DEST)["watermark_after"] == cur(10, "L9", "won")


def test_watermark_never_moves_backward(store: StateStore) -> None:
    start(store, "r1", cur(10))
    store.commit_run("r1", DEST, "success")

    start(store, "r2", cur(5))  # an older candidate (e.g. a lookback-only run)
    before, after = store.commit_run("r2", DEST, "success")
    assert before == cur(10)
    assert after == cur(10)
    assert store.get_watermark(DEST) == cur(10)

    # Same timestamp, smaller tie-breakers: still backward.
    start(store, "r3", cur(10, "L0", "lead"))
    store.commit_run("r3", DEST, "success")
    assert store.get_watermark(DEST) == cur(10)

    start(store, "r4", cur(10, "L1", "qualified"))  # same ts and lead, later stage: forward
    store.commit_run("r4", DEST, "success")
    assert store.get_watermark(DEST) == cur(10, "L1", "qualified")


def test_watermark_keeps_the_lead_id_type(store: StateStore) -> None:
    start(store, "r1", cur(1, 12345, "won"))
    store.commit_run("r1", DEST, "success")
    assert store.get_watermark(DEST) == Cursor(T0 + timedelta(minutes=1), 12345, "won")


@pytest.mark.parametrize(("lead", "stored"), [
    (uuid.UUID("8d07632d-0cac-44ec-b03c-3575b60ec7bb"), "8d07632d-0cac-44ec-b03c-3575b60ec7bb"),
    (Decimal("123456"), 123456),
    (Decimal("12.5"), "12.5"),
])
def test_non_json_lead_ids_are_stored(store: StateStore, lead: Any, stored: Any) -> None:
    """Postgres uuid/numeric lead ids used to crash update_run and commit with TypeError."""
    start(store, "r1", cur(1, lead))
    stage(store, "r1", "b1", ["e1"], prev=cur(0, lead))
    assert store.load_batch("b1").prev_cursor == cur(0, stored)  # type: ignore[union-attr]
    batch = store.load_batch("b1")
    assert batch is not None
    store.record_outcomes(batch, {"e1": EventOutcome(DELIVERED)}, "r1")
    _, after = store.commit_run("r1", DEST, "success")
    assert after == cur(1, stored)
    assert store.get_watermark(DEST) == cur(1, stored)
    json.dumps(store.summary([DEST]))


def test_run_without_rows_leaves_the_watermark(store: StateStore) -> None:
    start(store, "r1", cur(10))
    store.commit_run("r1", DEST, "success")
    start(store, "r2", None)
    before, after = store.commit_run("r2", DEST, "success")
    assert before == after == cur(10)


def test_commit_holds_the_watermark_before_a_pending_batch(store: StateStore) -> None:
    start(store, "r1", cur(30))
    stage(store, "r1", "b1", ["e1", "e2"], prev=cur(10))
    stage(store, "r1", "b2", ["e3"], prev=cur(20), seq=2)
    _, after = store.commit_run("r1", DEST, "partial")
    assert after == cur(10)  # just before the first event of the oldest pending batch

    # b1 delivered; b2 still pending: the watermark moves up to b2's bound, not further.
    batch = store.load_batch("b1")
    assert batch is not None
    store.record_outcomes(batch, {"e1": EventOutcome(DELIVERED), "e2": EventOutcome(DELIVERED)},
                          "r2")
    start(store, "r2", cur(30))
    _, after = store.commit_run("r2", DEST, "partial")
    assert after == cur(20)

    batch = store.load_batch("b2")
    assert batch is not None
    store.record_outcomes(batch, {"e3": EventOutcome(FAILED, "rejected", "bad")}, "r3")
    start(store, "r3", cur(30))
    _, after = store.commit_run("r3", DEST, "success")
    assert after == cur(30)  # every batch terminal: advances fully
    assert store.get_watermark(DEST) == cur(30)


def test_pending_batch_of_the_very_first_row_blocks_the_watermark(store: StateStore) -> None:
    start(store, "r1", cur(30))
    stage(store, "r1", "b1", ["e1"], prev=None)
    _, after = store.commit_run("r1", DEST, "partial")
    assert after is None
    assert store.get_watermark(DEST) is None


def test_pending_batch_never_moves_the_watermark_backward(store: StateStore) -> None:
    start(store, "r1", cur(30))
    store.commit_run("r1", DEST, "success")
    start(store, "r2", cur(40))
    stage(store, "r2", "b1", ["e1"], prev=cur(5))  # a lookback row older than the watermark
    _, after = store.commit_run("r2", DEST, "partial")
    assert after == cur(30)


def test_batches_of_other_destinations_do_not_hold_the_watermark(store: StateStore) -> None:
    store.stage_batch("tiktok", "rx", "bx", 1, [envelope("t1")], [record("t1")], cur(1))
    start(store, "r1", cur(30))
    _, after = store.commit_run("r1", DEST, "success")
    assert after == cur(30)


def test_commit_closes_the_run_with_counts(store: StateStore) -> None:
    start(store, "r1", cur(1))
    store.update_run("r1", DEST, counts={"read": 3})
    store.commit_run("r1", DEST, "success", counts={"read": 2, "delivered": 1})
    run = store.get_run("r1", DEST)
    assert run is not None
    assert run["status"] == "success"
    assert run["finished_at"] is not None
    assert run["counts"] == {"read": 5, "delivered": 1}


# -- outbox and ledger ----------------------------------------------------------------------


def test_stage_batch_writes_outbox_and_pending_ledger(store: StateStore) -> None:
    start(store, "r1", None)
    stage(store, "r1", "b1", ["e1", "e2", "e3"], prev=cur(3))

    row = outbox_row(store, "b1")
    assert row.status == BATCH_PENDING
    assert row.n_events == 3
    assert [e["event_id"] for e in json.loads(payload_of(store, "b1") or "")] == [
        "e1", "e2", "e3"]
    rows = ledger_by_id(store)
    assert {k: (v["status"], v["batch_id"]) for k, v in rows.items()} == {
        "e1": (PENDING, "b1"), "e2": (PENDING, "b1"), "e3": (PENDING, "b1")}
    assert store.pending_batch_ids(DEST) == ["b1"]

    batch = store.load_batch("b1")
    assert batch is not None
    assert batch.prev_cursor == cur(3)
    assert batch.events == [envelope("e1"), envelope("e2"), envelope("e3")]


# Text that COPY's text format must escape (Postgres writes new ledger rows through COPY),
# beside text that looks like its escapes and NULL marker.
AWKWARD = ["tab\there", "new\nline", "carriage\rreturn", "back\\slash", "\\N", "\\t", "\\",
           "ends with \\", "émoji 🎯 ünïcode", "quote ' and \" both", "", " spaced ", "a,b;c|d"]


def test_ledger_rows_keep_every_character_of_their_text(store: StateStore) -> None:
    start(store, "r\t1\\x", None)
    ids = [f"ev{i}-{text}" for i, text in enumerate(AWKWARD)]
    records = [LedgerRecord(event_id, text, text or "s", text or None, PENDING,
                            T0 + timedelta(seconds=i), None if i % 2 else T0,
                            reason=text or None, detail=text or None)
               for i, (event_id, text) in enumerate(zip(ids, AWKWARD, strict=True))]
    store.stage_batch(DEST, "r\t1\\x", "b\\1", 1, [envelope(i) for i in ids], records, None)
    rows = ledger_by_id(store)
    assert set(rows) == set(ids)
    for i, (event_id, text) in enumerate(zip(ids, AWKWARD, strict=True)):
        row = rows[event_id]
        assert (row["lead_id"], row["stage"], row["event_name"], row["reason"],
                row["detail"]) == (text, text or "s", text or None, text or None, text or None)
        assert (row["batch_id"], row["run_id"], row["status"]) == ("b\\1", "r\t1\\x", PENDING)
        assert row["source_ts"] == T0 + timedelta(seconds=i)
        assert row["event_time"] == (None if i % 2 else T0)
    # A column without any character to escape, and records of no batch of their own.
    plain = [record(f"p{i}", status=SKIPPED, reason="opted_out") for i in range(3)]
    store.record_terminal(DEST, "r2", plain)
    assert {k: (v["status"], v["reason"], v["batch_id"], v["lead_id"])
            for k, v in ledger_by_id(store).items() if k.startswith("p")} == {
        f"p{i}": (SKIPPED, "opted_out", None, f"lead-p{i}") for i in range(3)}


def test_ledger_times_keep_their_instant_whatever_their_zone(store: StateStore) -> None:
    # UTC times go to Postgres' COPY with their offset (the column ignores it); other zones
    # are converted to UTC first: either way the same instant reads back, to the microsecond.
    from datetime import timezone

    plus2 = timezone(timedelta(hours=2))
    exact = T0 + timedelta(microseconds=123_457)
    records = [LedgerRecord("utc", "lead-utc", "qualified", "MQL", PENDING,
                            source_ts=T0 + timedelta(minutes=1), event_time=exact),
               LedgerRecord("zoned", "lead-zoned", "qualified", "MQL", PENDING,
                            source_ts=exact.astimezone(plus2),
                            event_time=(T0 + timedelta(hours=5)).astimezone(plus2))]
    assert T0.tzinfo is UTC and records[1].source_ts.utcoffset() == timedelta(hours=2)
    start(store, "r1", None)
    store.stage_batch(DEST, "r1", "b1", 1, [envelope("utc"), envelope("zoned")], records, None)
    rows = ledger_by_id(store)
    assert (rows["utc"]["source_ts"], rows["utc"]["event_time"]) == (
        T0 + timedelta(minutes=1), exact)
    assert (rows["zoned"]["source_ts"], rows["zoned"]["event_time"]) == (
        exact, T0 + timedelta(hours=5))
    assert rows["zoned"]["source_ts"].tzinfo is UTC


def test_stage_batch_is_atomic(store: StateStore) -> None:
    """A failure writing the ledger leaves no outbox batch behind (and vice versa)."""
    bad = LedgerRecord("e2", "lead-e2", "qualified", "MQL", PENDING,
                       source_ts=datetime(2025, 6, 1, 12, 0))  # naive: refused by the store
    with pytest.raises(Exception, match="naive"):
        store.stage_batch(DEST, "r1", "b1", 1, [envelope("e1"), envelope("e2")],
                          [record("e1"), bad], None)
    assert outbox_row(store, "b1") is None
    assert payload_of(store, "b1") is None
    assert store.ledger_rows(DEST) == []

    stage(store, "r1", "b2", ["e3"], prev=None)
    with pytest.raises(IntegrityError):
        stage(store, "r1", "b2", ["e4"], prev=None)  # duplicate batch id
    assert set(ledger_by_id(store)) == {"e3"}


def test_pending_batches_are_listed_oldest_first(store: StateStore) -> None:
    stage(store, "r1", "b-old", ["e1"], prev=None, seq=1)
    time.sleep(0.01)
    stage(store, "r2", "b-new-2", ["e2"], prev=None, seq=2)
    stage(store, "r2", "b-new-1", ["e3"], prev=None, seq=1)
    assert store.pending_batch_ids(DEST)[0] == "b-old"
    assert set(store.pending_batch_ids(DEST)) == {"b-old", "b-new-1", "b-new-2"}
    assert store.pending_batch_ids("tiktok") == []


def test_record_outcomes_closes_the_batch_and_purges_the_payload(store: StateStore) -> None:
    start(store, "r1", None)
    stage(store, "r1", "b1", ["e1", "e2", "e3"], prev=None)
    batch = store.load_batch("b1")
    assert batch is not None
    store.record_outcomes(batch, {
        "e1": EventOutcome(DELIVERED),
        "e2": EventOutcome(FAILED, "rejected", "Invalid parameter"),
        "e3": EventOutcome(EXPIRED, "event_too_old", "aged out while pending"),
    }, "r1", counts={"delivered": 1, "failed": 1})

    row = outbox_row(store, "b1")
    assert row.status == BATCH_DONE
    assert payload_of(store, "b1") is None
    assert row.attempts == 1
    assert store.pending_batch_ids(DEST) == []
    rows = ledger_by_id(store)
    assert rows["e1"]["status"] == DELIVERED
    assert rows["e1"]["delivered_at"] is not None
    assert (rows["e2"]["status"], rows["e2"]["reason"], rows["e2"]["detail"]) == (
        FAILED, "rejected", "Invalid parameter")
    assert rows["e2"]["delivered_at"] is None
    assert rows["e3"]["status"] == EXPIRED
    assert all(r["attempts"] == 1 for r in rows.values())
    assert store.get_run("r1", DEST)["counts"] == {"delivered": 1, "failed": 1}


def test_record_outcomes_keeps_the_events_still_pending(store: StateStore) -> None:
    stage(store, "r1", "b1", ["e1", "e2", "e3", "e4"], prev=cur(1))
    batch = store.load_batch("b1")
    assert batch is not None
    # e3 explicitly pending, e4 without an outcome: both stay in the batch.
    store.record_outcomes(batch, {"e1": EventOutcome(DELIVERED),
                                  "e2": EventOutcome(FAILED, "rejected", "x"),
                                  "e3": EventOutcome(PENDING)}, "r1")

    row = outbox_row(store, "b1")
    assert row.status == BATCH_PENDING
    assert row.n_events == 2
    assert store.pending_batch_ids(DEST) == ["b1"]
    again = store.load_batch("b1")
    assert again is not None
    assert [e["event_id"] for e in again.events] == ["e3", "e4"]
    assert again.prev_cursor == cur(1)
    assert again.attempts == 1
    rows = ledger_by_id(store)
    assert rows["e3"]["status"] == PENDING
    assert rows["e4"]["status"] == PENDING

    store.record_outcomes(again, {"e3": EventOutcome(DELIVERED), "e4": EventOutcome(DELIVERED)},
                          "r2")
    row = outbox_row(store, "b1")
    assert (row.status, payload_of(store, "b1"), row.attempts) == (BATCH_DONE, None, 2)


def test_serialised_bodies_are_stored_as_they_are_and_loaded_raw(store: StateStore) -> None:
    # Stage stores events serialised once (msgspec.Raw); push of a RAW_EVENT_BODIES
    # destination loads them raw and embeds them in the request without decoding them.
    bodies = [{"event_id": f"e{i}", "user_data": {"em": "0" * 64, "client_user_agent": "Zoë"}}
              for i in range(3)]
    envelopes = [{"event_id": f"e{i}", "event_time": int(T0.timestamp()),
                  "body": encode_event(body)} for i, body in enumerate(bodies)]
    store.stage_batch(DEST, "r1", "b1", 1, envelopes,
                      [record(f"e{i}", batch_id="b1") for i in range(3)], None)

    decoded = store.load_batch("b1")
    assert decoded is not None
    assert [e["body"] for e in decoded.events] == bodies
    raw = store.load_batch("b1", raw_bodies=True)
    assert raw is not None
    assert all(isinstance(e["body"], msgspec.Raw) for e in raw.events)
    assert [bytes(e["body"]) for e in raw.events] == [bytes(e["body"]) for e in envelopes]
    assert [json.loads(bytes(e["body"])) for e in raw.events] == bodies
    assert [e["event_time"] for e in raw.events] == [int(T0.timestamp())] * 3

    # What stays pending is written back whole, from either form.
    store.record_outcomes(raw, {"e0": EventOutcome(DELIVERED)}, "r1")
    again = store.load_batch("b1")
    assert again is not None
    assert [e["body"] for e in again.events] == bodies[1:]


def test_encode_event_replaces_text_utf8_cannot_hold() -> None:
    body = {"user_data": {"client_user_agent": "Mozilla\udcff", "pair": "\ud83d\ude00"}}
    assert json.loads(bytes(encode_event(body))) == {
        "user_data": {"client_user_agent": "Mozilla\ufffd", "pair": "\U0001f600"}}
    assert bytes(encode_event({"a": "b"})) == b'{"a":"b"}'


def test_note_attempt_counts_and_keeps_the_batch(store: StateStore) -> None:
    stage(store, "r1", "b1", ["e1"], prev=None)
    store.note_attempt("b1", "code 2: temporarily unavailable")
    row = outbox_row(store, "b1")
    assert (row.status, row.attempts, row.last_error) == (
        BATCH_PENDING, 1, "code 2: temporarily unavailable")


def test_ledger_lookup(store: StateStore) -> None:
    store.record_terminal(DEST, "r1", [record("s1", SKIPPED, minutes=3, reason="opted_out")])
    stage(store, "r1", "b1", ["p1"], prev=None)
    store.record_terminal("tiktok", "r1", [record("other", SKIPPED)])

    found = store.ledger_lookup(DEST, ["s1", "p1", "unknown", "other", "s1"])
    assert set(found) == {"s1", "p1"}
    assert found["s1"].status == SKIPPED
    assert found["s1"].source_ts == T0 + timedelta(minutes=3)
    assert found["p1"].status == PENDING
    assert store.ledger_lookup(DEST, []) == {}


def test_ledger_lookup_of_many_ids(store: StateStore) -> None:
    ids = [f"e{i:05d}" for i in range(2500)]
    store.record_terminal(DEST, "r1", [record(i, SKIPPED) for i in ids[::2]])
    found = store.ledger_lookup(DEST, ids)
    assert set(found) == set(ids[::2])


def test_record_terminal_updates_an_existing_event(store: StateStore) -> None:
    store.record_terminal(DEST, "r1", [record("e1", SKIPPED, minutes=1, reason="no_match_keys")])
    store.record_terminal(DEST, "r2", [record("e1", EXPIRED, minutes=2, reason="event_too_old")])
    rows = store.ledger_rows(DEST)
    assert len(rows) == 1
    assert (rows[0]["status"], rows[0]["reason"], rows[0]["run_id"]) == (
        EXPIRED, "event_too_old", "r2")
    assert rows[0]["source_ts"] == T0 + timedelta(minutes=2)


def test_summary_counts(store: StateStore) -> None:
    store.record_terminal(DEST, "r1", [record("s1", SKIPPED), record("s2", SKIPPED),
                                       record("x1", EXPIRED)])
    stage(store, "r1", "b1", ["d1", "d2", "f1", "p1"], prev=cur(1))
    batch = store.load_batch("b1")
    assert batch is not None
    store.record_outcomes(batch, {"d1": EventOutcome(DELIVERED), "d2": EventOutcome(DELIVERED),
                                  "f1": EventOutcome(FAILED, "rejected", "x")}, "r1")
    store.quarantine_rows(DEST, "r1", [QuarantineRecord("q1", "lead", "missing_stage", "", T0)])
    start(store, "r1", cur(7, "L7", "won"))
    store.commit_run("r1", DEST, "partial")

    summary = store.summary([DEST, "tiktok"])
    assert summary[DEST] == {
        "watermark": cur(1).as_dict(),  # held before the pending event p1
        "delivered": 2, "pending": 1, "failed": 1, "expired": 1, "skipped": 2, "quarantined": 1,
    }
    assert summary["tiktok"] == {"watermark": None, "delivered": 0, "pending": 0, "failed": 0,
                                 "expired": 0, "skipped": 0, "quarantined": 0}
    json.dumps(summary)  # JSON-ready for `state show --json`


# -- quarantine -----------------------------------------------------------------------------


def test_quarantine_upsert_and_resolve(store: StateStore) -> None:
    q = QuarantineRecord("L1", "won", "bad_event_time", "event_time is not a timestamp", T0)
    store.quarantine_rows(DEST, "r1", [q, QuarantineRecord("L2", "lead", "missing_stage", "", T0)])
    assert store.open_quarantine_keys(DEST) == {("L1", "won"), ("L2", "lead")}

    with store.engine.connect() as conn:
        first_seen = conn.execute(select(quarantine.c.first_seen).where(
            quarantine.c.lead_id == "L1")).scalar()
    time.sleep(0.01)
    # The same row breaks another rule in a later run: one entry, updated.
    store.quarantine_rows(DEST, "r2", [QuarantineRecord("L1", "won", "future_event_time",
                                                        "event_time is in the future", T0)])
    with store.engine.connect() as conn:
        rows = conn.execute(select(quarantine).where(quarantine.c.lead_id == "L1")).all()
    assert len(rows) == 1
    assert (rows[0].rule, rows[0].run_id) == ("future_event_time", "r2")
    assert rows[0].first_seen == first_seen
    assert rows[0].last_seen > first_seen

    assert store.resolve_quarantine(DEST, [("L1", "won"), ("nope", "lead")]) == 1
    assert store.resolve_quarantine(DEST, [("L1", "won")]) == 0  # already resolved
    assert store.open_quarantine_keys(DEST) == {("L2", "lead")}
    assert store.summary([DEST])[DEST]["quarantined"] == 1

    # It breaks again: re-opened.
    store.quarantine_rows(DEST, "r3", [q])
    assert store.open_quarantine_keys(DEST) == {("L1", "won"), ("L2", "lead")}
    assert store.open_quarantine_keys("tiktok") == set()


def test_quarantine_of_nothing_is_a_no_op(store: StateStore) -> None:
    store.quarantine_rows(DEST, "r1", [])
    assert store.open_quarantine_keys(DEST) == set()


# -- privacy (G5) ---------------------------------------------------------------------------


def _text_cells(engine: Engine) -> Iterator[tuple[str, str, str]]:
    """(table, column, value) of every text cell of every ls_* table."""
    insp = inspect(engine)
    tables = [t for t in insp.get_table_names() if t.startswith("ls_")]
    assert {"ls_ledger", "ls_outbox", "ls_quarantine", "ls_runs", "ls_watermarks"} <= set(tables)
    for name in tables:
        table = metadata.tables[name]
        columns = [c for c in table.columns if isinstance(c.type, String | Text)]
        if not columns:
            continue
        with engine.connect() as conn:
            for row in conn.execute(select(*columns)):
                for column, value in zip(columns, row, strict=True):
                    if value is not None:
                        yield name, column.name, str(value)


def _pii_needles(rows: list[dict[str, Any]]) -> set[str]:
    from leadsync.identity import normalize_email, normalize_phone_digits

    needles: set[str] = set()
    for row in rows:
        email, phone = row.get("email"), row.get("phone")
        for value in (email, normalize_email(email) if email else None):
            if value and "@" in value:
                needles.add(value.strip().lower())
        if phone:
            needles.add(phone.strip().lower())
            digits = normalize_phone_digits(phone, row.get("country"))
            if digits:
                needles.add(digits)
            national = re.sub(r"\D", "", phone)
            if len(national) >= 7:
                needles.add(national)
    return {n for n in needles if len(n) >= 7}


def _assert_no_pii(engine: Engine, needles: set[str]) -> int:
    pattern = re.compile("|".join(re.escape(n) for n in sorted(needles, key=len, reverse=True)))
    cells = 0
    for table, column, value in _text_cells(engine):
        cells += 1
        hit = pattern.search(value.lower())
        assert hit is None, f"raw identifier {hit.group(0)!r} stored in {table}.{column}"
    return cells


def test_no_raw_email_or_phone_in_any_table_after_a_run(tmp_path: Path) -> None:
    """G5: after staging (hashed payloads in the outbox) and after full runs (with the data
    contract quarantining the demo's broken rows), no text cell of any ls_* table, and no file
    the run wrote (Data Docs), holds a seeded row's email or phone, raw or normalised."""
    from leadsync import demo_data
    from leadsync.config import parse_config
    from leadsync.destinations import meta
    from leadsync.pipeline import Pipeline
    from leadsync.sandbox.app import SandboxConfig
    from leadsync.sandbox.server import SandboxServer

    now = datetime.now(UTC)
    warehouse = make_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    state_engine = make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    demo_data.seed(warehouse, 200, now, broken_rows=True)
    with warehouse.connect() as conn:
        seeded = [dict(r) for r in conn.execute(
            select(demo_data.lead_stages_table(demo_data.MetaData()))).mappings()]
    needles = _pii_needles(seeded)
    assert len(needles) > 100  # the check has teeth

    docs = tmp_path / "data_docs"
    config = parse_config({
        "contract": {"data_docs_dir": str(docs), "failure_threshold": 1.0},
        "destinations": [{
            "name": "meta", "type": "meta", "crm_name": "HubSpot",
            "stages": {"lead": "Lead", "qualified": "MQL", "sales_accepted": "SQL",
                       "won": "Converted"}}]})
    store = StateStore(state_engine)
    with SandboxServer(SandboxConfig()) as sandbox:
        creds = meta.parse_credentials(sandbox.url, "sandbox-meta-token",
                                       {"pixel_id": "1234567890123456"})
        pipeline = Pipeline(config, config.destinations[0], store, warehouse,
                            credentials=lambda: creds, sleep=lambda s: None)
        pipeline.open_run("r1")
        pipeline.check("r1")
        staged = pipeline.stage("r1")
        assert staged["batch_ids"]
        with state_engine.connect() as conn:
            payloads = list(conn.execute(select(outbox_payloads.c.payload)).scalars())
        assert len(payloads) == len(staged["batch_ids"])
        assert all(payloads)  # hashed payloads are stored while pending...
        _assert_no_pii(state_engine, needles)  # ...without raw identifiers

        for batch_id in staged["batch_ids"]:
            pipeline.push("r1", batch_id)
        pipeline.commit("r1")
        pipeline.run("r2")
    summary = store.summary(["meta"])["meta"]
    assert summary["delivered"] > 100
    assert summary["quarantined"] > 0  # the contract wrote quarantine entries (with details)
    assert _assert_no_pii(state_engine, needles) > 1000

    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".db", ".db-wal",
                                                                                ".db-shm")]
    assert any(p.suffix == ".html" for p in files)  # the Data Docs were written and are scanned
    pattern = re.compile("|".join(re.escape(n) for n in sorted(needles, key=len, reverse=True)))
    for path in files:
        hit = pattern.search(path.read_text(encoding="utf-8", errors="replace").lower())
        assert hit is None, f"raw identifier {hit.group(0)!r} written to {path}"
    warehouse.dispose()
    state_engine.dispose()


def _dead_rows(store: StateStore) -> dict[str, int]:
    """Dead rows per state table, as Postgres' statistics count them (fresh snapshot)."""
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return {row.relname: row.n_dead_tup for row in conn.execute(text(
            "SELECT relname, n_dead_tup FROM pg_stat_user_tables "
            "WHERE relname IN ('ls_ledger', 'ls_outbox', 'ls_outbox_payload')"))}


def test_vacuum_reclaims_delivered_rows_when_autovacuum_does_not(url: str,
                                                                  store: StateStore) -> None:
    """Delivering rewrites each event's ledger row and deletes its batch's payload: with
    autovacuum off (here for the tables, so that the test does not depend on the server's
    setting) the state store VACUUMs them once their dead rows pass autovacuum's threshold,
    and not before; SQLite, which reuses freed pages itself, is left alone."""
    if not url.startswith("postgresql"):
        start(store, "r1", cur(1))
        stage(store, "r1", "b1", ["e1"], prev=cur(0))
        assert store.vacuum_dead() == []
        return
    with store.engine.begin() as conn:
        for table in ("ls_ledger", "ls_outbox", "ls_outbox_payload"):
            conn.exec_driver_sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    start(store, "r1", cur(1))
    ids = [f"e{i}" for i in range(300)]
    stage(store, "r1", "b1", ids, prev=cur(0))
    batch = store.load_batch("b1")
    assert batch is not None
    store.record_outcomes(batch, {i: EventOutcome(DELIVERED) for i in ids}, "r1")
    store.engine.dispose()  # the backends exit, and report what they did to the statistics
    deadline = time.monotonic() + 10
    while _dead_rows(store).get("ls_ledger", 0) < 300 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _dead_rows(store)["ls_ledger"] >= 300  # 300 rows rewritten, 300 live

    assert "ls_ledger" in store.vacuum_dead()
    assert _dead_rows(store)["ls_ledger"] == 0
    assert payload_of(store, "b1") is None
    assert store.ledger_lookup(DEST, ids)["e7"].status == DELIVERED
    # Below the threshold (50 + 20 % of the live rows): nothing to do.
    assert store.vacuum_dead() == []


def test_a_failed_outcome_names_a_failure_reason() -> None:
    """Dead letters are found by their reasons (the Postgres ledger has no status index): an
    outcome that fails with another reason is refused where it is made."""
    assert EventOutcome(FAILED, "rejected", "bad value").reason == "rejected"
    with pytest.raises(ValueError, match="rate_limited"):
        EventOutcome(FAILED, "rate_limited", "too many")
    assert EventOutcome(DELIVERED, "duplicate").status == DELIVERED  # other statuses: any


def test_an_outcome_reaches_an_event_whose_row_a_later_batch_took_over(store: StateStore,
                                                                        ) -> None:
    """A batch's outcomes are written through its rows (batch_id). An event of the batch whose
    ledger row names another batch (reprocessing staged it again) still gets its outcome,
    once: the others are not counted twice."""
    from sqlalchemy import update

    from leadsync.state import ledger

    start(store, "r1", cur(1))
    ids = [f"e{i:02d}" for i in range(30)]
    stage(store, "r1", "b1", ids, prev=cur(0))
    with store.engine.begin() as conn:
        conn.execute(update(ledger).where(ledger.c.event_id.in_(["e03", "e17"]))
                     .values(batch_id="b9"))
    batch = store.claim_batch(DEST, "r1", "lane 0", TTL)
    assert batch is not None
    store.record_outcomes(batch, {e: EventOutcome(DELIVERED) for e in ids}, "r1",
                          holder="lane 0")
    rows = ledger_by_id(store)
    assert {e: (rows[e]["status"], rows[e]["attempts"]) for e in ids} == {
        e: (DELIVERED, 1) for e in ids}


@pytest.mark.postgres
def test_every_ledger_lookup_has_an_index_on_postgres(pg_empty_url: str) -> None:
    """What the ledger's status and reason indexes served is served by indexes on columns a
    delivery leaves alone (migration 9): every statement that reads or changes ledger rows on
    these paths finds them through an index, never by scanning the ledger (EXPLAIN with
    sequential scans priced out: a query no index can serve still scans)."""
    from sqlalchemy import event, update

    from leadsync.alerts import _dead_letter_reasons
    from leadsync.monitor.status import dead_letters
    from leadsync.reprocess import Reprocessor, ReprocessRequest
    from leadsync.state import ledger

    engine = make_engine(pg_empty_url)
    seen: list[tuple[str, Any]] = []

    def keep(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "ls_ledger" in statement and not statement.lstrip().upper().startswith("INSERT"):
            seen.append((statement, parameters))

    try:
        store = StateStore(engine)
        store.migrate()
        for n in range(4):  # a ledger of several runs and batches
            start(store, f"r{n}", cur(n + 1))
            stage(store, f"r{n}", f"b{n}", [f"e{n}{i:02d}" for i in range(30)], prev=cur(n))
            if n < 3:  # delivered a day ago, with a receipt each
                claimed = store.claim_batch(DEST, f"r{n}", "lane 0", TTL)
                assert claimed is not None
                store.record_outcomes(claimed, {e["event_id"]: EventOutcome(
                    DELIVERED, "receipt", f"req-{n}") for e in claimed.events}, f"r{n}",
                    holder="lane 0")
        with engine.begin() as conn:
            day_ago = utcnow() - timedelta(days=1)
            for table in (ledger, outbox):
                conn.execute(update(table).where(table.c.batch_id != "b3")
                             .values(updated_at=day_ago))
        store.analyze()  # as the pipeline keeps them: statistics current
        event.listen(engine, "before_cursor_execute", keep)
        batch = store.claim_batch(DEST, "r3", "lane 0", TTL)
        assert batch is not None
        outcomes = {f"e3{i:02d}": EventOutcome(DELIVERED, "receipt", "req-3") for i in range(25)}
        outcomes["e325"] = EventOutcome(FAILED, "rejected", "bad value")
        store.record_outcomes(batch, outcomes, "r3", holder="lane 0")
        event.remove(engine, "before_cursor_execute", keep)
        # The first registration reads every receipt (through their own index), once.
        assert store.collect_receipts(DEST, "receipt") == 4
        event.listen(engine, "before_cursor_execute", keep)
        assert store.collect_receipts(DEST, "receipt") == 0  # since the newest known one
        assert store.record_request_status(
            DEST, "req-3", status="FAILED", done=True, next_check_at=utcnow(),
            failed_event_names=["Marketing Qualified Lead"], receipt_reason="receipt") == 25
        assert store.take_back_unsent(DEST, "r3") == 0
        store.discard_held(DEST, "r3")
        assert len(dead_letters(store, DEST)) == 26
        assert _dead_letter_reasons(store, DEST, "r3") == {"rejected": 1, "request_failed": 25}
        reprocessor = Reprocessor.__new__(Reprocessor)
        reprocessor.dest, reprocessor.state = type("D", (), {"name": DEST})(), store
        assert len(reprocessor._failed_keys(ReprocessRequest(mode="failed"))) == 26
        event.remove(engine, "before_cursor_execute", keep)
        kinds = {s.split()[0].upper() for s, _ in seen}
        assert {"SELECT", "UPDATE", "DELETE"} <= kinds, kinds
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("SET enable_seqscan = off")
            for statement, parameters in seen:
                cursor.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
                scans = list(_ledger_scans(cursor.fetchone()[0][0]["Plan"]))
                assert scans, statement
                for index, cond in scans:
                    assert _narrow(index, cond), (statement, index, cond)
            raw.rollback()
        finally:
            raw.close()
    finally:
        engine.dispose()


def _ledger_scans(node: dict[str, Any]) -> Iterator[tuple[str | None, str]]:
    """(index, its condition) of each scan of ls_ledger in an EXPLAIN (FORMAT JSON) plan; a
    scan without an index gives (None, "")."""
    kind = node.get("Node Type", "")
    index = node.get("Index Name")
    if kind == "BitmapAnd":  # the rows all of its indexes give: as narrow as the narrowest
        parts = list(itertools.chain.from_iterable(
            _ledger_scans(child) for child in node.get("Plans", [])))
        narrow = [p for p in parts if _narrow(*p)]
        yield (narrow or parts)[0]
        return
    if (node.get("Relation Name") == "ls_ledger"
            and kind not in ("ModifyTable", "Bitmap Heap Scan")):
        yield (index, node.get("Index Cond", "")) if index else (None, "")
    elif kind == "Bitmap Index Scan" and str(index).startswith(("ix_ls_ledger", "ls_ledger")):
        yield index, node.get("Index Cond", "")
    for child in node.get("Plans", []):
        yield from _ledger_scans(child)


def _narrow(index: str | None, cond: str) -> bool:
    """Whether an index scan of the ledger reads a few rows, not a destination's whole ledger:
    entered by batch, run, event or request id, or the index of dead letters (only those)."""
    if index == "ix_ls_ledger_failed":
        return True
    return index is not None and any(  # equal to a value, or to one of a few
        re.search(rf"\b{column}\)?(::text)? = ", cond)
        for column in ("batch_id", "run_id", "event_id", "detail"))

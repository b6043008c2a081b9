"""Push lanes' batch claims and bulk outcome writes, on SQLite and Postgres."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import Engine, inspect, select, text

from leadsync.state import (
    BATCH_DONE,
    DELIVERED,
    FAILED,
    PENDING,
    SCHEMA_VERSION,
    EventOutcome,
    LeaseBusyError,
    StateStore,
    leases,
)

from .test_state import DEST, engine, ledger_by_id, outbox_row, stage, start, store, url

__all__ = ["engine", "store", "url"]  # fixtures shared with test_state

HOUR = timedelta(hours=1)


def lease_expiry(store: StateStore) -> object:
    with store.engine.connect() as conn:
        return conn.execute(select(leases.c.expires_at)
                            .where(leases.c.destination == DEST)).scalar()


def test_a_claim_checks_the_lease_in_its_own_transaction(store: StateStore) -> None:
    # lease_of: the claim keeps (renews) the run's lease, or claims nothing when another run
    # holds it, as acquire_lease before the claim did.
    stage(store, "r1", "b1", ["e1"], prev=None, seq=1)
    stage(store, "r1", "b2", ["e2"], prev=None, seq=2)
    assert store.acquire_lease(DEST, "r1", timedelta(seconds=5))
    before = lease_expiry(store)
    assert store.claim_batch(DEST, "r1", "lane 0", HOUR, lease_of="r1") is not None
    assert lease_expiry(store) > before  # type: ignore[operator]
    store.release_lease(DEST, "r1")
    assert store.acquire_lease(DEST, "r2", HOUR)
    with pytest.raises(LeaseBusyError, match="lost the lease on 'meta' to r2"):
        store.claim_batch(DEST, "r1", "lane 0", HOUR, lease_of="r1")
    assert store.claimed_batches(DEST) == {"b1": "lane 0"}  # b2 was not claimed
    assert store.lease_holder(DEST) == "r2"
    # An expired lease nobody took is taken back, as acquire_lease does.
    store.release_lease(DEST, "r2")
    assert store.acquire_lease(DEST, "r1", timedelta(milliseconds=1))
    time.sleep(0.01)
    assert store.claim_batch(DEST, "r1", "lane 1", HOUR, lease_of="r1") is not None
    assert store.lease_holder(DEST) == "r1"


def test_claims_take_the_oldest_batch_and_never_one_batch_twice(store: StateStore) -> None:
    stage(store, "r0", "b-old", ["e1"], prev=None, seq=1)
    time.sleep(0.01)
    stage(store, "r1", "b-new", ["e2", "e3"], prev=None, seq=1)

    first = store.claim_batch(DEST, "r1", "lane 0", HOUR)
    second = store.claim_batch(DEST, "r1", "lane 1", HOUR)
    assert first is not None and second is not None
    assert (first.batch_id, second.batch_id) == ("b-old", "b-new")  # leftovers first
    assert [e["event_id"] for e in second.events] == ["e2", "e3"]
    assert store.claim_batch(DEST, "r1", "lane 2", HOUR) is None
    assert store.claim_batch("tiktok", "r1", "lane 2", HOUR) is None
    assert store.claimed_batches(DEST) == {"b-old": "lane 0", "b-new": "lane 1"}


def test_an_expired_claim_is_free_and_a_renewed_one_is_not(store: StateStore) -> None:
    stage(store, "r1", "b1", ["e1"], prev=None, seq=1)
    stage(store, "r1", "b2", ["e2"], prev=None, seq=2)
    short = timedelta(milliseconds=300)
    assert store.claim_batch(DEST, "r1", "dead lane", short) is not None
    assert store.claim_batch(DEST, "r1", "live lane", short) is not None
    for _ in range(3):
        time.sleep(0.15)
        assert store.renew_claims(DEST, "live lane", short) == 1
    # 450 ms: the dead lane's claim expired, the live lane's did not.
    taken = store.claim_batch(DEST, "r1", "next lane", HOUR)
    assert taken is not None and taken.batch_id == "b1"
    assert store.claim_batch(DEST, "r1", "another lane", HOUR) is None


def test_a_released_claim_is_free_at_once(store: StateStore) -> None:
    stage(store, "r1", "b1", ["e1"], prev=None)
    assert store.claim_batch(DEST, "r1", "lane 0", HOUR) is not None
    store.release_claim("b1", "someone else")  # not theirs: nothing happens
    assert store.claim_batch(DEST, "r1", "lane 1", HOUR) is None
    store.release_claim("b1", "lane 0")
    taken = store.claim_batch(DEST, "r1", "lane 1", HOUR)
    assert taken is not None and taken.batch_id == "b1"


def test_a_claim_of_another_run_is_void(store: StateStore) -> None:
    stage(store, "r1", "b1", ["e1"], prev=None)
    assert store.claim_batch(DEST, "r1", "lane of r1", HOUR) is not None
    # r2 holds the destination's lease, so r1 is over: its claims do not count.
    taken = store.claim_batch(DEST, "r2", "lane of r2", HOUR)
    assert taken is not None and taken.batch_id == "b1"


def test_an_answered_batch_with_deferred_events_waits_for_the_next_run(
        store: StateStore) -> None:
    start(store, "r1", None)
    stage(store, "r1", "b1", ["e1", "e2"], prev=None)
    batch = store.claim_batch(DEST, "r1", "lane 0", HOUR)
    assert batch is not None
    store.record_outcomes(batch, {"e1": EventOutcome(DELIVERED),
                                  "e2": EventOutcome(PENDING, "deferred", "later")},
                          "r1", {"delivered": 1}, holder="lane 0", answered=True)
    assert store.claimed_batches(DEST) == {}
    assert store.claim_batch(DEST, "r1", "lane 1", HOUR) is None  # no loop within a run
    again = store.claim_batch(DEST, "r2", "lane 0", HOUR)
    assert again is not None and [e["event_id"] for e in again.events] == ["e2"]


def test_a_batch_left_by_an_error_is_free_for_a_retry_in_the_same_run(
        store: StateStore) -> None:
    stage(store, "r1", "b1", ["e1", "e2"], prev=None)
    batch = store.claim_batch(DEST, "r1", "lane 0", HOUR)
    assert batch is not None
    store.record_outcomes(batch, {"e1": EventOutcome(DELIVERED)}, "r1", holder="lane 0",
                          answered=False)
    again = store.claim_batch(DEST, "r1", "lane 0 retry", HOUR)
    assert again is not None and [e["event_id"] for e in again.events] == ["e2"]


def test_recording_after_losing_the_claim_keeps_the_new_holders_claim(
        store: StateStore) -> None:
    stage(store, "r1", "b1", ["e1", "e2"], prev=None)
    slow = store.claim_batch(DEST, "r1", "slow lane", timedelta(milliseconds=1))
    assert slow is not None
    time.sleep(0.01)
    assert store.claim_batch(DEST, "r1", "next lane", HOUR) is not None
    store.record_outcomes(slow, {"e1": EventOutcome(DELIVERED)}, "r1", holder="slow lane")
    assert store.claimed_batches(DEST) == {"b1": "next lane"}


def test_concurrent_claimers_take_each_batch_once(store: StateStore, url: str) -> None:
    for i in range(60):
        stage(store, "r1", f"b{i:02d}", [f"e{i}"], prev=None, seq=i)
    taken: dict[str, list[str]] = {}
    start_together = threading.Barrier(3)

    def lane(name: str) -> None:
        from leadsync.db import make_engine

        own = StateStore(make_engine(url))  # its own connections, like another worker
        mine = taken.setdefault(name, [])
        start_together.wait()
        while (batch := own.claim_batch(DEST, "r1", name, HOUR)) is not None:
            mine.append(batch.batch_id)
        own.engine.dispose()

    threads = [threading.Thread(target=lane, args=(f"lane {n}",)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    claimed = [b for ids in taken.values() for b in ids]
    assert sorted(claimed) == [f"b{i:02d}" for i in range(60)]  # every batch, once


def test_outcomes_are_written_in_bulk_each_with_its_own_detail(store: StateStore) -> None:
    start(store, "r1", None)
    ids = [f"e{i:04d}" for i in range(2500)]  # more than one statement's worth
    stage(store, "r1", "b1", ids, prev=None)
    batch = store.claim_batch(DEST, "r1", "lane 0", HOUR)
    assert batch is not None
    outcomes = {e: EventOutcome(DELIVERED) if i % 3 else
                EventOutcome(FAILED, "rejected", f"bad value in event {i}")
                for i, e in enumerate(ids)}
    store.record_outcomes(batch, outcomes, "r1", {"delivered": 1666, "failed": 834},
                          holder="lane 0")
    rows = ledger_by_id(store)
    for i, e in enumerate(ids):
        row = rows[e]
        if i % 3:
            assert (row["status"], row["reason"], row["detail"]) == (DELIVERED, None, None)
            assert row["delivered_at"] is not None
        else:
            assert (row["status"], row["reason"], row["detail"]) == (
                FAILED, "rejected", f"bad value in event {i}")
            assert row["delivered_at"] is None
        assert row["attempts"] == 1
    assert outbox_row(store, "b1").status == BATCH_DONE
    assert store.get_run("r1", DEST)["counts"] == {"delivered": 1666, "failed": 834}


def test_outcomes_shared_by_several_events_are_written_to_exactly_those_events(
        store: StateStore) -> None:
    """Events with one outcome are updated together (SQLite: one statement over their ids):
    every id, quoting and non-ASCII included, gets its group's outcome and no other row does."""
    start(store, "r1", None)
    ids = [f"e{i}" for i in range(6)] + ['quo"te\\d', "ünï-çødé ✓", "it's"]
    stage(store, "r1", "b1", ids, prev=None)
    batch = store.claim_batch(DEST, "r1", "lane 0", HOUR)
    assert batch is not None
    rejected = EventOutcome(FAILED, "rejected", "same detail")
    outcomes = {"e0": EventOutcome(DELIVERED), "e1": rejected, "e2": EventOutcome(DELIVERED),
                "e3": rejected, "e4": EventOutcome(FAILED, "rejected", "its own"),
                'quo"te\\d': EventOutcome(DELIVERED), "ünï-çødé ✓": rejected,
                "it's": EventOutcome(DELIVERED)}  # e5: no answer, stays pending
    store.record_outcomes(batch, outcomes, "r1", holder="lane 0")
    rows = ledger_by_id(store)
    for e in ids:
        got = (rows[e]["status"], rows[e]["reason"], rows[e]["detail"], rows[e]["attempts"])
        if e == "e5":
            assert got == (PENDING, None, None, 0)
        else:
            o = outcomes[e]
            assert got == (o.status, o.reason, o.detail, 1), e
            assert (rows[e]["delivered_at"] is not None) == (o.status == DELIVERED)


def test_migration_adds_the_claim_columns_to_an_older_outbox(engine: Engine,
                                                             store: StateStore) -> None:
    # Rewind to version 2: the outbox as it was before push lanes.
    with engine.begin() as conn:
        for column in ("claimed_by", "claim_run", "claimed_until"):
            conn.execute(text(f"ALTER TABLE ls_outbox DROP COLUMN {column}"))
        conn.execute(text("DELETE FROM ls_schema_version WHERE version = 3"))
    again = StateStore(engine)
    assert again.migrate() == SCHEMA_VERSION
    columns = {c["name"] for c in inspect(engine).get_columns("ls_outbox")}
    assert {"claimed_by", "claim_run", "claimed_until"} <= columns
    stage(again, "r1", "b1", ["e1"], prev=None)
    assert again.claim_batch(DEST, "r1", "lane 0", HOUR) is not None


def test_outcomes_of_large_and_small_groups_together(store: StateStore) -> None:
    """Postgres updates a group of events sharing an outcome by one statement over their ids
    (from 20 events on) and the rest row by row, in one batch: each event gets its own
    outcome, ids that need quoting included."""
    start(store, "r1", None)
    odd = ['quo"te\\d', "ünï-çødé ✓", "it's", "a,b", "{brace}", "NULL"]
    ids = [f"e{i:03d}" for i in range(80)] + odd
    stage(store, "r1", "b1", ids, prev=None)
    batch = store.claim_batch(DEST, "r1", "lane 0", HOUR)
    assert batch is not None
    limited = EventOutcome(FAILED, "ack_mismatch", "same detail")
    outcomes: dict[str, EventOutcome] = {}
    for i, e in enumerate(ids):
        if i < 50 or e in odd[:3]:
            outcomes[e] = EventOutcome(DELIVERED)  # a group of 53
        elif i < 75 or e in odd[3:5]:
            outcomes[e] = limited  # a group of 27
        elif e != "NULL":
            outcomes[e] = EventOutcome(FAILED, "rejected", f"own {i}")  # row by row
    store.record_outcomes(batch, outcomes, "r1", holder="lane 0")  # "NULL": no answer
    rows = ledger_by_id(store)
    assert len(rows) == len(ids)
    for e in ids:
        got = (rows[e]["status"], rows[e]["reason"], rows[e]["detail"], rows[e]["attempts"])
        if e == "NULL":
            assert got == (PENDING, None, None, 0)
            continue
        o = outcomes[e]
        assert got == (o.status, o.reason, o.detail, 1), e
        assert (rows[e]["delivered_at"] is not None) == (o.status == DELIVERED)


def test_a_pinned_store_uses_one_connection_and_reconnects_after_losing_it(
        engine: Engine, store: StateStore) -> None:
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    start(store, "r1", None)
    for n in range(4):
        stage(store, "r1", f"b{n}", [f"e{n}"], prev=None, seq=n)
    checkouts: list[int] = []
    event.listen(engine, "checkout", lambda *a: checkouts.append(1))
    with store.pinned() as lane:
        for n in range(2):
            batch = lane.claim_batch(DEST, "r1", "lane 0", HOUR)
            assert batch is not None and batch.batch_id == f"b{n}"
            lane.record_outcomes(batch, {f"e{n}": EventOutcome(DELIVERED)}, "r1",
                                 holder="lane 0")
        assert len(checkouts) == 1
        if engine.dialect.name == "postgresql":
            # The server ends the connection: the next transaction fails, the one after
            # reconnects.
            with lane.engine.connect() as conn:
                pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
            with store.engine.begin() as other:
                other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            with pytest.raises(OperationalError):
                lane.claim_batch(DEST, "r1", "lane 0", HOUR)
        batch = lane.claim_batch(DEST, "r1", "lane 0", HOUR)
        assert batch is not None and batch.batch_id == "b2"
    assert {b: outbox_row(store, b).status for b in ("b0", "b1")} == {"b0": BATCH_DONE,
                                                                     "b1": BATCH_DONE}
    with pytest.raises(AttributeError, match="begin\\(\\) and connect\\(\\) only"):
        lane.engine.dispose()

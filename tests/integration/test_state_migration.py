"""Migration 6 on a database written by the version before it: the outbox payloads move to
ls_outbox_payload, a pending batch keeps its events and is sent once, and the ledger's reason
index becomes partial."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, inspect, select, text

from leadsync import demo_data
from leadsync.config import parse_config
from leadsync.db import make_engine
from leadsync.state import (
    BATCH_DONE,
    DELIVERED,
    SCHEMA_VERSION,
    EventOutcome,
    StateStore,
    outbox,
    outbox_payloads,
)

from .test_faults import World
from .test_push_lanes import lane_config

pytestmark = pytest.mark.integration

MIGRATION = 6  # the one that moved the payloads out of ls_outbox


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_empty_url"))
    return f"sqlite:///{tmp_path / 'st.db'}"


def rewind_to_v5(engine: Engine) -> None:
    """The state store as the version before migration 6 left it: each batch's payload in
    ls_outbox.payload (NULL once done), no ls_outbox_payload, the full reason index."""
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE ls_outbox ADD COLUMN payload TEXT"))
        conn.execute(text("UPDATE ls_outbox SET payload = (SELECT p.payload FROM "
                          "ls_outbox_payload p WHERE p.batch_id = ls_outbox.batch_id)"))
        conn.execute(text("DROP TABLE ls_outbox_payload"))
        if engine.dialect.name == "postgresql":  # migrations 7 and 9: the status index
            for name in ("ix_ls_ledger_batch", "ix_ls_ledger_run", "ix_ls_ledger_failed",
                         "ix_ls_ledger_receipt", "ix_ls_ledger_status"):
                conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
            conn.execute(text("CREATE INDEX ix_ls_ledger_status ON ls_ledger "
                              "(destination, status)"))
            conn.execute(text("ALTER TABLE ls_ledger RESET (fillfactor)"))
        conn.execute(text("DROP INDEX IF EXISTS ix_ls_ledger_reason"))
        conn.execute(text("CREATE INDEX ix_ls_ledger_reason "
                          "ON ls_ledger (destination, reason, updated_at)"))
        conn.execute(text("DELETE FROM ls_schema_version WHERE version >= :v"),
                     {"v": MIGRATION})


def reason_index_sql(engine: Engine) -> str:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            sql = conn.execute(text("SELECT indexdef FROM pg_indexes "
                                    "WHERE indexname = 'ix_ls_ledger_reason'")).scalar()
        else:
            sql = conn.execute(text("SELECT sql FROM sqlite_master "
                                    "WHERE name = 'ix_ls_ledger_reason'")).scalar()
    return str(sql)


def sent_events(sandbox_url: str) -> list[dict[str, Any]]:
    resp = requests.get(f"{sandbox_url}/_sandbox/meta/events", timeout=30)
    resp.raise_for_status()
    return list(resp.json())


def test_an_old_outbox_migrates_and_its_pending_batch_is_sent_once(
        tmp_path: Path, sandbox: Any, state_url: str) -> None:
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=5).raise_for_status()
    world = World(parse_config(lane_config(batch_size=5, lease_ttl="5m")),
                  f"sqlite:///{tmp_path / 'wh.db'}", state_url, sandbox.url)
    demo_data.seed(make_engine(world.warehouse_url), 12, datetime.now(UTC))
    pipeline = world.pipeline()
    pipeline.open_run("old")
    pipeline.check("old")
    batch_ids = pipeline.stage("old")["batch_ids"]
    assert len(batch_ids) >= 3
    store = world.store()
    # The old version delivered the first batch (its payload purged) and left one batch
    # half done (its payload shrunk to the events still pending) before it was upgraded.
    first = store.load_batch(batch_ids[0])
    half = store.load_batch(batch_ids[1])
    assert first is not None and half is not None
    store.record_outcomes(first, {e["event_id"]: EventOutcome(DELIVERED)
                                  for e in first.events}, "old")
    store.record_outcomes(half, {half.events[0]["event_id"]: EventOutcome(DELIVERED)}, "old")
    pending = {b: [e["event_id"] for e in store.load_batch(b).events]  # type: ignore[union-attr]
               for b in batch_ids[1:]}
    assert len(pending[batch_ids[1]]) == len(half.events) - 1
    store.release_lease("meta", "old")  # the old run ended; the new version takes over
    engine = store.engine
    rewind_to_v5(engine)
    with engine.connect() as conn:
        old = dict(conn.execute(text("SELECT batch_id, payload FROM ls_outbox")).all())
    assert old[batch_ids[0]] is None and all(old[b] for b in batch_ids[1:])
    assert "WHERE" not in reason_index_sql(engine).upper()

    upgraded = StateStore(make_engine(state_url))
    assert upgraded.migrate() == SCHEMA_VERSION
    assert "payload" not in {c["name"] for c in inspect(engine).get_columns("ls_outbox")}
    with engine.connect() as conn:
        moved = dict(conn.execute(select(outbox_payloads.c.batch_id,
                                         outbox_payloads.c.payload)).all())
    assert moved == {b: old[b] for b in batch_ids[1:]}  # the same text, done batches left out
    if engine.dialect.name == "postgresql":  # migration 9 replaced it
        assert reason_index_sql(engine) == "None"
        assert {i["name"] for i in inspect(engine).get_indexes("ls_ledger")} == {
            "ix_ls_ledger_batch", "ix_ls_ledger_run", "ix_ls_ledger_failed",
            "ix_ls_ledger_receipt"}
    else:
        assert "reason is not null" in reason_index_sql(engine).lower()
    for b, ids in pending.items():
        again = upgraded.load_batch(b)
        assert again is not None and [e["event_id"] for e in again.events] == ids

    # A new run after the upgrade sends what the old version left pending, once.
    pipeline = world.pipeline()
    pipeline.open_run("new")
    pipeline.check("new")
    pipeline.stage("new")
    pipeline.push_lane("new", 0)
    assert pipeline.commit("new")["status"] == "success"
    sent = [e["event_id"] for e in sent_events(sandbox.url)]
    assert sorted(sent) == sorted(i for ids in pending.values() for i in ids)
    with engine.connect() as conn:
        assert set(conn.execute(select(outbox.c.status)).scalars()) == {BATCH_DONE}
        assert conn.execute(select(outbox_payloads.c.batch_id)).first() is None
    ledger = {r["event_id"]: r["status"] for r in upgraded.ledger_rows("meta")}
    assert all(ledger[i] == DELIVERED for ids in pending.values() for i in ids)

"""The real sync DAG, run with ``dag.test()`` against the sandbox, on SQLite and Postgres."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select, text

from leadsync.state import Cursor

from .conftest import Backend, minutes_ago

pytestmark = pytest.mark.integration


def _state(backend: Backend) -> dict[str, Any]:
    return dict(backend.store().summary(["meta"])["meta"])


def _last_counts(backend: Backend) -> dict[str, int]:
    from leadsync.state import runs

    store = backend.store()
    with store.engine.connect() as conn:
        row = conn.execute(
            select(runs.c.counts).where(runs.c.destination == "meta")
            .order_by(runs.c.started_at.desc()).limit(1)
        ).first()
    return dict(json.loads(row.counts)) if row else {}


def _wm(backend: Backend) -> Cursor | None:
    return backend.store().get_watermark("meta")


def _dag_state(dagrun: Any) -> str:
    return str(getattr(dagrun.state, "value", dagrun.state))


def _push_lanes_run(dagrun: Any) -> list[tuple[int, str]]:
    """The push_lane task instances of a run: (map index, state)."""
    return sorted((ti.map_index, str(getattr(ti.state, "value", ti.state)))
                  for ti in dagrun.get_task_instances() if ti.task_id == "push_lane")


def test_first_run_sends_everything_eligible_then_nothing(backend: Backend) -> None:
    seeded = backend.seed(200)
    assert seeded > 200

    dr = backend.run_dag()
    assert _dag_state(dr) == "success"
    # One lane per batch, at most push_lanes (2): the run's events fit in one batch.
    assert _last_counts(backend)["batches"] == 1
    assert _push_lanes_run(dr) == [(0, "success")]
    state = _state(backend)
    counts = _last_counts(backend)
    unique = backend.sandbox_events(unique=True)

    # G6: what the ledger calls delivered is exactly what the platform holds.
    delivered_ids = {r["event_id"] for r in backend.store().ledger_rows("meta")
                     if r["status"] == "delivered"}
    assert delivered_ids == {e["event_id"] for e in unique}
    assert counts["acknowledged"] == counts["delivered"] == len(unique) == state["delivered"]
    # G1: every row read is accounted for.
    accounted = (counts.get("delivered", 0) + counts.get("skipped", 0)
                 + counts.get("expired", 0) + counts.get("quarantined", 0))
    assert accounted == counts["read"] == seeded
    assert state["pending"] == 0
    assert counts.get("expired.event_too_old", 0) > 0  # the seeded too-old leads
    wm1 = _wm(backend)
    assert wm1 is not None

    # Second run: nothing new is sent; the watermark does not move backward.
    before = backend.sandbox_stats()
    dr = backend.run_dag()
    assert _dag_state(dr) == "success"
    after = backend.sandbox_stats()
    assert after["events_received"] == before["events_received"]
    assert _last_counts(backend).get("staged", 0) == 0
    # Nothing pending: push_lane is mapped over no lane, no task process starts for it, and
    # commit_watermark still runs.
    assert _push_lanes_run(dr) == [(-1, "skipped")]
    wm2 = _wm(backend)
    assert wm2 is not None and wm2.ts >= wm1.ts


def test_changed_stage_sends_exactly_one_event(backend: Backend) -> None:
    backend.seed(120)
    backend.run_dag()
    wm_before = _wm(backend)
    before = {e["event_id"] for e in backend.sandbox_events()}

    # One lead reaches 'won' (a new stage change row, as a CRM would record it).
    wh, _ = backend.engines()
    with wh.begin() as conn:
        row = conn.execute(text(
            "SELECT lead_id FROM crm_lead_stages s WHERE stage = 'qualified' AND opted_out = :f "
            "AND NOT EXISTS (SELECT 1 FROM crm_lead_stages t WHERE t.lead_id = s.lead_id "
            "AND t.stage <> 'lead' AND t.stage <> 'qualified') ORDER BY lead_id LIMIT 1"
        ), {"f": False}).first()
        assert row is not None
        now = minutes_ago(5)
        conn.execute(text(
            "INSERT INTO crm_lead_stages (lead_id, stage, event_time, updated_at, email, "
            "country, opted_out) VALUES (:l, 'sales_accepted', :t, :t, "
            "'Fresh.Lead@Example.com', 'US', :f)"
        ), {"l": row.lead_id, "t": now, "f": False})

    backend.run_dag()
    new = [e for e in backend.sandbox_events() if e["event_id"] not in before]
    assert len(new) == 1
    assert new[0]["event_name"] == "Sales Qualified Lead"
    stats = backend.sandbox_stats()
    assert stats["duplicate_events"] == 0
    wm_after = _wm(backend)
    assert wm_before is not None and wm_after is not None and wm_after.ts >= wm_before.ts


def test_transient_error_is_retried_and_delivered_once(backend: Backend) -> None:
    backend.seed(60)
    backend.fault({"kind": "graph_error", "code": 2, "is_transient": True,
                   "message": "Service temporarily unavailable", "times": 1})
    dr = backend.run_dag()
    assert _dag_state(dr) == "success"
    counts = _last_counts(backend)
    assert counts["retries"] >= 1
    stats = backend.sandbox_stats()
    assert stats["duplicate_events"] == 0
    assert stats["unique_events"] == counts["delivered"] == _state(backend)["delivered"]


def test_fatal_error_keeps_batch_pending_until_fixed(backend: Backend) -> None:
    backend.seed(40)
    backend.fault({"kind": "graph_error", "code": 190, "is_transient": False,
                   "message": "Invalid OAuth access token", "http_status": 400, "times": 10})
    dr = backend.run_dag()
    assert _dag_state(dr) == "failed"
    state = _state(backend)
    assert state["pending"] > 0 and state["delivered"] == 0
    assert _wm(backend) is None  # nothing terminal past the first pending event

    requests_cleared = backend.sandbox_stats()
    assert requests_cleared["unique_events"] == 0
    import requests as http

    http.post(f"{backend.sandbox_url}/_sandbox/reset", timeout=5)
    dr = backend.run_dag()
    assert _dag_state(dr) == "success"
    state = _state(backend)
    assert state["pending"] == 0
    assert state["delivered"] == backend.sandbox_stats()["unique_events"] > 0
    assert _wm(backend) is not None


def test_watermark_never_moves_backward(backend: Backend) -> None:
    backend.seed(50)
    marks = []
    for _ in range(3):
        backend.run_dag()
        wm = _wm(backend)
        assert wm is not None
        marks.append(wm.ts)
        # A late-committed row older than the watermark (inside the lookback) is still sent,
        # and does not pull the watermark back.
        wh, _ = backend.engines()
        with wh.begin() as conn:
            late = wm.ts - timedelta(minutes=30)
            conn.execute(text(
                "INSERT INTO crm_lead_stages (lead_id, stage, event_time, updated_at, email, "
                "country, opted_out) VALUES (:l, 'lead', :t, :t, 'late@example.org', 'GB', :f)"
            ), {"l": f"LATE{len(marks)}", "t": late, "f": False})
    assert marks == sorted(marks)
    backend.run_dag()
    names = {r["lead_id"] for r in backend.store().ledger_rows("meta")
             if r["status"] == "delivered"}
    assert {"LATE1", "LATE2", "LATE3"} <= names


def _seeded_pii(backend: Backend) -> set[str]:
    wh, _ = backend.engines()
    values: set[str] = set()
    with wh.connect() as conn:
        for email, phone in conn.execute(text("SELECT email, phone FROM crm_lead_stages")):
            for raw in (email, phone):
                if raw and len(raw.strip()) >= 6:
                    values.add(raw.strip())
                    values.add(raw.strip().lower())
            if email and "@" in email:
                values.add(email.strip().lower())
    return values


def test_no_raw_pii_in_logs_xcom_or_state(backend: Backend, home: Path,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    backend.seed(80)
    backend.run_dag()
    pii = _seeded_pii(backend)
    assert len(pii) > 50

    haystacks: dict[str, str] = {}
    out, err = capfd.readouterr()
    haystacks["captured stdout/stderr"] = out + err
    for path in (home / "airflow").rglob("*.log"):
        haystacks[str(path)] = path.read_text(errors="replace")

    # XCom values in Airflow's metadata DB.
    from sqlalchemy import create_engine

    meta_db = create_engine(f"sqlite:///{home / 'airflow' / 'airflow.db'}")
    with meta_db.connect() as conn:
        haystacks["xcom"] = "\n".join(str(v) for (v,) in conn.execute(text(
            "SELECT value FROM xcom")))

    # Every text column of every leadsync state table.
    _, state_engine = backend.engines()
    insp = inspect(state_engine)
    with state_engine.connect() as conn:
        for table in insp.get_table_names():
            if not table.startswith("ls_"):
                continue
            rows = conn.execute(text(f"SELECT * FROM {table}")).fetchall()
            haystacks[table] = "\n".join(str(tuple(r)) for r in rows)

    leaks = [(where, value) for where, text_ in haystacks.items() for value in pii
             if value in text_]
    assert not leaks, f"raw PII found in: {sorted({w for w, _ in leaks})}"


def test_batches_respect_the_size_limit_and_outbox_is_purged(backend: Backend) -> None:
    backend.seed(700)  # > 1,000 eligible events
    backend.run_dag()
    counts = _last_counts(backend)
    assert counts["batches"] >= 2
    assert counts["requests"] == counts["batches"]
    from leadsync.state import outbox, outbox_payloads

    store = backend.store()
    with store.engine.connect() as conn:
        sizes = list(conn.execute(select(outbox.c.n_events)).scalars())
        payloads = conn.execute(select(outbox_payloads.c.batch_id)).fetchall()
    assert len(sizes) == counts["batches"]
    assert payloads == []  # purged after delivery
    assert all(n <= 1000 for n in sizes)


def test_delivered_event_is_not_resent_when_its_row_changes(backend: Backend) -> None:
    backend.seed(30)
    backend.run_dag()
    store = backend.store()
    delivered = next(r for r in store.ledger_rows("meta") if r["status"] == "delivered")
    wh, _ = backend.engines()
    with wh.begin() as conn:
        conn.execute(text(
            "UPDATE crm_lead_stages SET updated_at = :t, city = 'Elsewhere' "
            "WHERE lead_id = :l AND stage = :s"
        ), {"t": minutes_ago(4), "l": delivered["lead_id"], "s": delivered["stage"]})
    before = backend.sandbox_stats()["events_received"]
    backend.run_dag()
    assert backend.sandbox_stats()["events_received"] == before  # G2
    assert _last_counts(backend).get("already_delivered", 0) >= 1


def test_stale_window_rows_are_not_read_before_settle_lag(backend: Backend) -> None:
    backend.seed(20)
    wh, _ = backend.engines()
    with wh.begin() as conn:
        conn.execute(text(
            "INSERT INTO crm_lead_stages (lead_id, stage, event_time, updated_at, email, "
            "country, opted_out) VALUES ('FRESH1', 'lead', :t, :t, 'fresh@example.org', 'US', :f)"
        ), {"t": datetime.now(UTC) - timedelta(seconds=10), "f": False})
    backend.run_dag()
    ids = {r["lead_id"] for r in backend.store().ledger_rows("meta")}
    assert "FRESH1" not in ids  # still settling (settle_lag 2m)

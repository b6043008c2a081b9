"""The reprocess DAG, run with ``dag.test(run_conf=...)`` like the trigger form would."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from leadsync.state import FAILED, ledger, runs

from .conftest import Backend

pytestmark = pytest.mark.integration


def _reports(backend: Backend) -> list[dict[str, Any]]:
    store = backend.store()
    with store.engine.connect() as conn:
        rows = conn.execute(select(runs.c.run_id, runs.c.counts, runs.c.status)
                            .where(runs.c.run_id.like("%reprocess%"))).fetchall()
    return [{"run_id": r.run_id, "status": r.status, "counts": json.loads(r.counts)}
            for r in rows]


def _state(dr: Any) -> str:
    return str(getattr(dr.state, "value", dr.state))


def test_dry_run_counts_and_sends_nothing(backend: Backend) -> None:
    backend.seed(60)
    backend.run_dag()
    before = backend.sandbox_stats()["events_received"]
    wm = backend.store().get_watermark("meta")
    dr = backend.run_dag("leadsync_reprocess", conf={"destinations": ["meta"],
                                                      "mode": "dry_run"})
    assert _state(dr) == "success"
    assert backend.sandbox_stats()["events_received"] == before
    assert backend.store().get_watermark("meta") == wm


def test_window_resends_with_same_ids_and_keeps_watermark(backend: Backend) -> None:
    backend.seed(60)
    backend.run_dag()
    wm = backend.store().get_watermark("meta")
    unique_before = backend.sandbox_stats()["unique_events"]
    start = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    dr = backend.run_dag("leadsync_reprocess", conf={
        "destinations": ["meta"], "mode": "window", "window_start": start})
    assert _state(dr) == "success"
    stats = backend.sandbox_stats()
    assert stats["duplicate_events"] > 0  # resent with the same ids ...
    assert stats["unique_events"] == unique_before  # ... so nothing counts twice
    assert backend.store().get_watermark("meta") == wm  # never moves the watermark
    (report,) = _reports(backend)
    assert report["counts"]["previously_delivered"] == stats["duplicate_events"]


def test_failed_mode_replays_dead_letters(backend: Backend) -> None:
    backend.seed(40)
    backend.run_dag()
    store = backend.store()
    delivered = [r for r in store.ledger_rows("meta") if r["status"] == "delivered"][:3]
    # Three events as if the platform had rejected them (dead letters) and never stored them.
    with store.engine.begin() as conn:
        conn.execute(update(ledger).where(
            ledger.c.event_id.in_([r["event_id"] for r in delivered])
        ).values(status=FAILED, reason="rejected", delivered_at=None))
    import requests

    requests.post(f"{backend.sandbox_url}/_sandbox/reset", timeout=5)
    dr = backend.run_dag("leadsync_reprocess", conf={"destinations": ["meta"],
                                                      "mode": "failed"})
    assert _state(dr) == "success"
    got = {e["event_id"] for e in backend.sandbox_events()}
    assert got == {r["event_id"] for r in delivered}
    statuses = {r["event_id"]: r["status"] for r in store.ledger_rows("meta")}
    assert all(statuses[r["event_id"]] == "delivered" for r in delivered)


def test_invalid_form_fails_with_a_clear_message(backend: Backend) -> None:
    dr = backend.run_dag("leadsync_reprocess", conf={"destinations": ["meta"],
                                                      "mode": "window"})
    assert _state(dr) == "failed"

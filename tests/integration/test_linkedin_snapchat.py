"""LinkedIn and Snapchat end to end: the real DAGs with ``dag.test()`` against their sandbox
emulators, on SQLite and Postgres (destinations of the default include/leadsync.yaml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from .conftest import Backend

pytestmark = pytest.mark.integration

# destination name → DAG (the sandbox platform has the destination's name)
DAGS = {"linkedin": "leadsync_linkedin", "snapchat": "leadsync_snapchat"}


@pytest.fixture(scope="session")
def platform_pools(airflow_db: None) -> None:
    """The Airflow pools of the two destinations (each shares its platform's rate limit)."""
    airflow = Path(sys.executable).with_name("airflow")
    for name in DAGS.values():
        subprocess.run([str(airflow), "pools", "set", name, "4", "test"], check=True,
                       capture_output=True, env=dict(os.environ))


@pytest.fixture
def platform_backend(backend: Backend, platform_pools: None) -> Backend:
    """The backend with connections pointing both destinations at the sandbox (the same
    fields ``leadsync demo`` uses)."""
    from leadsync.cli import sandbox_connection
    from leadsync.config import get_config

    for dest in get_config().destinations:
        if dest.name in DAGS:
            backend.monkeypatch.setenv(f"AIRFLOW_CONN_{dest.conn_id.upper()}",
                                       json.dumps(sandbox_connection(dest, backend.sandbox_url)))
    return backend


def _dag_state(dagrun: Any) -> str:
    return str(getattr(dagrun.state, "value", dagrun.state))


def _events(backend: Backend, platform: str) -> list[dict[str, Any]]:
    resp = requests.get(f"{backend.sandbox_url}/_sandbox/{platform}/events",
                        params={"unique": "true"}, timeout=30)
    resp.raise_for_status()
    return list(resp.json())


def _stats(backend: Backend, platform: str) -> dict[str, int]:
    return dict(requests.get(f"{backend.sandbox_url}/_sandbox/stats", timeout=5)
                .json()[platform])


def _last_counts(backend: Backend, destination: str) -> dict[str, int]:
    from leadsync.state import runs

    with backend.store().engine.connect() as conn:
        row = conn.execute(
            select(runs.c.counts).where(runs.c.destination == destination)
            .order_by(runs.c.started_at.desc()).limit(1)
        ).first()
    return dict(json.loads(row.counts)) if row else {}


def _ledger(backend: Backend, destination: str) -> list[dict[str, Any]]:
    return list(backend.store().ledger_rows(destination))


@pytest.mark.parametrize("destination", list(DAGS))
def test_every_eligible_event_lands_once_then_nothing(platform_backend: Backend,
                                                      destination: str) -> None:
    backend = platform_backend
    seeded = backend.seed(150)

    assert _dag_state(backend.run_dag(DAGS[destination])) == "success"
    counts = _last_counts(backend, destination)
    ledger = _ledger(backend, destination)
    delivered = {r["event_id"] for r in ledger if r["status"] == "delivered"}
    landed = _events(backend, destination)
    # G6: the ledger's delivered events are exactly what the platform holds, each once.
    assert {e["event_id"] for e in landed} == delivered
    assert len(landed) == len(delivered) > 0
    assert counts["acknowledged"] == counts["delivered"] == len(delivered)
    # G1: every row read is accounted for.
    accounted = (counts.get("delivered", 0) + counts.get("skipped", 0)
                 + counts.get("expired", 0) + counts.get("quarantined", 0))
    assert accounted == counts["read"] == seeded
    assert not [r for r in ledger if r["status"] == "pending"]
    if destination == "linkedin":
        # Every stage went to its own conversion rule; the time is in milliseconds.
        assert {e["destination"] for e in landed} == {"20000001", "20000002", "20000003",
                                                      "20000004"}
        assert all(e["event"]["conversionHappenedAt"] > 10**12 for e in landed)
    else:
        assert {e["event_name"] for e in landed} == {"SIGN_UP", "CUSTOM_EVENT_1",
                                                     "CUSTOM_EVENT_2", "PURCHASE"}
        assert all(e["event"]["action_source"] == "OFFLINE" for e in landed)

    # Second run: nothing is sent again.
    before = _stats(backend, destination)
    assert _dag_state(backend.run_dag(DAGS[destination])) == "success"
    after = _stats(backend, destination)
    assert (after["events_received"], after["requests"]) == (before["events_received"],
                                                             before["requests"])
    assert _last_counts(backend, destination).get("staged", 0) == 0


@pytest.mark.parametrize("destination", list(DAGS))
def test_mixed_batch_one_event_rejected_the_rest_lands_once(platform_backend: Backend,
                                                             destination: str) -> None:
    backend = platform_backend
    backend.seed(80)
    # The platform rejects the 4th event of the first request: both fail the whole request
    # naming it (LinkedIn: 422 "Index: 3, ..."; Snap: 400 INVALID with "event": 3).
    requests.post(f"{backend.sandbox_url}/_sandbox/faults", timeout=5, json={
        "platform": destination, "faults": [{"kind": "reject_events", "indices": [3]}]},
    ).raise_for_status()

    assert _dag_state(backend.run_dag(DAGS[destination])) == "success"
    ledger = _ledger(backend, destination)
    failed = [r for r in ledger if r["status"] == "failed"]
    assert len(failed) == 1
    assert "rejected by the sandbox" in (failed[0]["detail"] or "")
    delivered = {r["event_id"] for r in ledger if r["status"] == "delivered"}
    assert {e["event_id"] for e in _events(backend, destination)} == delivered
    assert failed[0]["event_id"] not in delivered
    stats = _stats(backend, destination)
    assert stats["duplicate_events"] == 0 and stats["unique_events"] == len(delivered)
    assert (stats["requests"], stats["rejected_requests"]) == (2, 1)  # fast fail, resend
    counts = _last_counts(backend, destination)
    assert counts["failed"] == 1 and counts["delivered"] == len(delivered)

    # The failed event stays a dead letter: the next run sends nothing.
    assert _dag_state(backend.run_dag(DAGS[destination])) == "success"
    assert _stats(backend, destination)["events_received"] == stats["events_received"]

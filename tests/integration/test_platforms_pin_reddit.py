"""Pinterest and Reddit end to end: the real DAGs with ``dag.test()`` against their sandbox
emulators, on SQLite and Postgres."""

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

# destination name → (DAG, sandbox platform, connection fields)
PLATFORMS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "pinterest": ("leadsync_pinterest", "pinterest",
                  {"password": "sandbox-pinterest-token",
                   "extra": {"ad_account_id": "549755885175"}}),
    "reddit": ("leadsync_reddit", "reddit",
               {"password": "sandbox-reddit-token", "extra": {"pixel_id": "t2_sandbox01"}}),
}


@pytest.fixture(scope="session")
def pools(airflow_db: None) -> None:
    airflow = Path(sys.executable).with_name("airflow")
    for name in PLATFORMS:
        subprocess.run([str(airflow), "pools", "set", f"leadsync_{name}", "4", "test"],
                       check=True, capture_output=True, env=dict(os.environ))


@pytest.fixture
def platform_backend(backend: Backend, pools: None) -> Backend:
    for name, (_dag, _platform, fields) in PLATFORMS.items():
        backend.monkeypatch.setenv(f"AIRFLOW_CONN_LEADSYNC_{name.upper()}", json.dumps(
            {"conn_type": "http", "host": backend.sandbox_url, **fields}))
    return backend


def _dag_state(dagrun: Any) -> str:
    return str(getattr(dagrun.state, "value", dagrun.state))


def _platform_events(backend: Backend, platform: str) -> list[dict[str, Any]]:
    resp = requests.get(f"{backend.sandbox_url}/_sandbox/{platform}/events",
                        params={"unique": "true"}, timeout=30)
    resp.raise_for_status()
    return list(resp.json())


def _platform_stats(backend: Backend, platform: str) -> dict[str, int]:
    stats = requests.get(f"{backend.sandbox_url}/_sandbox/stats", timeout=5).json()
    return dict(stats[platform])


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


@pytest.mark.parametrize("destination", list(PLATFORMS))
def test_one_rejected_event_the_rest_lands_once_then_nothing(platform_backend: Backend,
                                                             destination: str) -> None:
    backend = platform_backend
    dag_id, platform, _ = PLATFORMS[destination]
    seeded = backend.seed(150)
    # The platform rejects the 4th event of the first request, each in its own way:
    # Pinterest processes the others and reports that one as failed (HTTP 422), Reddit fails
    # the whole request naming it (HTTP 400) and the sender resends the rest.
    requests.post(f"{backend.sandbox_url}/_sandbox/faults",
                  json={"platform": platform,
                        "faults": [{"kind": "reject_events", "indices": [3]}]},
                  timeout=5).raise_for_status()

    assert _dag_state(backend.run_dag(dag_id)) == "success"
    counts = _last_counts(backend, destination)
    ledger = _ledger(backend, destination)
    failed = [r for r in ledger if r["status"] == "failed"]
    assert len(failed) == 1
    assert "rejected by the sandbox" in (failed[0]["detail"] or "")
    delivered = {r["event_id"] for r in ledger if r["status"] == "delivered"}
    landed = _platform_events(backend, platform)
    # G6: the ledger's delivered events are exactly what the platform holds, each once.
    assert {e["event_id"] for e in landed} == delivered
    assert len(landed) == len(delivered) > 0
    assert failed[0]["event_id"] not in delivered
    stats = _platform_stats(backend, platform)
    assert stats["duplicate_events"] == 0
    if platform == "pinterest":
        assert (stats["requests"], stats["rejected_requests"]) == (1, 0)  # per-event status
    else:
        assert (stats["requests"], stats["rejected_requests"]) == (2, 1)  # fail, resend
    assert counts["acknowledged"] == counts["delivered"] == len(delivered)
    assert counts["failed"] == 1
    # G1: every row read is accounted for.
    accounted = (counts.get("delivered", 0) + counts.get("failed", 0)
                 + counts.get("skipped", 0) + counts.get("expired", 0)
                 + counts.get("quarantined", 0))
    assert accounted == counts["read"] == seeded
    assert not [r for r in ledger if r["status"] == "pending"]
    # What landed is hashed: no raw email anywhere in the stored payloads.
    assert "@" not in json.dumps([e["event"] for e in landed])

    # Second run: nothing is sent again (Pinterest would count an offline resend twice), and
    # the failed event stays a dead letter.
    assert _dag_state(backend.run_dag(dag_id)) == "success"
    after = _platform_stats(backend, platform)
    assert after["events_received"] == stats["events_received"]
    assert after["requests"] == stats["requests"]
    assert _last_counts(backend, destination).get("staged", 0) == 0

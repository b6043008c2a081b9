"""TikTok, Google Data Manager and Google Ads API end to end: the real DAGs with
``dag.test()`` against their sandbox emulators, on SQLite and Postgres."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from sqlalchemy import select

from leadsync.config import DEFAULT_CONFIG_PATH

from .conftest import Backend

pytestmark = pytest.mark.integration

# destination name → (DAG, sandbox platform)
PLATFORMS = {
    "tiktok": ("leadsync_tiktok", "tiktok"),
    "google": ("leadsync_google", "google_datamanager"),
    "google_ads": ("leadsync_google_ads", "google_ads"),
}
GOOGLE_ADS_DESTINATION = {
    "name": "google_ads", "type": "google_ads", "schedule": "@hourly",
    "customer_id": "1234567890",
    "stages": {"lead": "1000000001", "qualified": "1000000002",
               "sales_accepted": "1000000003", "won": "1000000004"},
}


@pytest.fixture(autouse=True)
def config_with_google_ads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default config plus a Google Ads API destination (for allowlisted accounts)."""
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["destinations"].append(GOOGLE_ADS_DESTINATION)
    path = tmp_path / "leadsync.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("LEADSYNC_CONFIG", str(path))


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


def _fault(backend: Backend, platform: str, *faults: dict[str, Any]) -> None:
    requests.post(f"{backend.sandbox_url}/_sandbox/faults",
                  json={"platform": platform, "faults": list(faults)}, timeout=5
                  ).raise_for_status()


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
def test_every_eligible_event_lands_once_then_nothing(backend: Backend,
                                                      destination: str) -> None:
    dag_id, platform = PLATFORMS[destination]
    seeded = backend.seed(150)

    assert _dag_state(backend.run_dag(dag_id)) == "success"
    counts = _last_counts(backend, destination)
    ledger = _ledger(backend, destination)
    delivered = {r["event_id"] for r in ledger if r["status"] == "delivered"}
    landed = _platform_events(backend, platform)
    # G6: the ledger's delivered events are exactly what the platform holds, each once.
    assert delivered == {e["event_id"] for e in landed}
    assert len(landed) == len(delivered) > 0
    assert counts["acknowledged"] == counts["delivered"] == len(delivered)
    # G1: every row read is accounted for.
    accounted = (counts.get("delivered", 0) + counts.get("skipped", 0)
                 + counts.get("expired", 0) + counts.get("quarantined", 0))
    assert accounted == counts["read"] == seeded
    assert not [r for r in ledger if r["status"] == "pending"]
    if platform != "tiktok":
        assert counts.get("skipped.consent_denied", 0) > 0  # ad_user_data = false rows

    # Second run: nothing is sent again.
    before = _platform_stats(backend, platform)
    assert _dag_state(backend.run_dag(dag_id)) == "success"
    after = _platform_stats(backend, platform)
    assert after["events_received"] == before["events_received"]
    assert after["requests"] == before["requests"]
    assert _last_counts(backend, destination).get("staged", 0) == 0

    if platform == "google_datamanager":
        # The later run looked up the first run's requests (requestStatus:retrieve).
        requests_ = backend.store().request_rows(destination)
        assert requests_ and all(r["status"] == "SUCCESS" and r["done"] for r in requests_)
        assert sum(r["n_events"] for r in requests_) == len(delivered)
        ingested = sum(c.get("ingested", 0) for r in requests_ for c in r["counts"].values())
        assert ingested == len(delivered)
        second = _last_counts(backend, destination)
        assert second["request_status.SUCCESS"] == len(requests_)
        assert second["request_records.ingested"] == len(delivered)


@pytest.mark.parametrize("destination", list(PLATFORMS))
def test_mixed_batch_one_event_rejected_the_rest_lands_once(backend: Backend,
                                                             destination: str) -> None:
    dag_id, platform = PLATFORMS[destination]
    backend.seed(80)
    # The platform rejects the 4th event of the first request, each in its own way: TikTok
    # and Data Manager fail the whole request naming it, Google Ads fails that row only.
    _fault(backend, platform, {"kind": "reject_events", "indices": [3]})

    assert _dag_state(backend.run_dag(dag_id)) == "success"
    ledger = _ledger(backend, destination)
    failed = [r for r in ledger if r["status"] == "failed"]
    assert len(failed) == 1
    assert "rejected by the sandbox" in (failed[0]["detail"] or "")
    delivered = {r["event_id"] for r in ledger if r["status"] == "delivered"}
    landed = _platform_events(backend, platform)
    assert {e["event_id"] for e in landed} == delivered
    assert failed[0]["event_id"] not in delivered
    stats = _platform_stats(backend, platform)
    assert stats["duplicate_events"] == 0
    assert stats["unique_events"] == len(delivered)
    if platform == "google_ads":
        assert (stats["requests"], stats["rejected_requests"]) == (1, 0)  # partial failure
    else:
        assert (stats["requests"], stats["rejected_requests"]) == (2, 1)  # fast fail, resend
    counts = _last_counts(backend, destination)
    assert counts["failed"] == 1 and counts["delivered"] == len(delivered)

    # The failed event stays a dead letter: the next run sends nothing.
    assert _dag_state(backend.run_dag(dag_id)) == "success"
    assert _platform_stats(backend, platform)["events_received"] == stats["events_received"]

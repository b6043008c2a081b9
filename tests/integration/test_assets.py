"""Each green sync run emits an Asset event ``leadsync://<destination>`` with its counts, and
alerts go out from the real DAG once per change of state (to a loopback webhook)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from .conftest import Backend, make_backend

pytestmark = pytest.mark.integration


@pytest.fixture
def sqlite_backend(tmp_path: Path, request: pytest.FixtureRequest,
                   monkeypatch: pytest.MonkeyPatch, sandbox: Any, airflow_db: None) -> Backend:
    # The Asset wiring does not depend on the state backend: SQLite only.
    return make_backend("sqlite", tmp_path, request, monkeypatch, sandbox)


def _asset_events(name: str) -> list[dict[str, Any]]:
    """The Asset events of ``name`` in Airflow's metadata DB, oldest first (Airflow's ORM)."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent.extra, AssetEvent.source_dag_id, AssetEvent.source_task_id,
                   AssetEvent.source_run_id)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.name == name)
            .order_by(AssetEvent.id)
        ).all()
    return [dict(r._mapping) for r in rows]


def test_each_run_emits_an_asset_event_and_alerts_once(sqlite_backend: Backend,
                                                       tmp_path: Path) -> None:
    from leadsync.config import DEFAULT_CONFIG_PATH
    from tests.unit.test_alerts import Receiver

    backend = sqlite_backend
    receiver = Receiver()
    config = tmp_path / "leadsync.yaml"
    # The seeded rows are minutes old: a 1-minute maximum lag is breached on every run.
    config.write_text(DEFAULT_CONFIG_PATH.read_text() + (
        f"\nalerts:\n  notifiers:\n    - type: webhook\n      url: {receiver.url}\n"
        "  max_watermark_lag: 1m\n"))
    backend.monkeypatch.setenv("LEADSYNC_CONFIG", str(config))
    backend.seed(120)
    before = len(_asset_events("leadsync://meta"))

    first = backend.run_dag()
    second = backend.run_dag()  # nothing new: an event all the same, with zero deliveries

    events = _asset_events("leadsync://meta")[before:]
    assert [e["source_run_id"] for e in events] == [first.run_id, second.run_id]
    assert {(e["source_dag_id"], e["source_task_id"]) for e in events} == {
        ("leadsync_meta", "commit_watermark")}
    store = backend.store()
    run = store.get_run(first.run_id, "meta")
    assert run is not None
    extra = events[0]["extra"]
    assert extra["delivered"] == run["counts"]["delivered"] > 0
    for key in ("failed", "expired", "skipped", "quarantined"):
        assert extra[key] == run["counts"].get(key, 0)
    watermark = store.get_watermark("meta")
    assert watermark is not None
    assert extra["watermark"] == watermark.ts.isoformat()
    assert extra["run_status"] == "success"
    assert events[1]["extra"]["delivered"] == 0
    assert events[1]["extra"]["watermark"] == extra["watermark"]
    # Counts and a time only: no lead id, stage or identifier in the event.
    assert set(extra) == {"delivered", "failed", "expired", "skipped", "quarantined",
                          "watermark", "run_status"}
    assert str(watermark.lead_id) not in json.dumps(extra)

    # One alert for the lag, from the first run only: the second finds it still firing.
    receiver.close()
    assert [(m["kind"], m["status"], m["run_id"]) for m in receiver.received] == [
        ("watermark_lag", "firing", first.run_id)]
    assert store.alert_state("meta") == {"watermark_lag": "firing"}

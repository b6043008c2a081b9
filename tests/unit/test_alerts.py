"""Alerts fire once when a condition starts and once when it ends, through a real webhook
notifier posting to a loopback receiver, over real runs against the sandbox."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from leadsync import alerts, demo_data
from leadsync.config import AlertsConfig, NotifierConfig
from leadsync.db import make_engine
from leadsync.sandbox.server import SandboxServer
from leadsync.state import StateStore

from .test_pipeline import World, make_config
from .test_pipeline import sandbox as sandbox  # the module-scoped sandbox fixture, reused


class Receiver:
    """A loopback HTTP server that keeps every JSON body POSTed to it."""

    def __init__(self, fail: bool = False) -> None:
        received: list[dict[str, Any]] = []
        self.received = received
        self.fail = fail
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.fail:
                    self.send_response(503)
                else:
                    received.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def world(sandbox: SandboxServer, tmp_path: Path, receiver: Receiver) -> Iterator[World]:
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=10).raise_for_status()
    warehouse = make_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    store = StateStore(make_engine(f"sqlite:///{tmp_path / 'state.db'}"))
    demo_data.seed(warehouse, 60, datetime.now(UTC))
    cfg = AlertsConfig(notifiers=[NotifierConfig(type="webhook", url=receiver.url)],
                       ui_base_url="http://airflow.example:8080", max_dead_letters=0,
                       max_quarantine_share=0.5)
    config = make_config().model_copy(update={"alerts": cfg})
    yield World(sandbox, warehouse, store, config)
    warehouse.dispose()


def _run(world: World, run_id: str) -> list[alerts.Alert]:
    world.pipeline().run(run_id)
    return alerts.check_run(world.config, world.store, "meta", run_id)


def test_a_failed_run_alerts_once_then_recovers_once(world: World,
                                                     receiver: Receiver) -> None:
    world.fault(kind="http", status=503, times=1000)  # Meta is down: batches stay pending
    assert [(a.kind, a.status) for a in _run(world, "run-1")] == [("failed_run", "firing")]
    world.add(5)
    assert _run(world, "run-2") == []  # still failing: no second alert
    requests.post(f"{world.sandbox.url}/_sandbox/reset", timeout=10).raise_for_status()
    world.add(5)
    assert [(a.kind, a.status) for a in _run(world, "run-3")] == [("failed_run", "ok")]
    world.add(5)
    assert _run(world, "run-4") == []  # healthy and known to be: nothing

    assert [(m["kind"], m["status"], m["run_id"]) for m in receiver.received] == [
        ("failed_run", "firing", "run-1"), ("failed_run", "ok", "run-3")]
    first = receiver.received[0]
    assert "pending" in first["text"] and first["title"].startswith("[leadsync] ALERT meta")
    assert first["links"]["run"] == "http://airflow.example:8080/dags/leadsync_meta/runs/run-1"
    assert world.store.alert_state("meta") == {"failed_run": "ok"}


def test_dead_letters_alert_with_the_platform_code_and_no_identifiers(
        world: World, receiver: Receiver) -> None:
    poison = sorted(world.eligible(datetime.now(UTC)))[0]
    world.fault(kind="reject_events", event_ids=[poison], reason="poison event", times=40)
    sent = _run(world, "run-1")
    assert ("dead_letters", "firing") in [(a.kind, a.status) for a in sent]
    message = next(m for m in receiver.received if m["kind"] == "dead_letters")
    assert "event(s) rejected by the platform" in message["text"]
    assert "dead-letters?destination=meta&run=run-1" in message["links"]["dead_letters"]
    # No identifier of any lead of the run appears in what was posted.
    posted = json.dumps(receiver.received)
    for row in world.rows():
        for column in ("email", "phone", "lead_id", "first_name"):
            if row.get(column) and len(str(row[column])) > 4:
                assert str(row[column]) not in posted


def test_a_notifier_outage_delays_the_alert_instead_of_losing_it(world: World,
                                                                 receiver: Receiver) -> None:
    world.fault(kind="http", status=503, times=1000)
    receiver.fail = True
    assert _run(world, "run-1") == []
    assert world.store.alert_state("meta") == {}
    receiver.fail = False
    world.add(5)
    assert [(a.kind, a.status) for a in _run(world, "run-2")] == [("failed_run", "firing")]


def test_conditions_measure_thresholds() -> None:
    cfg = AlertsConfig(max_quarantine_share=0.1, max_dead_letters=2,
                       max_watermark_lag=timedelta(hours=1))
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    run = {"status": "success", "counts": {"checked": 100, "quarantined": 11,
                                           "quarantined.bad_currency": 11, "failed": 2}}
    found = {c.kind: c for c in alerts.conditions(cfg, run, 0, {"2804008": 2},
                                                  now - timedelta(minutes=61), now)}
    assert {k: c.breached for k, c in found.items()} == {
        "failed_run": False, "quarantine_share": True, "dead_letters": False,
        "watermark_lag": True}
    assert "bad_currency=11" in found["quarantine_share"].text
    assert "2804008=2" in found["dead_letters"].text
    feedback = AlertsConfig(max_platform_error_share=0.02)
    reported = {"ingested": 95, "error.INVALID_FORMAT": 4, "error.DECRYPTION_ERROR": 1,
                "warning.X": 7}
    platform = next(c for c in alerts.conditions(feedback, run, 0, {}, None, now, reported)
                    if c.kind == "platform_errors")
    assert platform.breached and "5 of 100 records" in platform.text
    assert "INVALID_FORMAT=4" in platform.text
    assert not next(c for c in alerts.conditions(
        feedback, run, 0, {}, None, now, {"ingested": 99, "error.INVALID_FORMAT": 1})
        if c.kind == "platform_errors").breached
    # Nothing checked, no watermark yet: those conditions are not measured (state kept).
    quiet = alerts.conditions(cfg, {"status": "success", "counts": {}}, 0, {}, None, now)
    assert {c.kind for c in quiet} == {"failed_run", "dead_letters"}


def test_platform_feedback_from_request_status_alerts(world: World, receiver: Receiver) -> None:
    from sqlalchemy import insert

    from leadsync.state import platform_requests

    world.pipeline().run("run-1")
    now = datetime.now(UTC)
    with world.store.engine.begin() as conn:  # a request a platform processes later
        conn.execute(insert(platform_requests).values(
            destination="meta", request_id="req-1", run_id="run-0", n_events=100,
            sent_at=now - timedelta(hours=1), status="SENT", done=0, checks=0,
            next_check_at=now))
    world.store.record_request_status(
        "meta", "req-1", status="PARTIAL_SUCCESS", done=True, next_check_at=now,
        counts={"1000000001": {"ingested": 90, "error.INVALID_FORMAT": 10}})
    config = world.config.model_copy(update={"alerts": world.config.alerts.model_copy(
        update={"max_platform_error_share": 0.05})})
    sent = alerts.check_run(config, world.store, "meta", "run-1")
    assert [(a.kind, a.status) for a in sent] == [("platform_errors", "firing")]
    assert "10 of 100 records" in receiver.received[-1]["text"]
    assert "INVALID_FORMAT=10" in receiver.received[-1]["text"]

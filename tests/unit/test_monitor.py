"""Monitoring read from the state store: match-key coverage per run, the status numbers, and
the Conversions app's pages (in-process; the real API server is in tests/browser)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from fastapi import Depends, HTTPException, Request
from fastapi.testclient import TestClient

from leadsync import demo_data
from leadsync.db import make_engine
from leadsync.monitor import status
from leadsync.monitor.app import create_app
from leadsync.monitor.coverage import Coverage
from leadsync.sandbox.server import SandboxServer
from leadsync.state import StateStore

from .test_pipeline import World, make_config
from .test_pipeline import sandbox as sandbox  # the module-scoped sandbox fixture, reused

META_NAMES = {"em": "email", "ph": "phone", "fn": "first_name", "ln": "last_name",
              "ct": "city", "st": "state", "zp": "zip", "db": "date_of_birth", "ge": "gender",
              "client_ip_address": "ip", "client_user_agent": "user_agent"}


@pytest.fixture
def world(sandbox: SandboxServer, tmp_path: Path) -> Iterator[World]:
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=10).raise_for_status()
    warehouse = make_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    store = StateStore(make_engine(f"sqlite:///{tmp_path / 'state.db'}"))
    demo_data.seed(warehouse, 150, datetime.now(UTC))
    yield World(sandbox, warehouse, store, make_config())
    warehouse.dispose()


def _received_keys(world: World) -> tuple[int, Counter[str]]:
    events = requests.get(f"{world.sandbox.url}/_sandbox/meta/events", timeout=10).json()
    keys: Counter[str] = Counter()
    for event in events:
        keys.update({META_NAMES.get(k, k) for k in event["event"]["user_data"]})
    return len(events), keys


def test_coverage_per_run_equals_what_the_platform_received(world: World) -> None:
    world.pipeline().run("run-1")
    received, keys = _received_keys(world)
    coverage = world.store.run_coverage("meta")
    assert [c["run_id"] for c in coverage] == ["run-1"]
    assert coverage[0]["events"] == received > 100
    assert coverage[0]["keys"] == dict(keys)
    assert 0 < coverage[0]["shares"]["email"] < 1  # the demo data has leads without email
    assert coverage[0]["shares"]["phone"] == keys["phone"] / received

    world.add(20)
    world.pipeline().run("run-2")
    received_2, keys_2 = _received_keys(world)
    newest = world.store.run_coverage("meta")[0]
    assert newest["run_id"] == "run-2"
    assert newest["events"] == received_2 - received
    assert newest["keys"] == {k: n - keys[k] for k, n in keys_2.items() if n - keys[k]}


def test_coverage_names_identifiers_alike_across_platforms() -> None:
    bodies = {
        "meta": {"user_data": {"em": "h", "ph": "h", "fbc": "c"}},
        "tiktok": {"user": {"email": "h", "phone": "h"}, "lead": {"lead_id": "7"}},
        "google_datamanager": {"userData": {"userIdentifiers": [{"emailAddress": "h"}]},
                               "adIdentifiers": {"gclid": "g", "landingPageDeviceInfo": {}}},
        "google_ads": {"userIdentifiers": [{"hashedPhoneNumber": "h"}], "gclid": "g"},
        "linkedin": {"user": {"userIds": [{"idType": "SHA256_EMAIL", "idValue": "h"}],
                              "userInfo": {"firstName": "x"}}},
        "snapchat": {"user_data": {"ph": "h", "client_ip_address": "ip"}},
        "pinterest": {"user_data": {"em": ["h"], "client_user_agent": "ua"}},
        "reddit": {"user": {"email": "h", "phone_number": "h", "ip_address": "h"},
                   "click_id": "c"},
    }
    found = {}
    for kind, body in bodies.items():
        cov = Coverage(kind)
        cov.add(body)
        found[kind] = set(cov.keys)
    assert found == {"meta": {"email", "phone", "fbc"}, "tiktok": {"email", "phone", "lead_id"},
                     "google_datamanager": {"email", "gclid"},
                     "google_ads": {"phone", "gclid"}, "linkedin": {"email", "user_info"},
                     "snapchat": {"phone", "ip"}, "pinterest": {"email", "user_agent"},
                     "reddit": {"email", "phone", "ip", "click_id"}}


def test_status_and_pages_read_the_state_store(world: World) -> None:
    world.pipeline().run("run-1")
    summary = world.store.summary(["meta"])["meta"]
    result = status.status(world.store, ["meta"])["destinations"]["meta"]
    assert {k: result[k] for k in summary} == summary
    assert result["last_runs"][0]["run_id"] == "run-1"
    assert result["watermark_lag_seconds"] >= 0

    def deny_without_header(request: Request) -> None:
        if request.headers.get("x-test-user") != "ok":
            raise HTTPException(401, "Not authenticated")

    app = create_app(dependencies=[Depends(deny_without_header)],
                     store_factory=lambda: world.store, config_factory=lambda: world.config)
    client = TestClient(app)
    assert client.get("/api/status").status_code == 401
    assert client.get("/data-docs/index.html").status_code == 401
    ok = {"x-test-user": "ok"}
    page = client.get("/", headers=ok)
    assert page.status_code == 200
    assert f'data-key="delivered">{summary["delivered"]}<' in page.text
    assert "Match-key coverage" in page.text
    # Nothing outside the Data Docs directory is served, not even with a user.
    assert client.get("/data-docs/..%2Fstate.db", headers=ok).status_code == 404
    assert client.get("/data-docs/.results/x.json", headers=ok).status_code == 404
    assert client.get("/", params={"destination": "nope"}, headers=ok).status_code == 404


def test_data_docs_pages_are_found_per_destination_and_run(tmp_path: Path) -> None:
    run_id = "scheduled__2026-11-29T14:00:00+00:00"  # the same run id in two DAGs
    for dest in ("meta", "tiktok"):
        page = (tmp_path / "validations" / f"leadsync_{dest}_contract"
                / "scheduled__2026-11-29T14_00_00_00_00" / "20261129T140001Z" / "w.html")
        page.parent.mkdir(parents=True)
        page.write_text("<html></html>")
    found = status.data_docs_pages(tmp_path, "tiktok", [run_id, "other"])
    assert found == {run_id: "validations/leadsync_tiktok_contract/"
                             "scheduled__2026-11-29T14_00_00_00_00/20261129T140001Z/w.html"}
    link = status.data_docs_link(tmp_path, "tiktok", run_id, "https://airflow.example/")
    assert link == "https://airflow.example/leadsync/data-docs/" + found[run_id]
    assert status.data_docs_link(tmp_path, "google", run_id) is None


def test_a_retried_check_replaces_the_runs_coverage(tmp_path: Path) -> None:
    store = StateStore(make_engine(f"sqlite:///{tmp_path / 'state.db'}"))
    store.migrate()
    store.set_coverage("meta", "run-1", 10, {"email": 7, "phone": 10})
    store.set_coverage("meta", "run-1", 12, {"email": 9})  # the retry staged the run again
    assert [(c["events"], c["keys"]) for c in store.run_coverage("meta")] == [(12, {"email": 9})]
    store.set_coverage("meta", "run-1", 0, {})  # the retry's contract failed: nothing staged
    assert store.run_coverage("meta") == []

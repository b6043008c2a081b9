"""Integration fixtures: a backend (SQLite or Postgres) wired through Airflow connections,
the platform sandbox on loopback, and a helper that runs a real DAG with ``dag.test()``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
META_TOKEN = "sandbox-meta-token"
META_PIXEL = "1234567890123456"
TIKTOK_TOKEN = "sandbox-tiktok-token"
TIKTOK_CRM_EVENT_SET = "SANDBOXCRM00000000001"
GOOGLE_TOKEN = "sandbox-google-token"


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Migrates the session's private Airflow metadata DB once and creates the pools."""
    import os

    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True,
                   env=dict(os.environ))
    for name in ("leadsync_meta", "leadsync_tiktok", "leadsync_google", "leadsync_google_ads"):
        subprocess.run([str(airflow), "pools", "set", name, "4", "test"], check=True,
                       capture_output=True, env=dict(os.environ))


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Any]:
    """The platform sandbox for the whole session (reset per test by ``backend``)."""
    from leadsync.sandbox.app import SandboxConfig
    from leadsync.sandbox.server import SandboxServer

    cfg = SandboxConfig(meta_tokens={META_TOKEN}, meta_pixels={META_PIXEL})
    with SandboxServer(cfg) as server:
        yield server


@dataclass
class Backend:
    """One test's warehouse + state databases and the helpers to drive and inspect them."""

    name: str
    warehouse_url: str
    state_url: str
    sandbox_url: str
    monkeypatch: pytest.MonkeyPatch

    def engines(self) -> tuple[Any, Any]:
        from leadsync.db import make_engine

        return make_engine(self.warehouse_url), make_engine(self.state_url)

    def store(self) -> Any:
        from leadsync.state import StateStore

        store = StateStore(self.engines()[1])
        store.migrate()
        return store

    def seed(self, n_leads: int = 200, now: datetime | None = None) -> int:
        from leadsync import demo_data

        return demo_data.seed(self.engines()[0], n_leads, now or datetime.now(UTC))

    def fault(self, *faults: dict[str, Any]) -> None:
        requests.post(f"{self.sandbox_url}/_sandbox/faults",
                      json={"platform": "meta", "faults": list(faults)}, timeout=5
                      ).raise_for_status()

    def sandbox_events(self, unique: bool = True) -> list[dict[str, Any]]:
        resp = requests.get(f"{self.sandbox_url}/_sandbox/meta/events",
                            params={"unique": str(unique).lower()}, timeout=30)
        resp.raise_for_status()
        data = resp.json()
        return list(data["events"] if isinstance(data, dict) else data)

    def sandbox_stats(self) -> dict[str, Any]:
        return dict(requests.get(f"{self.sandbox_url}/_sandbox/stats", timeout=5).json()["meta"])

    def run_dag(self, dag_id: str = "leadsync_meta",
                conf: dict[str, Any] | None = None) -> Any:
        """Parses the real DAG folder and runs one DAG run in-process with ``dag.test()``."""
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(ROOT / "dags"))
        assert not bag.import_errors, bag.import_errors
        dag = bag.get_dag(dag_id)
        return dag.test(logical_date=datetime.now(UTC), run_conf=conf)


def _conn(url: str) -> str:
    return json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": url}})


def make_backend(kind: str, tmp_path: Path, request: pytest.FixtureRequest,
                 monkeypatch: pytest.MonkeyPatch, sandbox: Any) -> Backend:
    if kind == "postgres":
        wh = request.getfixturevalue("pg_url")
        state = wh  # the production layout: state in the warehouse database
    else:
        wh = f"sqlite:///{tmp_path / 'warehouse.db'}"
        state = f"sqlite:///{tmp_path / 'state.db'}"
    monkeypatch.setenv("AIRFLOW_CONN_LEADSYNC_WAREHOUSE", _conn(wh))
    monkeypatch.setenv("AIRFLOW_CONN_LEADSYNC_STATE", _conn(state))
    monkeypatch.setenv("AIRFLOW_CONN_LEADSYNC_META", json.dumps({
        "conn_type": "http", "host": sandbox.url, "password": META_TOKEN,
        "extra": {"pixel_id": META_PIXEL, "api_version": "v25.0"}}))
    monkeypatch.setenv("AIRFLOW_CONN_LEADSYNC_TIKTOK", json.dumps({
        "conn_type": "http", "host": sandbox.url, "password": TIKTOK_TOKEN,
        "extra": {"event_source_id": TIKTOK_CRM_EVENT_SET}}))
    for google in ("AIRFLOW_CONN_LEADSYNC_GOOGLE", "AIRFLOW_CONN_LEADSYNC_GOOGLE_ADS"):
        # A static token: the sandbox stands in for Google, no OAuth endpoint is contacted.
        monkeypatch.setenv(google, json.dumps({
            "conn_type": "http", "host": sandbox.url, "extra": {"access_token": GOOGLE_TOKEN}}))
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=5).raise_for_status()
    return Backend(kind, wh, state, sandbox.url, monkeypatch)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            sandbox: Any, airflow_db: None) -> Backend:
    """Each test runs on the embedded SQLite and on the machine's Postgres."""
    return make_backend(request.param, tmp_path, request, monkeypatch, sandbox)


def minutes_ago(n: float) -> datetime:
    return datetime.now(UTC) - timedelta(minutes=n)

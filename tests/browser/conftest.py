"""A real ``airflow api-server`` running the leadsync plugin over a seeded state store.

The state comes from real runs (demo warehouse → contract → sandbox) of every configured
destination, one of them with a platform-rejected event and a later one with a batch left
pending. Users come from Airflow's simple auth manager; tokens are issued the way it issues
them (``POST /auth/token``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".leadsync" / "screenshots"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Seeded:
    """The state store the server reads, and what the seeding runs returned."""

    state_url: str
    runs: dict[str, list[dict[str, Any]]]

    def env(self) -> dict[str, str]:
        conn = json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": self.state_url}})
        return {**os.environ, "AIRFLOW_CONN_LEADSYNC_STATE": conn}


@pytest.fixture(scope="package")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the seeded warehouse and state store live (known before they are seeded)."""
    return tmp_path_factory.mktemp("ui-state")


def _state_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'state.db'}"


@pytest.fixture(scope="package")
def seeded(state_dir: Path) -> Seeded:
    """Every destination run once against the sandbox; TikTok rejects one event (a dead
    letter); then new rows for Meta while Meta answers 503 (a pending batch)."""
    from leadsync import demo_data
    from leadsync.cli import SANDBOX_META_PIXEL, SANDBOX_META_TOKEN, sandbox_credentials
    from leadsync.config import get_config
    from leadsync.db import make_engine
    from leadsync.pipeline import Pipeline
    from leadsync.sandbox.app import SandboxConfig
    from leadsync.sandbox.server import SandboxServer
    from leadsync.state import StateStore

    state_url = _state_url(state_dir)
    warehouse = make_engine(f"sqlite:///{state_dir / 'warehouse.db'}")
    store = StateStore(make_engine(state_url))
    store.migrate()
    config = get_config()
    now = datetime.now(UTC)
    demo_data.seed(warehouse, 300, now - timedelta(minutes=10), broken_rows=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    sandbox_cfg = SandboxConfig(meta_tokens={SANDBOX_META_TOKEN}, meta_pixels={SANDBOX_META_PIXEL})
    with SandboxServer(sandbox_cfg) as sandbox:

        def run(dest: Any) -> None:
            creds = sandbox_credentials(dest, sandbox.url)
            pipeline = Pipeline(config, dest, store, warehouse, credentials=lambda: creds,
                                sleep=lambda s: None)
            runs.setdefault(dest.name, []).append(pipeline.run())

        def fault(platform: str, *faults: dict[str, Any]) -> None:
            requests.post(f"{sandbox.url}/_sandbox/faults",
                          json={"platform": platform, "faults": list(faults)},
                          timeout=10).raise_for_status()

        fault("tiktok", {"kind": "reject_events", "indices": [0], "reason": "INVALID_EMAIL"})
        for dest in config.destinations:
            if dest.enabled:
                run(dest)
        demo_data.add_changes(warehouse, 15, datetime.now(UTC) - timedelta(minutes=5))
        fault("meta", {"kind": "http", "status": 503, "times": 100})
        run(config.destination("meta"))
    return Seeded(state_url, runs)


@dataclass
class ApiServer:
    """The running API server and a way to get tokens from it."""

    url: str
    passwords: dict[str, str]

    def token(self, user: str = "admin") -> str:
        resp = requests.post(f"{self.url}/auth/token", timeout=30,
                             json={"username": user, "password": self.passwords[user]})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["access_token"])


@pytest.fixture(scope="package")
def api_server(state_dir: Path, tmp_path_factory: pytest.TempPathFactory,
               request: pytest.FixtureRequest) -> Iterator[ApiServer]:
    """``airflow api-server`` (one worker) on a free loopback port, with the plugin folder;
    the state is seeded while it starts (the plugin opens the store on its first request)."""
    tmp = tmp_path_factory.mktemp("api-server")
    passwords = {"admin": secrets.token_urlsafe(12), "viewer": secrets.token_urlsafe(12)}
    password_file = tmp / "passwords.json"
    password_file.write_text(json.dumps(passwords))
    env = Seeded(_state_url(state_dir), {}).env()
    env.update({
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",  # the connection form's "Test" button
    })
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp / "api-server.log"
    command = (f'"{AIRFLOW}" db migrate && exec "{AIRFLOW}" api-server -H 127.0.0.1 '
               f"-p {port} -w 1")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(["/bin/sh", "-c", command], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        request.getfixturevalue("seeded")
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"airflow api-server exited:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"airflow api-server did not answer:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield ApiServer(url, passwords)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

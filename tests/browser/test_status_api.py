"""``/leadsync/api/status`` in a real ``airflow api-server``: equal to ``leadsync state show
--json`` with an Airflow token, refused without one."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from .conftest import ApiServer, Seeded

ROUTES = ["/leadsync/api/status", "/leadsync/", "/leadsync/quarantine",
          "/leadsync/dead-letters", "/leadsync/pending", "/leadsync/data-docs/index.html"]


def _state_show(seeded: Seeded) -> dict:
    cli = str(Path(sys.executable).with_name("leadsync"))
    out = subprocess.run([cli, "state", "show", "--json"], env=seeded.env(), check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return dict(json.loads(out)["destinations"])


@pytest.mark.parametrize("route", ROUTES)
def test_routes_refuse_requests_without_a_valid_token(api_server: ApiServer, route: str) -> None:
    anonymous = requests.get(api_server.url + route, timeout=30)
    assert anonymous.status_code in (401, 403)
    forged = requests.get(api_server.url + route, timeout=30,
                          headers={"Authorization": "Bearer not-a-token"})
    assert forged.status_code in (401, 403)
    for resp in (anonymous, forged):
        assert "delivered" not in resp.text and "meta" not in resp.text


def test_status_equals_state_show_with_a_token(api_server: ApiServer, seeded: Seeded) -> None:
    resp = requests.get(f"{api_server.url}/leadsync/api/status", timeout=60,
                        headers={"Authorization": f"Bearer {api_server.token('viewer')}"})
    assert resp.status_code == 200, resp.text
    status = resp.json()["destinations"]
    shown = _state_show(seeded)
    from leadsync.config import get_config

    configured = {d.name for d in get_config().destinations if d.enabled}
    assert set(status) == set(shown) == configured and {"meta", "tiktok", "google"} <= configured
    for name, numbers in shown.items():
        assert {k: status[name][k] for k in numbers} == numbers
    # The seeding left a dead letter at TikTok and a pending batch at Meta.
    assert status["tiktok"]["failed"] >= 1 and status["meta"]["pending"] >= 1
    # Lag: now minus the watermark's time; the last runs, newest first, with their counts.
    now = datetime.now(UTC)
    for name in shown:
        mark = datetime.fromisoformat(shown[name]["watermark"]["updated_at"])
        assert abs(status[name]["watermark_lag_seconds"] - (now - mark).total_seconds()) < 120
        expected = [r["run_id"] for r in reversed(seeded.runs[name])]
        assert [r["run_id"] for r in status[name]["last_runs"]] == expected
        last = seeded.runs[name][-1]["counts"]
        assert status[name]["last_runs"][0]["counts"]["delivered"] == last.get("delivered", 0)


def test_the_plugin_is_listed_with_its_external_view(api_server: ApiServer) -> None:
    resp = requests.get(f"{api_server.url}/api/v2/plugins", timeout=30,
                        headers={"Authorization": f"Bearer {api_server.token()}"})
    assert resp.status_code == 200, resp.text
    plugins = {p["name"]: p for p in resp.json()["plugins"]}
    views = plugins["leadsync"]["external_views"]
    assert [(v["name"], v["href"], v["url_route"]) for v in views] == [
        ("Conversions", "/leadsync/", "leadsync")]

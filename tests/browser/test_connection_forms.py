"""leadsync's connection types in a real ``airflow api-server``: the forms' fields as the UI
receives them, and the "Test" button making a harmless call to the (sandbox) platform."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from .conftest import ApiServer

META_TOKEN = "sandbox-meta-token"
META_PIXEL = "1234567890123456"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Any]:
    from leadsync.sandbox.app import SandboxConfig
    from leadsync.sandbox.server import SandboxServer

    with SandboxServer(SandboxConfig(meta_tokens={META_TOKEN}, meta_pixels={META_PIXEL})) as srv:
        yield srv


def _auth(api_server: ApiServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_server.token('admin')}"}


def _test(api_server: ApiServer, conn_type: str, **fields: Any) -> dict[str, Any]:
    body = {"connection_id": "leadsync_form_test", "conn_type": conn_type, **fields}
    if "extra" in body:
        body["extra"] = json.dumps(body["extra"])
    resp = requests.post(f"{api_server.url}/api/v2/connections/test", json=body,
                         headers=_auth(api_server), timeout=120)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def _events(sandbox: Any, platform: str, test: bool) -> list[dict[str, Any]]:
    return list(requests.get(f"{sandbox.url}/_sandbox/{platform}/events",
                             params={"test": str(test).lower()}, timeout=10).json())


def test_each_destination_type_has_a_form_with_its_real_fields(api_server: ApiServer) -> None:
    resp = requests.get(f"{api_server.url}/ui/connections/hook_meta", headers=_auth(api_server),
                        timeout=60)
    assert resp.status_code == 200, resp.text
    forms = {h["connection_type"]: h for h in resp.json()
             if str(h["connection_type"]).startswith("leadsync_")}
    fields = {t: set(h["extra_fields"] or {}) for t, h in forms.items()}
    assert fields == {
        "leadsync_meta": {"pixel_id", "api_version", "test_event_code"},
        "leadsync_tiktok": {"event_source_id", "test_event_code"},
        "leadsync_google_datamanager": {"client_id", "refresh_token", "quota_project_id",
                                        "validate_only"},
        "leadsync_google_ads": {"client_id", "refresh_token", "quota_project_id",
                                "validate_only", "developer_token", "api_version"},
        "leadsync_linkedin": {"api_version"},
        "leadsync_snapchat": {"pixel_id", "test_mode"},
        "leadsync_pinterest": {"ad_account_id", "test"},
        "leadsync_reddit": {"pixel_id", "test_id"},
    }
    meta = forms["leadsync_meta"]
    assert meta["hook_name"] == "leadsync: Meta Conversions API"
    behaviour = meta["standard_fields"]
    assert behaviour["password"]["title"] == "Access token"
    assert behaviour["login"]["hidden"] is True and behaviour["port"]["hidden"] is True
    refresh = forms["leadsync_google_ads"]["extra_fields"]["refresh_token"]
    assert refresh["schema"]["format"] == "password"  # masked in the form


def test_the_test_button_checks_fields_and_calls_the_platform_harmlessly(
        api_server: ApiServer, sandbox: Any) -> None:
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=10).raise_for_status()
    missing = _test(api_server, "leadsync_meta", host=sandbox.url, password=META_TOKEN,
                    extra={"api_version": "v25.0"})
    assert missing["status"] is False and "pixel_id" in missing["message"]

    fields_only = _test(api_server, "leadsync_meta", host=sandbox.url, password=META_TOKEN,
                        extra={"pixel_id": META_PIXEL})
    assert fields_only["status"] is True and "no call made" in fields_only["message"]
    assert _events(sandbox, "meta", test=True) == [] == _events(sandbox, "meta", test=False)

    probe = _test(api_server, "leadsync_meta", host=sandbox.url, password=META_TOKEN,
                  extra={"pixel_id": META_PIXEL, "test_event_code": "TEST4242"})
    assert probe["status"] is True, probe
    assert len(_events(sandbox, "meta", test=True)) == 1  # a test event only
    assert _events(sandbox, "meta", test=False) == []

    refused = _test(api_server, "leadsync_meta", host=sandbox.url, password="wrong-token",
                    extra={"pixel_id": META_PIXEL, "test_event_code": "TEST4242"})
    assert refused["status"] is False and "wrong-token" not in refused["message"]

    google = _test(api_server, "leadsync_google_datamanager", host=sandbox.url,
                   extra={"access_token": "sandbox-google-token"})
    assert google["status"] is True, google
    assert "validate-only" in google["message"]
    assert len(_events(sandbox, "google_datamanager", test=True)) == 1
    assert _events(sandbox, "google_datamanager", test=False) == []

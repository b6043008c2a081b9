"""``leadsync render`` and the sandbox connections for the LinkedIn and Snapchat destinations of
the bundled config: the platform's request shape, identifiers hashed, secrets never printed."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from leadsync import cli
from leadsync.config import get_config
from leadsync.destinations import get_destination
from leadsync.destinations.base import derive_event_id
from tests.unit.sandbox_transport import sha

NOW = "2025-06-02T12:00:00Z"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LEADSYNC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LEADSYNC_CONFIG", raising=False)
    for key in list(os.environ):
        if key.startswith("AIRFLOW_CONN_LEADSYNC"):
            monkeypatch.delenv(key)


def render(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
           destination: str, *rows: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code = cli.main(["render", "--destination", destination, "--now", NOW])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines() if line.strip()], out + err


def row(lead_id: str, stage: str = "won", **changes: Any) -> dict[str, Any]:
    data = {"lead_id": lead_id, "stage": stage, "event_time": "2025-06-02T10:00:00Z",
            "updated_at": "2025-06-02T10:05:00Z", "email": "Jane.Doe@Example.com",
            "phone": "+44 844 412 4653", "country": "GB", "value": "1200", "currency": "EUR",
            "li_fat_id": "df5gf5-gh6t7-ph4j7h-fgf6n1"}
    data.update(changes)
    return data


def test_render_linkedin(monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    items, text = render(monkeypatch, capsys, "linkedin", row("00QA"),
                         row("00QB", email=None, li_fat_id=None))
    [request] = [i for i in items if "body" in i]
    assert (request["method"], request["url"]) == (
        "POST", "https://api.linkedin.com/rest/conversionEvents")
    [element] = request["body"]["elements"]
    assert element == {
        "conversion": "urn:lla:llaPartnerConversion:20000004",
        "conversionHappenedAt": 1748858400000,
        "eventId": derive_event_id("00QA", "won"),
        "user": {"userIds": [
            {"idType": "SHA256_EMAIL", "idValue": sha("jane.doe@example.com")},
            {"idType": "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID",
             "idValue": "df5gf5-gh6t7-ph4j7h-fgf6n1"}]},
        "conversionValue": {"currencyCode": "EUR", "amount": "1200.0"},
    }
    assert [i["skipped"]["reason"] for i in items if "skipped" in i] == ["no_match_keys"]
    assert "jane" not in text.lower() and "4653" not in text


def test_render_snapchat_masks_a_real_token(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    secret = "snap-real-token-that-must-not-leak"
    monkeypatch.setenv("AIRFLOW_CONN_LEADSYNC_SNAPCHAT", json.dumps({
        "conn_type": "http", "password": secret,
        "extra": {"pixel_id": "1ec32188-754e-4be2-8e55-c949a984a39f"}}))
    items, text = render(monkeypatch, capsys, "snapchat", row("00QA"), row("00QB", value=None))
    [request] = [i for i in items if "body" in i]
    assert request["url"] == ("https://tr.snapchat.com/v3/1ec32188-754e-4be2-8e55-c949a984a39f"
                              "/events")
    [event] = request["body"]["data"]
    assert (event["event_name"], event["event_time"], event["action_source"]) == (
        "PURCHASE", 1748858400, "OFFLINE")
    assert event["user_data"]["em"] == [sha("jane.doe@example.com")]
    assert event["user_data"]["ph"] == [sha("448444124653")]
    assert event["custom_data"] == {"value": 1200.0, "currency": "EUR"}
    assert [i["skipped"]["reason"] for i in items if "skipped" in i] == [
        "purchase_needs_value_and_currency"]
    assert secret not in text and "jane" not in text.lower()


@pytest.mark.parametrize("name", ["linkedin", "snapchat"])
def test_sandbox_connection_parses(name: str) -> None:
    dest = get_config().destination(name)
    fields = cli.sandbox_connection(dest, "http://127.0.0.1:9")
    creds = get_destination(dest.type).parse_credentials(fields["host"], fields["password"],
                                                         fields["extra"])
    assert creds.base_url == "http://127.0.0.1:9"

"""The Reddit Conversions API destination and its emulator: identity rules (the email example
from Reddit's advanced-matching guide), payload shape, response classes, and the real module
against the real emulator."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from leadsync.config import DestinationConfig, RetryConfig
from leadsync.delivery import BatchSender
from leadsync.destinations import get_destination
from leadsync.destinations import reddit as rd
from leadsync.destinations.base import CredentialsError, ResultKind
from leadsync.pipeline import Planned, Rejected, plan_row, render_requests
from leadsync.sandbox import SandboxConfig, create_app
from leadsync.state import DELIVERED, EXPIRED, FAILED
from tests.unit.sandbox_transport import TestClientTransport, sha

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
TOKEN = "sandbox-reddit-token"
PIXEL = "t2_sandbox01"
PATH = f"/api/v3/pixels/{PIXEL}/conversion_events"
CREDS = rd.parse_credentials("http://sandbox", TOKEN, {"pixel_id": PIXEL})


def dest(**overrides: Any) -> DestinationConfig:
    base: dict[str, Any] = {"name": "reddit", "type": "reddit",
                            "stages": {"lead": "LEAD", "qualified": "QualifiedLead",
                                       "won": "PURCHASE"},
                            "retry": RetryConfig(attempts=2, backoff_base=0, backoff_max=0)}
    base.update(overrides)
    return DestinationConfig(**base)


def row(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "lead_id": "L1", "stage": "won", "event_time": NOW - timedelta(hours=2),
        "updated_at": NOW - timedelta(hours=1), "email": "Al.ice$+Apple@Example.Com",
        "phone": "(650) 555-0123", "country": "us", "external_id": " CRM-42 ",
        "client_ip": "203.0.113.7", "user_agent": "Mozilla/5.0", "rdt_cid": "rdt-click-1",
        "value": "1200.50", "currency": "eur",
    }
    base.update(overrides)
    return base


def planned(r: dict[str, Any], d: DestinationConfig | None = None) -> dict[str, Any]:
    plan = plan_row(r, d or dest(), rd, NOW)  # type: ignore[arg-type]
    assert isinstance(plan, Planned), plan
    return plan.envelope["body"]


def test_credentials_name_the_missing_field() -> None:
    with pytest.raises(CredentialsError, match="'password'"):
        rd.parse_credentials(None, None, {"pixel_id": PIXEL})
    with pytest.raises(CredentialsError, match="'pixel_id'"):
        rd.parse_credentials(None, "tok", {})
    with pytest.raises(CredentialsError, match="'pixel_id' must be"):
        rd.parse_credentials(None, "tok", {"pixel_id": "a/b"})
    with pytest.raises(CredentialsError, match="'test_id'"):
        rd.parse_credentials(None, "tok", {"pixel_id": PIXEL, "test_id": 5})
    creds = rd.parse_credentials(None, "s3cr3t", {"pixel_id": PIXEL, "test_id": " t-1 "})
    assert creds.base_url == "https://ads-api.reddit.com" and creds.test_id == "t-1"
    assert "s3cr3t" not in repr(creds)
    assert get_destination("reddit") is rd


# -- normalisation ------------------------------------------------------------------------


def test_email_is_canonicalised_as_reddits_guide_shows() -> None:
    # Reddit's example: both hash to ff8d9819...d976.
    expected = "ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad60e28eaaa8c6d976"
    assert planned(row())["user"]["email"] == expected
    assert planned(row(email="alice@example.com"))["user"]["email"] == expected
    assert rd.normalize_email_reddit("Al.ice$+Apple@Example.Com") == "alice@example.com"
    assert rd.normalize_email_reddit("+tag@example.com") is None
    assert rd.normalize_email_reddit("not an email") is None


@pytest.mark.parametrize(("column", "raw", "key", "normalised"), [
    ("phone", "(650) 555-0123", "phone_number", "+16505550123"),
    ("external_id", " CRM-42 ", "external_id", "crm-42"),
    ("client_ip", " 2001:DB8::1 ", "ip_address", "2001:db8::1"),
])
def test_hashed_user_fields(column: str, raw: str, key: str, normalised: str) -> None:
    assert planned(row(**{column: raw}))["user"][key] == sha(normalised)


def test_a_sha256_digest_in_any_case_passes_through_lowercased() -> None:
    digest = sha("alice@example.com")
    assert planned(row(email=digest.upper()))["user"]["email"] == digest


def test_event_shape() -> None:
    event = planned(row())
    assert event["event_at"] == int((NOW - timedelta(hours=2)).timestamp()) * 1000
    assert event["action_source"] == "OTHER"
    assert event["type"] == {"tracking_type": "PURCHASE"}
    assert event["click_id"] == "rdt-click-1"
    assert event["user"]["user_agent"] == "Mozilla/5.0"
    assert event["metadata"]["conversion_id"].startswith("ls_")
    assert (event["metadata"]["value"], event["metadata"]["currency"]) == (1200.5, "EUR")
    custom = planned(row(stage="qualified"))
    assert custom["type"] == {"tracking_type": "CUSTOM", "custom_event_name": "QualifiedLead"}
    web = planned(row(event_source_url="https://example.com/x"), dest(shape="website"))
    assert web["action_source"] == "WEBSITE" and web["event_source_url"].endswith("/x")


def test_no_match_key_and_age_window() -> None:
    bare = row(email=None, phone=None, external_id=None, rdt_cid=None, user_agent=None)
    plan = plan_row(bare, dest(), rd, NOW)  # type: ignore[arg-type]
    assert isinstance(plan, Rejected) and plan.reason == "no_match_keys"
    old = plan_row(row(event_time=NOW - timedelta(days=8)), dest(), rd, NOW)  # type: ignore[arg-type]
    assert isinstance(old, Rejected) and old.status == EXPIRED


def test_render_and_test_mode() -> None:
    lines = list(render_requests([row(), row(lead_id="L2", stage="lead")], dest(), CREDS, NOW))
    assert len(lines) == 1 and lines[0]["url"] == f"http://sandbox{PATH}"
    assert [e["type"]["tracking_type"] for e in lines[0]["body"]["data"]["events"]] == [
        "PURCHASE", "LEAD"]
    assert TOKEN not in str(lines)
    test_creds = rd.parse_credentials(None, "t", {"pixel_id": PIXEL, "test_id": "t2_test"})
    assert rd.build_request([], test_creds, dest()).body == {
        "data": {"events": [], "test_id": "t2_test"}}


def test_parse_response_classes() -> None:
    assert rd.parse_response(200, "{}", {}, 3).kind is ResultKind.OK
    bad = rd.parse_response(400, json.dumps({"invalid_events": [
        {"event_index": 1, "error_message": "bad email"}, {"event_index": 9}]}), {}, 3)
    assert bad.kind is ResultKind.PERMANENT and bad.event_errors == {1: "bad email"}
    assert rd.parse_response(400, "oops", {}, 3).event_errors == {}
    throttled = rd.parse_response(429, "{}", {"retry-after": "2"}, 1)
    assert throttled.kind is ResultKind.TRANSIENT and throttled.retry_after == 2
    fatal = rd.parse_response(401, json.dumps({"error": {"reason": "UNAUTHORIZED"}}), {}, 1)
    assert fatal.kind is ResultKind.FATAL and "UNAUTHORIZED" in fatal.message


# -- the emulator -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW.timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app(SandboxConfig(clock=Clock())))


def wire_event(conversion_id: str = "c1", **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_at": int(NOW.timestamp() * 1000) - 3_600_000, "action_source": "OTHER",
        "type": {"tracking_type": "LEAD"}, "user": {"email": sha("alice@example.com")},
        "metadata": {"conversion_id": conversion_id},
    }
    event.update(overrides)
    return event


def post(client: TestClient, events: list[Any], token: str = TOKEN, pixel: str = PIXEL,
         **data: Any) -> Any:
    return client.post(f"/api/v3/pixels/{pixel}/conversion_events",
                       json={"data": {"events": events, **data}},
                       headers={"Authorization": f"Bearer {token}"})


def stats(client: TestClient) -> dict[str, int]:
    return dict(client.get("/_sandbox/stats").json()["reddit"])


def test_emulator_rejects_the_whole_request_naming_each_bad_event(client: TestClient) -> None:
    assert post(client, [wire_event()], token="x").status_code == 401
    assert post(client, [wire_event()], pixel="t2_other").status_code == 403
    resp = post(client, [
        wire_event("ok"),
        wire_event("sec", event_at=int(NOW.timestamp()) - 60),
        wire_event("raw", user={"email": "alice@example.com"}),
        wire_event("old", event_at=int((NOW - timedelta(days=8)).timestamp() * 1000)),
        wire_event("custom", type={"tracking_type": "CUSTOM"}),
    ])
    assert resp.status_code == 400
    invalid = {e["event_index"]: e["error_message"] for e in resp.json()["invalid_events"]}
    assert sorted(invalid) == [1, 2, 3, 4]
    assert "milliseconds" in invalid[1] and "SHA-256" in invalid[2]
    assert "7 days" in invalid[3] and "custom_event_name" in invalid[4]
    assert stats(client)["events_received"] == 0


def test_emulator_dedups_by_conversion_id_and_keeps_test_events_apart(
        client: TestClient) -> None:
    assert post(client, [wire_event("c1")]).status_code == 200
    assert post(client, [wire_event("c1")]).status_code == 200
    assert post(client, [wire_event("c1")], test_id="t2_test").status_code == 200
    assert (stats(client)["unique_events"], stats(client)["duplicate_events"],
            stats(client)["test_events"]) == (1, 1, 1)


def test_the_destination_module_against_the_emulator(client: TestClient) -> None:
    """A mixed batch: Reddit fails the request naming the bad event, the sender drops it and
    the rest lands once."""
    d = dest()
    envelopes = []
    for i in range(5):
        plan = plan_row(row(lead_id=f"L{i}", email=f"p{i}@example.com"), d, rd, NOW)  # type: ignore[arg-type]
        assert isinstance(plan, Planned)
        envelopes.append(plan.envelope)
    bad = envelopes[3]["event_id"]
    client.post("/_sandbox/faults", json={"platform": "reddit", "faults": [
        {"kind": "reject_events", "event_ids": [bad]}, {"kind": "throttle"}]}
    ).raise_for_status()
    report = BatchSender(rd, CREDS, d, TestClientTransport(client),  # type: ignore[arg-type]
                         sleep=lambda _s: None).deliver(envelopes, NOW)
    assert report.outcomes[bad].status == FAILED
    assert "rejected by the sandbox" in (report.outcomes[bad].detail or "")
    delivered = {e for e, o in report.outcomes.items() if o.status == DELIVERED}
    assert delivered == {e["event_id"] for e in envelopes} - {bad}
    landed = client.get("/_sandbox/reddit/events", params={"unique": "true"}).json()
    assert {e["event_id"] for e in landed} == delivered
    # rejected request, throttled resend, accepted resend
    assert (stats(client)["requests"], report.retries) == (3, 1)


def test_the_default_config_sends_to_both_new_platforms_in_the_demo() -> None:
    """The bundled config lists Pinterest and Reddit, and the demo's sandbox connections for
    them parse into credentials the default emulators accept."""
    from leadsync.cli import sandbox_credentials
    from leadsync.config import DEFAULT_CONFIG_PATH, load_config

    config = load_config(DEFAULT_CONFIG_PATH)
    by_type = {d.type: d for d in config.destinations}
    sandbox = SandboxConfig()
    pin_creds = sandbox_credentials(by_type["pinterest"], "http://127.0.0.1:1")
    assert pin_creds.access_token in sandbox.pinterest_tokens
    assert pin_creds.ad_account_id in sandbox.pinterest_ad_accounts
    reddit_creds = sandbox_credentials(by_type["reddit"], "http://127.0.0.1:1")
    assert reddit_creds.access_token in sandbox.reddit_tokens
    assert reddit_creds.pixel_id in sandbox.reddit_pixels


def test_a_bad_email_is_dropped_and_the_row_sent_on_its_phone() -> None:
    """Through the data contract (as render runs it): the email is unusable, the phone is not,
    so the event goes out with the phone only; with no phone either, the row is quarantined."""
    from leadsync.config import parse_config

    config = parse_config({"destinations": [{"name": "reddit", "type": "reddit",
                                             "stages": {"won": "PURCHASE"}}]})
    d = config.destinations[0]
    rows = [row(email="anna@", rdt_cid=None, client_ip=None, external_id=None),
            row(lead_id="L2", email="anna@", phone=None, rdt_cid=None, client_ip=None,
                external_id=None)]
    lines = list(render_requests(rows, d, CREDS, NOW, config=config))
    [request] = [line for line in lines if "body" in line]
    [event] = request["body"]["data"]["events"]
    assert "email" not in event["user"] and event["user"]["phone_number"] == sha("+16505550123")
    [skipped] = [line["skipped"] for line in lines if "skipped" in line]
    assert (skipped["lead_id"], skipped["reason"]) == ("L2", "no_match_keys")

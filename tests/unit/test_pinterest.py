"""The Pinterest Conversions API destination and its emulator: identity rules (examples from
Pinterest's API reference and Segment's Pinterest destination), payload shape, response
classes, and the real module against the real emulator."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from leadsync.config import ConfigError, DestinationConfig, RetryConfig, parse_config
from leadsync.delivery import BatchSender
from leadsync.destinations import get_destination
from leadsync.destinations import pinterest as pin
from leadsync.destinations.base import CredentialsError, FatalDestinationError, ResultKind
from leadsync.pipeline import Planned, Rejected, plan_row, render_requests
from leadsync.sandbox import SandboxConfig, create_app
from leadsync.state import DELIVERED, FAILED
from tests.unit.sandbox_transport import TestClientTransport, sha

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
TOKEN = "sandbox-pinterest-token"
ACCOUNT = "549755885175"
PATH = f"/v5/ad_accounts/{ACCOUNT}/events"
CREDS = pin.parse_credentials("http://sandbox", TOKEN, {"ad_account_id": ACCOUNT})


def dest(**overrides: Any) -> DestinationConfig:
    base: dict[str, Any] = {"name": "pinterest", "type": "pinterest",
                            "stages": {"lead": "lead", "qualified": "custom", "won": "checkout"},
                            "retry": RetryConfig(attempts=2, backoff_base=0, backoff_max=0)}
    base.update(overrides)
    return DestinationConfig(**base)


def row(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "lead_id": "L1", "stage": "won", "event_time": NOW - timedelta(hours=2),
        "updated_at": NOW - timedelta(hours=1), "email": "  Jane.Doe@Example.COM ",
        "phone": "+1 (650) 555-0123", "country": "US", "first_name": "Jane",
        "last_name": "O'Brien", "city": "Menlo Park", "state": "California",
        "zip": "94025-1234", "gender": "Female", "date_of_birth": "1997-12-26",
        "external_id": " CRM-42 ", "client_ip": "203.0.113.7", "user_agent": "Mozilla/5.0",
        "epik": "dj0yJnU9b2JDcFFHekV4", "value": "1200.50", "currency": "eur",
    }
    base.update(overrides)
    return base


def planned(r: dict[str, Any], d: DestinationConfig | None = None) -> dict[str, Any]:
    plan = plan_row(r, d or dest(), pin, NOW)  # type: ignore[arg-type]
    assert isinstance(plan, Planned), plan
    return plan.envelope["body"]


# -- credentials and config ---------------------------------------------------------------


def test_credentials_name_the_missing_field() -> None:
    with pytest.raises(CredentialsError, match="'password'"):
        pin.parse_credentials(None, None, {"ad_account_id": ACCOUNT})
    with pytest.raises(CredentialsError, match="'ad_account_id'"):
        pin.parse_credentials(None, "tok", {})
    with pytest.raises(CredentialsError, match="'ad_account_id' must be digits"):
        pin.parse_credentials(None, "tok", {"ad_account_id": "act_12"})
    with pytest.raises(CredentialsError, match="'test'"):
        pin.parse_credentials(None, "tok", {"ad_account_id": ACCOUNT, "test": "yes"})
    creds = pin.parse_credentials("localhost:1234/", "s3cr3t", {"ad_account_id": ACCOUNT})
    assert creds.base_url == "https://localhost:1234"
    assert "s3cr3t" not in repr(creds)
    assert get_destination("pinterest") is pin


def test_config_accepts_only_pinterest_event_names() -> None:
    with pytest.raises(ConfigError, match=r"stages\.won: 'Purchase' is not a Pinterest"):
        parse_config({"destinations": [{"name": "pin", "type": "pinterest",
                                        "stages": {"won": "Purchase"}}]})
    config = parse_config({"destinations": [{"name": "pin", "type": "pinterest",
                                             "stages": {"won": "checkout"}}]})
    assert config.destinations[0].conn_id == "leadsync_pin"


# -- normalisation, one rule per user_data key ---------------------------------------------


@pytest.mark.parametrize(("column", "raw", "key", "normalised"), [
    # "Sha256 hashes of lowercase version of user's email addresses"
    ("email", "  Jane.Doe@Example.COM ", "em", "jane.doe@example.com"),
    # "only digits with country code, area code, and number. Remove any symbols, letters,
    # spaces and leading zeros"
    ("phone", "+1 (650) 555-0123", "ph", "16505550123"),
    ("phone", "00 44 20 7946 0018", "ph", "442079460018"),
    # "first name, in lowercase"
    ("first_name", "Jane", "fn", "jane"),
    ("last_name", "O'Brien", "ln", "obrien"),
    # "city, in lowercase, and without spaces or punctuation" (Segment: "menlopark")
    ("city", "Menlo Park", "ct", "menlopark"),
    # "state, given as a two-letter code in lowercase" (Segment: "ca")
    ("state", "California", "st", "ca"),
    # US ZIP: five digits (Segment: "A five-digit zip code for United States")
    ("zip", "94025-1234", "zp", "94025"),
    # "two-character ISO-3166 country code ..., in lowercase"
    ("country", "United States", "country", "us"),
    # "Either "f" or "m" or "n" for non-binary gender"
    ("gender", "Female", "ge", "f"),
    ("gender", "non-binary", "ge", "n"),
    # "year, month, and day" (Segment: "19971226 for December 26, 1997")
    ("date_of_birth", "1997-12-26", "db", "19971226"),
    ("external_id", " CRM-42 ", "external_id", "crm-42"),
])
def test_each_user_data_key_follows_pinterest_rules(column: str, raw: str, key: str,
                                                    normalised: str) -> None:
    event = planned(row(**{column: raw}))
    assert event["user_data"][key] == [sha(normalised)]


def test_a_sha256_digest_in_any_case_passes_through_lowercased() -> None:
    digest = sha("jane@example.com")
    assert planned(row(email=digest.upper()))["user_data"]["em"] == [digest]


def test_event_shape_offline_with_raw_click_id_ip_and_user_agent() -> None:
    event = planned(row())
    assert event["event_name"] == "checkout"
    assert event["action_source"] == "offline"
    assert event["event_time"] == int((NOW - timedelta(hours=2)).timestamp())
    assert event["event_id"].startswith("ls_")
    user = event["user_data"]
    assert user["client_ip_address"] == "203.0.113.7"
    assert user["client_user_agent"] == "Mozilla/5.0"
    assert user["click_id"] == "dj0yJnU9b2JDcFFHekV4"
    # value is a string ("parsed into a double"); order_id carries the event id (dedup).
    assert event["custom_data"] == {"order_id": event["event_id"], "value": "1200.5",
                                    "currency": "EUR"}
    web = planned(row(event_source_url="https://example.com/t"), dest(shape="website"))
    assert web["action_source"] == "web" and web["event_source_url"] == "https://example.com/t"


def test_minimum_user_data_email_or_ip_with_user_agent() -> None:
    only_phone = row(email=None, client_ip=None)
    plan = plan_row(only_phone, dest(), pin, NOW)  # type: ignore[arg-type]
    assert isinstance(plan, Rejected) and plan.reason == "no_match_keys"
    ip_ua = planned(row(email=None, phone=None))
    assert "em" not in ip_ua["user_data"] and ip_ua["user_data"]["client_ip_address"]


def test_render_prints_the_request_shape_with_the_token_masked() -> None:
    lines = list(render_requests([row(), row(lead_id="L2", stage="lead")], dest(), CREDS, NOW))
    assert len(lines) == 1
    assert lines[0]["url"] == f"http://sandbox{PATH}"
    assert [e["event_name"] for e in lines[0]["body"]["data"]] == ["checkout", "lead"]
    assert TOKEN not in str(lines)
    test_creds = pin.parse_credentials(None, "t", {"ad_account_id": ACCOUNT, "test": True})
    assert pin.build_request([], test_creds, dest()).params == {"test": "true"}


# -- responses ----------------------------------------------------------------------------


def _ok(statuses: list[str]) -> dict[str, Any]:
    return {"num_events_received": len(statuses),
            "num_events_processed": statuses.count("processed"),
            "events": [{"status": s, "error_message": None if s == "processed" else "bad em",
                        "warning_message": None} for s in statuses]}


def test_parse_response_classes() -> None:
    import json

    ok = pin.parse_response(200, json.dumps(_ok(["processed"] * 3)), {}, 3)
    assert ok.kind is ResultKind.OK and ok.received == 3 and not ok.event_errors
    partial = pin.parse_response(422, json.dumps({
        "code": 4196, "message": "Not all events were successfully processed.",
        "details": _ok(["processed", "failed", "processed"])}), {}, 3)
    assert partial.kind is ResultKind.OK and partial.received == 2
    assert partial.event_errors == {1: "bad em"}
    throttled = pin.parse_response(429, '{"code": 8, "message": "rate limit"}',
                                   {"Retry-After": "7"}, 3)
    assert throttled.kind is ResultKind.TRANSIENT and throttled.retry_after == 7
    assert pin.parse_response(503, '{"code": 4197, "message": "ramped down"}', {},
                              1).kind is ResultKind.TRANSIENT
    fatal = pin.parse_response(401, '{"code": 2, "message": "Authentication failed."}', {}, 1)
    assert fatal.kind is ResultKind.FATAL and "leadsync_pinterest" in fatal.message
    assert pin.parse_response(400, '{"code": 4196, "message": "x"}', {},
                              1).kind is ResultKind.PERMANENT
    # G6: a 200 that lists nothing is not an acknowledgement.
    assert pin.parse_response(200, "{}", {}, 1).kind is ResultKind.TRANSIENT
    assert pin.parse_response(422, '{"code": 1, "message": "?"}', {},
                              2).kind is ResultKind.PERMANENT


# -- the emulator -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW.timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app(SandboxConfig(clock=Clock())))


def wire_event(event_id: str = "e1", **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_name": "lead", "action_source": "offline",
        "event_time": int(NOW.timestamp()) - 3600, "event_id": event_id,
        "user_data": {"em": [sha("jane@example.com")], "ph": [sha("16505550123")]},
        "custom_data": {"order_id": event_id, "value": "10.5", "currency": "USD"},
    }
    event.update(overrides)
    return event


def post(client: TestClient, events: list[Any], token: str = TOKEN, account: str = ACCOUNT,
         test: bool = False) -> Any:
    return client.post(f"/v5/ad_accounts/{account}/events", json={"data": events},
                       headers={"Authorization": f"Bearer {token}"},
                       params={"test": "true"} if test else None)


def stored(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    return list(client.get("/_sandbox/pinterest/events", params=params).json())


def stats(client: TestClient) -> dict[str, int]:
    return dict(client.get("/_sandbox/stats").json()["pinterest"])


def test_emulator_auth_schema_and_per_event_failures(client: TestClient) -> None:
    assert post(client, [wire_event()], token="nope").json() == {
        "code": 2, "message": "Authentication failed."}
    assert post(client, [wire_event()], account="1").status_code == 403
    bad_schema = post(client, [wire_event(), wire_event("e2", extra=1)])
    assert bad_schema.status_code == 400 and "data[1].extra" in bad_schema.json()["message"]
    assert post(client, [wire_event("e3", event_time=int(NOW.timestamp()) * 1000)]
                ).status_code == 422
    resp = post(client, [wire_event("ok"),
                         wire_event("raw", user_data={"em": ["jane@example.com"]}),
                         wire_event("nokey", user_data={"ph": [sha("16505550123")]})])
    assert resp.status_code == 422
    details = resp.json()["details"]
    assert details["num_events_processed"] == 1
    assert [e["status"] for e in details["events"]] == ["processed", "failed", "failed"]
    assert "SHA-256" in details["events"][1]["error_message"]
    assert "at least one of em" in details["events"][2]["error_message"]
    assert [e["event_id"] for e in stored(client)] == ["ok"]


def test_emulator_offline_events_are_never_deduplicated(client: TestClient) -> None:
    for _ in range(2):
        assert post(client, [wire_event("same")]).status_code == 200
        assert post(client, [wire_event("web", action_source="web")]).status_code == 200
    assert stats(client)["unique_events"] == 3  # offline twice, web once
    assert stats(client)["duplicate_events"] == 1
    assert post(client, [wire_event("t")], test=True).status_code == 200
    assert stats(client)["test_events"] == 1


def test_emulator_throttle_and_http_faults(client: TestClient) -> None:
    client.post("/_sandbox/faults", json={"platform": "pinterest", "faults": [
        {"kind": "throttle"}, {"kind": "http", "status": 502}]}).raise_for_status()
    assert post(client, [wire_event()]).json()["code"] == 8
    assert post(client, [wire_event()]).status_code == 502
    assert post(client, [wire_event()]).status_code == 200
    assert stats(client)["faulted_requests"] == 2


def test_the_destination_module_against_the_emulator(client: TestClient) -> None:
    """A mixed batch: Pinterest processes the others in the same request (one request, no
    resend: offline events are not deduplicated), the rejected one is a dead letter."""
    d = dest()
    envelopes = []
    for i in range(5):
        plan = plan_row(row(lead_id=f"L{i}", email=f"p{i}@example.com"), d, pin, NOW)  # type: ignore[arg-type]
        assert isinstance(plan, Planned)
        envelopes.append(plan.envelope)
    bad = envelopes[3]["event_id"]
    client.post("/_sandbox/faults", json={"platform": "pinterest", "faults": [
        {"kind": "reject_events", "event_ids": [bad]}]}).raise_for_status()
    report = BatchSender(pin, CREDS, d, TestClientTransport(client)).deliver(  # type: ignore[arg-type]
        envelopes, NOW)
    assert report.outcomes[bad].status == FAILED
    assert "rejected by the sandbox" in (report.outcomes[bad].detail or "")
    delivered = {e for e, o in report.outcomes.items() if o.status == DELIVERED}
    assert delivered == {e["event_id"] for e in envelopes} - {bad}
    assert {e["event_id"] for e in stored(client)} == delivered
    assert (stats(client)["requests"], report.acknowledged) == (1, 4)


def test_a_bad_token_stops_the_run(client: TestClient) -> None:
    creds = pin.parse_credentials("http://sandbox", "wrong", {"ad_account_id": ACCOUNT})
    plan = plan_row(row(), dest(), pin, NOW)  # type: ignore[arg-type]
    assert isinstance(plan, Planned)
    report = BatchSender(pin, creds, dest(), TestClientTransport(client)).deliver(  # type: ignore[arg-type]
        [plan.envelope], NOW)
    assert isinstance(report.error, FatalDestinationError)
    assert "leadsync_pinterest" in str(report.error)


def test_a_bad_email_is_dropped_and_pinterest_needs_ip_with_user_agent_then() -> None:
    """Through the data contract: an unusable email leaves the phone, which Pinterest cannot
    match on alone (quarantined no_match_keys); with IP and user agent the row is sent."""
    config = parse_config({"destinations": [{"name": "pinterest", "type": "pinterest",
                                             "stages": {"won": "checkout"}}]})
    d = config.destinations[0]
    rows = [row(email="anna@"), row(lead_id="L2", email="anna@", client_ip=None)]
    lines = list(render_requests(rows, d, CREDS, NOW, config=config))
    [request] = [line for line in lines if "body" in line]
    [event] = request["body"]["data"]
    assert "em" not in event["user_data"] and event["user_data"]["ph"] == [sha("16505550123")]
    [skipped] = [line["skipped"] for line in lines if "skipped" in line]
    assert (skipped["lead_id"], skipped["reason"]) == ("L2", "no_match_keys")

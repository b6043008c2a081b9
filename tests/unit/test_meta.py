"""The Meta Conversions API destination: credentials, events, requests, response classes, and
payloads the sandbox emulator accepts."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from leadsync import demo_data
from leadsync.config import DestinationConfig
from leadsync.destinations import get_destination, meta
from leadsync.destinations.base import MASK, CredentialsError, ResultKind
from leadsync.pipeline import Planned, plan_row
from leadsync.sandbox.app import SandboxConfig, create_app

TOKEN = "EAAB-secret-token-42"
PIXEL = "1234567890123456"
SANDBOX_TOKEN = "sandbox-meta-token"
NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
EVENT_TIME = NOW - timedelta(hours=3)
HEX64 = re.compile(r"^[0-9a-f]{64}$")
HASHED_KEYS = {"em", "ph", "fn", "ln", "ct", "st", "zp", "country", "db", "ge", "external_id"}

CRM = DestinationConfig(name="meta", type="meta", shape="crm", crm_name="HubSpot",
                        stages={"lead": "Lead", "qualified": "Marketing Qualified Lead",
                                "sales_accepted": "Sales Qualified Lead", "won": "Converted"})
WEBSITE = DestinationConfig(name="meta_web", type="meta", shape="website",
                            stages={"lead": "Lead", "qualified": "QualifiedLead",
                                    "sales_accepted": "SalesAcceptedLead", "won": "Purchase"})


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def creds(**extra: Any) -> meta.MetaCredentials:
    return meta.parse_credentials(None, TOKEN, {"pixel_id": PIXEL, **extra})


def full_row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "lead_id": "00Q1", "stage": "qualified", "event_time": EVENT_TIME,
        "updated_at": EVENT_TIME + timedelta(minutes=1),
        "email": "  Jane.Doe@Example.COM ", "phone": "(650) 555-1212", "country": "us",
        "first_name": "Jane", "last_name": "Doe", "city": "San Francisco", "state": "CA",
        "zip": "94103-1234", "date_of_birth": "1990-04-01", "gender": "F",
        "external_id": "crm-42", "client_ip": "203.0.113.7",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
        "event_source_url": "https://www.example.com/quiz",
        "fbc": "fb.1.1554763741205.AbCdEfGhIjKlMnOpQrStUvWxYz1234567890",
        "fbp": "fb.1.1558571054389.1098115397",
        "meta_lead_id": "1234567890123456", "value": Decimal("1250.50"), "currency": "EUR",
        "opted_out": False, "limited_data_use": None,
    }
    row.update(changes)
    return row


def build(row: dict[str, Any], dest: DestinationConfig = CRM, name: str = "MQL",
          event_id: str = "evt-1") -> dict[str, Any]:
    return meta.build_event(row, dest, name, event_id, EVENT_TIME)


# -- credentials ----------------------------------------------------------------------------


def test_parse_credentials_defaults() -> None:
    c = creds()
    assert c.base_url == "https://graph.facebook.com"
    assert c.api_version == "v25.0"
    assert c.pixel_id == PIXEL
    assert c.access_token == TOKEN
    assert c.test_event_code is None
    assert TOKEN not in repr(c)


def test_parse_credentials_host_version_and_test_code() -> None:
    c = meta.parse_credentials(" http://127.0.0.1:8765/ ", TOKEN,
                               {"pixel_id": f" {PIXEL} ", "api_version": "v24.0",
                                "test_event_code": "TEST123"})
    assert c.base_url == "http://127.0.0.1:8765"
    assert (c.pixel_id, c.api_version, c.test_event_code) == (PIXEL, "v24.0", "TEST123")
    assert meta.parse_credentials("graph.example.com", TOKEN, {"pixel_id": PIXEL}).base_url == \
        "https://graph.example.com"


@pytest.mark.parametrize(("password", "extra", "field"), [
    (None, {"pixel_id": PIXEL}, "'password'"),
    ("", {"pixel_id": PIXEL}, "'password'"),
    (TOKEN, {}, "'pixel_id'"),
    (TOKEN, {"pixel_id": "  "}, "'pixel_id'"),
    (TOKEN, {"pixel_id": "act_123456"}, "'pixel_id'"),
    (TOKEN, {"pixel_id": "123"}, "'pixel_id'"),
    (TOKEN, {"pixel_id": PIXEL, "api_version": "25.0"}, "'api_version'"),
    (TOKEN, {"pixel_id": PIXEL, "api_version": "v25"}, "'api_version'"),
    (TOKEN, {"pixel_id": PIXEL, "test_event_code": 12345}, "'test_event_code'"),
])
def test_parse_credentials_errors_name_the_field(password: str | None, extra: dict[str, Any],
                                                 field: str) -> None:
    with pytest.raises(CredentialsError) as info:
        meta.parse_credentials(None, password, extra)
    assert field in str(info.value)
    if password:
        assert password not in str(info.value)


def test_module_is_registered() -> None:
    assert get_destination("meta") is meta
    assert meta.LIMITS.max_batch_events == 1000
    assert meta.LIMITS.max_event_age == timedelta(days=7)


# -- events: CRM shape ----------------------------------------------------------------------


def test_crm_event_shape() -> None:
    event = build(full_row(), name="Marketing Qualified Lead", event_id="ls_abc")

    assert event["event_name"] == "Marketing Qualified Lead"
    assert event["event_id"] == "ls_abc"
    assert event["event_time"] == int(EVENT_TIME.timestamp())
    assert isinstance(event["event_time"], int)
    assert event["action_source"] == "system_generated"
    assert event["custom_data"]["event_source"] == "crm"
    assert event["custom_data"]["lead_event_source"] == "HubSpot"
    assert "event_source_url" not in event  # only for the website shape
    assert meta.check_event(event, CRM) is None


def test_crm_event_hashes_identifiers_as_hex_strings() -> None:
    # Meta takes each hashed field as a string or a list of strings (docs/platforms.md §1).
    user = build(full_row())["user_data"]

    assert HASHED_KEYS <= set(user)
    for key in HASHED_KEYS:
        assert isinstance(user[key], str) and HEX64.match(user[key]), key
    assert user["em"] == sha("jane.doe@example.com")
    assert user["ph"] == sha("16505551212")  # docs/platforms.md §1 example
    assert user["zp"] == sha("94103")
    assert user["country"] == sha("us")
    assert user["ge"] == sha("f")
    assert user["db"] == sha("19900401")
    # No raw identifier anywhere in the event.
    dumped = json.dumps(build(full_row()))
    for raw in ("Jane", "jane.doe", "5551212", "San Francisco", "94103", "crm-42", "1990"):
        assert raw not in dumped


def test_raw_fields_are_sent_raw() -> None:
    user = build(full_row())["user_data"]
    assert user["client_ip_address"] == "203.0.113.7"
    assert user["client_user_agent"] == "Mozilla/5.0 (X11; Linux x86_64)"
    assert user["fbc"] == "fb.1.1554763741205.AbCdEfGhIjKlMnOpQrStUvWxYz1234567890"
    assert user["fbp"] == "fb.1.1558571054389.1098115397"
    assert user["lead_id"] == "1234567890123456"


@pytest.mark.parametrize(("value", "sent"), [
    ("123456789012345", "123456789012345"),  # 15 digits
    ("1234567890123456", "1234567890123456"),
    ("12345678901234567", "12345678901234567"),  # 17 digits
    (1234567890123456, "1234567890123456"),  # an integer column
    (" 1234567890123456 ", "1234567890123456"),
    ("12345678901234", None),  # 14
    ("123456789012345678", None),  # 18
    ("12345678901234a", None),
    ("", None),
    (None, None),
])
def test_lead_id_only_when_15_to_17_digits(value: Any, sent: str | None) -> None:
    user = build(full_row(meta_lead_id=value))["user_data"]
    assert user.get("lead_id") == sent


@pytest.mark.parametrize("column", ["fbc", "fbp"])
def test_malformed_cookies_are_dropped(column: str) -> None:
    assert column not in build(full_row(**{column: "not-a-cookie"}))["user_data"]
    assert column not in build(full_row(**{column: "  "}))["user_data"]


@pytest.mark.parametrize(("value", "currency", "custom"), [
    (Decimal("1250.50"), "EUR", {"value": 1250.5, "currency": "eur"}),
    ("99", "usd", {"value": 99.0, "currency": "usd"}),
    (0, "GBP", {"value": 0.0, "currency": "gbp"}),
    (120, None, {}),  # no currency: neither is sent
    (None, "USD", {}),
    (-5, "USD", {}),
    ("NaN", "USD", {}),
    ("abc", "USD", {}),
    (100, "US$", {}),
])
def test_value_and_currency(value: Any, currency: str | None, custom: dict[str, Any]) -> None:
    got = build(full_row(value=value, currency=currency))["custom_data"]
    assert {k: v for k, v in got.items() if k in ("value", "currency")} == custom


@pytest.mark.parametrize("flag", [True, 1, "true", "t", "1"])
def test_limited_data_use(flag: Any) -> None:
    event = build(full_row(limited_data_use=flag))
    assert event["data_processing_options"] == ["LDU"]
    assert event["data_processing_options_country"] == 0
    assert event["data_processing_options_state"] == 0


@pytest.mark.parametrize("flag", [None, False, 0, "false", "no"])
def test_no_limited_data_use(flag: Any) -> None:
    assert "data_processing_options" not in build(full_row(limited_data_use=flag))


def test_opted_out_rows_are_not_sent() -> None:
    assert meta.check_row(full_row(opted_out=True), CRM) is not None
    assert meta.check_row(full_row(opted_out=True), CRM).reason == "opted_out"  # type: ignore
    assert meta.check_row(full_row(opted_out=False), CRM) is None
    assert meta.check_row(full_row(opted_out=None), CRM) is None


# -- events: website shape ------------------------------------------------------------------


def test_website_event_shape() -> None:
    event = build(full_row(), dest=WEBSITE, name="QualifiedLead")
    assert event["action_source"] == "website"
    assert event["event_source_url"] == "https://www.example.com/quiz"
    assert event["user_data"]["client_user_agent"].startswith("Mozilla/5.0")
    assert "event_source" not in event.get("custom_data", {})
    assert "lead_event_source" not in event.get("custom_data", {})
    assert meta.check_event(event, WEBSITE) is None


def test_website_shape_with_another_action_source() -> None:
    dest = WEBSITE.model_copy(update={"action_source": "phone_call"})
    assert build(full_row(), dest=dest)["action_source"] == "phone_call"


@pytest.mark.parametrize("missing", ["user_agent", "event_source_url"])
def test_website_event_needs_user_agent_and_url(missing: str) -> None:
    event = build(full_row(**{missing: None}), dest=WEBSITE)
    skip = meta.check_event(event, WEBSITE)
    assert skip is not None
    assert skip.reason == "website_event_needs_user_agent_and_url"


def test_no_match_keys() -> None:
    bare = {k: None for k in full_row()} | {"lead_id": "00Q9", "stage": "lead",
                                             "event_time": EVENT_TIME}
    skip = meta.check_event(build(bare), CRM)
    assert skip is not None and skip.reason == "no_match_keys"
    # An IP alone is no match key; IP with user agent is.
    ip_only = meta.check_event(build({**bare, "client_ip": "203.0.113.9"}), CRM)
    assert ip_only is not None and ip_only.reason == "no_match_keys"
    assert meta.check_event(build({**bare, "client_ip": "203.0.113.9",
                                   "user_agent": "Mozilla/5.0"}), CRM) is None
    # Unusable values do not count as keys either.
    assert meta.check_event(build({**bare, "email": "not an email", "fbc": "junk"}), CRM) \
        is not None
    for key, value in (("email", "a@example.com"), ("phone", "+1 650 555 1212"),
                       ("external_id", "x1"), ("meta_lead_id", "123456789012345"),
                       ("fbp", "fb.1.1558571054389.1098115397")):
        assert meta.check_event(build({**bare, key: value}), CRM) is None, key


# -- requests -------------------------------------------------------------------------------


def test_build_request() -> None:
    events = [build(full_row(), event_id=f"e{i}") for i in range(3)]
    request = meta.build_request(events, creds(), CRM)

    assert request.method == "POST"
    assert request.url == f"https://graph.facebook.com/v25.0/{PIXEL}/events"
    assert set(request.body) <= {"data", "access_token", "test_event_code"}
    assert request.body["data"] == events
    assert request.body["access_token"] == TOKEN
    assert "test_event_code" not in request.body


def test_build_request_with_test_event_code() -> None:
    request = meta.build_request([build(full_row())], creds(test_event_code="TEST42"), CRM)
    assert request.body["test_event_code"] == "TEST42"
    assert set(request.body) == {"data", "access_token", "test_event_code"}


def test_token_only_in_the_body_and_masked() -> None:
    request = meta.build_request([build(full_row())], creds(), CRM)

    assert TOKEN not in request.url
    assert TOKEN not in json.dumps(request.headers)
    assert TOKEN not in json.dumps(request.params)
    masked = request.masked()
    assert masked["body"]["access_token"] == MASK
    assert masked["body"]["data"] == request.body["data"]
    assert TOKEN not in json.dumps(masked)
    assert request.body["access_token"] == TOKEN  # masking does not touch the request


# -- responses ------------------------------------------------------------------------------


def graph_error(code: int, subcode: int | None = None, *, transient: bool = False,
                message: str = "An error occurred", title: str = "",
                user_msg: str = "") -> str:
    error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code,
                             "is_transient": transient, "fbtrace_id": "AbC"}
    if subcode is not None:
        error["error_subcode"] = subcode
    if title:
        error["error_user_title"] = title
    if user_msg:
        error["error_user_msg"] = user_msg
    return json.dumps({"error": error})


def parse(status: int, body: str, headers: dict[str, str] | None = None) -> Any:
    return meta.parse_response(status, body, headers or {}, 10)


def test_success() -> None:
    result = parse(200, json.dumps({"events_received": 10, "messages": [], "fbtrace_id": "x"}))
    assert result.kind is ResultKind.OK
    assert result.received == 10


def test_success_reports_what_was_received() -> None:
    result = parse(200, json.dumps({"events_received": 7}))
    assert (result.kind, result.received) == (ResultKind.OK, 7)


@pytest.mark.parametrize("body", [{}, {"fbtrace_id": "x"}, {"events_received": "10"},
                                  {"events_received": None}])
def test_success_without_events_received_is_not_a_success(body: dict[str, Any]) -> None:
    result = parse(200, json.dumps(body))
    assert result.kind is not ResultKind.OK  # G6: unacknowledged is never delivered
    assert result.kind is ResultKind.TRANSIENT


@pytest.mark.parametrize(("code", "subcode", "status"), [
    (190, None, 400), (190, 460, 400), (190, 463, 401), (200, None, 403), (10, None, 400),
    (102, None, 400), (100, 33, 400),
])
def test_fatal_codes(code: int, subcode: int | None, status: int) -> None:
    result = parse(status, graph_error(code, subcode, message="Invalid OAuth access token."))
    assert result.kind is ResultKind.FATAL
    assert str(code) in result.message
    assert "token" in result.message.lower() or "pixel" in result.message.lower()


def test_fatal_wins_over_is_transient() -> None:
    assert parse(400, graph_error(190, transient=True)).kind is ResultKind.FATAL


@pytest.mark.parametrize("code", [1, 2, 4, 17, 32, 341, 368, 613, 5000, 21009, 80003])
def test_transient_codes(code: int) -> None:
    result = parse(400, graph_error(code))
    assert result.kind is ResultKind.TRANSIENT
    assert result.code == str(code)


@pytest.mark.parametrize("code", [4, 17, 32, 613, 80003])
def test_throttle_codes_get_a_retry_hint(code: int) -> None:
    assert parse(400, graph_error(code)).retry_after == 60.0
    assert parse(400, graph_error(code), {"Retry-After": "7"}).retry_after == 7.0


@pytest.mark.parametrize("code", [1, 2, 341, 5000])
def test_non_throttle_transient_codes_have_no_default_hint(code: int) -> None:
    assert parse(500, graph_error(code)).retry_after is None


def test_is_transient_flag_makes_any_code_transient() -> None:
    result = parse(400, graph_error(999, transient=True))
    assert result.kind is ResultKind.TRANSIENT


def test_graph_error_with_5xx_is_transient() -> None:
    assert parse(503, graph_error(999)).kind is ResultKind.TRANSIENT


@pytest.mark.parametrize(("subcode", "title"), [
    (2804003, "Event Timestamp Too Old"), (2804009, "Missing Value for Purchase Event"),
    (2804001, "Invalid Parameter"), (None, "Invalid parameter"), (2804050, "Missing user data"),
])
def test_code_100_is_permanent(subcode: int | None, title: str) -> None:
    result = parse(400, graph_error(100, subcode, title=title, user_msg="fix the event"))
    assert result.kind is ResultKind.PERMANENT
    assert result.code == (f"100/{subcode}" if subcode else "100")
    assert title in result.message
    assert "fix the event" in result.message


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_non_json_server_errors_are_transient(status: int) -> None:
    result = parse(status, "<html><body>Bad Gateway</body></html>", {"Retry-After": "3"})
    assert result.kind is ResultKind.TRANSIENT
    assert result.retry_after == 3.0
    assert str(status) in result.message


@pytest.mark.parametrize("status", [404, 401, 403])
def test_non_json_not_found_is_fatal(status: int) -> None:
    result = parse(status, "<html>Not Found</html>")
    assert result.kind is ResultKind.FATAL
    assert "pixel_id" in result.message


def test_non_json_400_is_permanent() -> None:
    assert parse(400, "bad request").kind is ResultKind.PERMANENT


def test_empty_body_5xx_is_transient() -> None:
    assert parse(502, "").kind is ResultKind.TRANSIENT


# -- against the sandbox emulator -----------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> TestClient:
    return TestClient(create_app(SandboxConfig(meta_tokens={SANDBOX_TOKEN},
                                               meta_pixels={PIXEL})))


def post(client: TestClient, request: Any) -> Any:
    return client.post(urlsplit(request.url).path, json=request.body, headers=request.headers)


def _plan(rows: list[dict[str, Any]], dest: DestinationConfig,
          now: datetime) -> list[Planned]:
    return [p for p in (plan_row(r, dest, meta, now) for r in rows) if isinstance(p, Planned)]


@pytest.mark.parametrize("dest", [CRM, WEBSITE], ids=["crm", "website"])
def test_sandbox_accepts_built_payloads_for_demo_rows(sandbox: TestClient,
                                                      dest: DestinationConfig) -> None:
    now = datetime.now(UTC)
    rows = list(demo_data.generate_funnel(400, now, seed=3))
    planned = _plan(rows, dest, now)
    assert len(planned) >= (300 if dest is CRM else 100)
    sandbox_creds = meta.parse_credentials("http://sandbox", SANDBOX_TOKEN, {"pixel_id": PIXEL})

    for start in range(0, len(planned), 250):
        events = [p.envelope["body"] for p in planned[start:start + 250]]
        response = post(sandbox, meta.build_request(events, sandbox_creds, dest))
        assert response.status_code == 200, response.text
        result = meta.parse_response(response.status_code, response.text,
                                     dict(response.headers), len(events))
        assert (result.kind, result.received) == (ResultKind.OK, len(events))

    stored = sandbox.get("/_sandbox/meta/events",
                         params={"pixel_id": PIXEL, "unique": True}).json()
    stored_ids = {e["event_id"] for e in stored}
    assert {p.event_id for p in planned} <= stored_ids


def test_sandbox_errors_are_classified(sandbox: TestClient) -> None:
    now = datetime.now(UTC)
    good = build(full_row())
    good["event_time"] = int((now - timedelta(hours=1)).timestamp())
    old = {**good, "event_id": "too-old", "event_time": int((now - timedelta(days=8)).timestamp())}

    bad_token = meta.parse_credentials("http://sandbox", "wrong", {"pixel_id": PIXEL})
    response = post(sandbox, meta.build_request([good], bad_token, CRM))
    result = meta.parse_response(response.status_code, response.text, dict(response.headers), 1)
    assert result.kind is ResultKind.FATAL
    assert "wrong" not in result.message

    other_pixel = meta.parse_credentials("http://sandbox", SANDBOX_TOKEN,
                                         {"pixel_id": "9999999999"})
    response = post(sandbox, meta.build_request([good], other_pixel, CRM))
    result = meta.parse_response(response.status_code, response.text, dict(response.headers), 1)
    assert (result.kind, result.code) == (ResultKind.FATAL, "100/33")

    ok = meta.parse_credentials("http://sandbox", SANDBOX_TOKEN, {"pixel_id": PIXEL})
    response = post(sandbox, meta.build_request([good, old], ok, CRM))
    result = meta.parse_response(response.status_code, response.text, dict(response.headers), 2)
    assert (result.kind, result.code) == (ResultKind.PERMANENT, "100/2804003")

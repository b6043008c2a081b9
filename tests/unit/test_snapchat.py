"""The Snap Conversions API v3 destination: each identifier rule held against the examples on
Snap's Parameters page, payload shapes, response classes, and what the sender makes of them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from leadsync.config import ConfigError, DestinationConfig, RetryConfig, parse_config
from leadsync.delivery import BatchSender
from leadsync.destinations import get_destination
from leadsync.destinations import snapchat as sc
from leadsync.destinations.base import CredentialsError, FatalDestinationError, ResultKind
from leadsync.destinations.http import HttpResponse
from leadsync.pipeline import Planned, plan_row, render_requests
from leadsync.state import DELIVERED, FAILED
from tests.unit.sandbox_transport import sha

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
PIXEL = "1ec32188-754e-4be2-8e55-c949a984a39f"  # the pixel id of Snap's Verify Set Up example
CREDS = sc.parse_credentials(None, "tok", {"pixel_id": PIXEL})


def dest(**overrides: Any) -> DestinationConfig:
    base: dict[str, Any] = {"name": "snapchat", "type": "snapchat",
                            "stages": {"lead": "SIGN_UP", "won": "PURCHASE"},
                            "retry": RetryConfig(attempts=3)}
    base.update(overrides)
    return DestinationConfig(**base)


def row(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "lead_id": "L1", "stage": "won", "event_time": NOW - timedelta(hours=2),
        "updated_at": NOW - timedelta(hours=1), "email": "Person@Example.com",
        "phone": "+44 844 412 4653", "first_name": "John", "last_name": "Raphaël",
        "country": "gb", "sc_click_id": "7c4e5b8a-1d2f-4a3b-9c8d-0e1f2a3b4c5d",
        "sc_cookie1": "a1b2c3d4-scid", "client_ip": "203.0.113.7", "user_agent": "Mozilla/5.0",
        "value": "10", "currency": "usd",
    }
    base.update(overrides)
    return base


def planned(r: dict[str, Any], d: DestinationConfig | None = None) -> dict[str, Any]:
    plan = plan_row(r, d or dest(), sc, NOW)  # type: ignore[arg-type]
    assert isinstance(plan, Planned), plan
    return plan.envelope["body"]


def user(**overrides: Any) -> dict[str, Any]:
    return dict(planned(row(**overrides))["user_data"])


# -- Snap's own examples (developers.snap.com, Conversions API > Parameters) -----------------


def test_email_example() -> None:
    # Input: Person@Example.com → person@example.com → 542d2401...
    assert user()["em"] == ["542d240129883c019e106e3b1b2d3f3cb3537c43c425364de8e951d5a3083345"]


@pytest.mark.parametrize("phone", ["+44 844 412 4653", "0044 844 412 4653", "(+44) 844-412-4653"])
def test_phone_example(phone: str) -> None:
    # Input: +44 844 412 4653 → 448444124653 → dc008fda... ('+', '00' and separators go).
    assert user(phone=phone)["ph"] == [
        "dc008fda46e2e64002cf2f82a4906236282d431c4f75e5b60bfe79fc48546383"]


def test_phone_national_number_gets_the_rows_country_and_loses_its_leading_zero() -> None:
    # "If the number itself begins with a 0, this should be removed": 0844 … in GB.
    assert user(phone="0844 412 4653", country="GB")["ph"] == [sha("448444124653")]
    assert "ph" not in user(phone="0844 412 4653", country=None)  # no country: not guessed


@pytest.mark.parametrize(("name", "digest"), [
    ("John", "96d9632f363564cc3032521409cf22a852f2032eec099ed5967c0d000cec607a"),
    ("Raphaël", "e74bb89e718fe1e19c422a48382870399f8bf7ca8dfa008739e75b0be76627b7"),
])
def test_name_examples(name: str, digest: str) -> None:
    assert user(first_name=name)["fn"] == [digest]
    assert user(last_name=name)["ln"] == [digest]


def test_names_lose_punctuation() -> None:
    assert user(last_name="O'Brien-Smith.")["ln"] == [sha("obriensmith")]


def test_other_hashed_fields_and_raw_click_ids() -> None:
    data = user(gender="Female", city="San Francisco", state="California", zip="94105-1234",
                country="US", external_id=" CRM-42 ")
    assert data["ge"] == [sha("f")]
    assert data["ct"] == [sha("sanfrancisco")]
    assert data["st"] == [sha("ca")]
    assert data["zp"] == [sha("94105")]
    assert data["country"] == [sha("us")]
    assert data["external_id"] == [sha("crm-42")]
    assert data["sc_click_id"] == "7c4e5b8a-1d2f-4a3b-9c8d-0e1f2a3b4c5d"
    assert data["sc_cookie1"] == "a1b2c3d4-scid"
    assert data["client_ip_address"] == "203.0.113.7"
    assert data["client_user_agent"] == "Mozilla/5.0"


def test_an_upper_case_digest_is_sent_lower_cased() -> None:
    digest = sha("person@example.com")
    assert user(email=digest.upper())["em"] == [digest]


def test_junk_is_left_out() -> None:
    data = user(email="n/a", phone="12", sc_click_id="has space")
    assert not {"em", "ph", "sc_click_id"} & set(data)
    assert "client_ip_address" not in user(client_ip="300.1.1.1")


# -- events, config, requests ---------------------------------------------------------------


def test_offline_event_shape() -> None:
    event = planned(row(limited_data_use=True))
    assert event["event_name"] == "PURCHASE"
    assert event["event_time"] == int((NOW - timedelta(hours=2)).timestamp())  # seconds
    assert event["action_source"] == "OFFLINE"
    assert event["event_id"].startswith("ls_")
    assert event["custom_data"] == {"value": 10.0, "currency": "USD"}
    assert event["data_processing_options"] == ["LDU"]
    assert "event_source_url" not in event


def test_website_shape_needs_the_page_url() -> None:
    web = dest(shape="website")
    event = planned(row(event_source_url="https://example.com/quiz"), web)
    assert (event["action_source"], event["event_source_url"]) == ("WEB",
                                                                    "https://example.com/quiz")
    plan = plan_row(row(), web, sc, NOW)  # type: ignore[arg-type]
    assert not isinstance(plan, Planned) and plan.reason == "website_event_needs_url"


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"opted_out": True}, "opted_out"),
    ({"email": None, "phone": None, "client_ip": None}, "no_match_keys"),
    ({"email": None, "phone": None, "user_agent": None}, "no_match_keys"),
    ({"value": None}, "purchase_needs_value_and_currency"),
])
def test_rows_snap_would_reject_are_skipped(overrides: dict[str, Any], reason: str) -> None:
    plan = plan_row(row(**overrides), dest(), sc, NOW)  # type: ignore[arg-type]
    assert not isinstance(plan, Planned) and plan.reason == reason


def test_ip_with_user_agent_is_enough_and_a_sign_up_needs_no_value() -> None:
    planned(row(email=None, phone=None))
    planned(row(stage="lead", value=None))


def test_age_window_is_37_days() -> None:
    old = row(event_time=NOW - timedelta(days=38), updated_at=NOW - timedelta(days=38))
    plan = plan_row(old, dest(), sc, NOW)  # type: ignore[arg-type]
    assert not isinstance(plan, Planned) and plan.status == "expired"
    planned(row(event_time=NOW - timedelta(days=30), updated_at=NOW - timedelta(days=30)))


def test_config_wants_snap_standard_event_names() -> None:
    with pytest.raises(ConfigError, match=r"stages\.won: 'Converted' is not a Snap standard"):
        parse_config({"destinations": [{"name": "snap", "type": "snapchat",
                                        "stages": {"won": "Converted"}}]})


def test_credentials_name_the_missing_or_bad_field() -> None:
    with pytest.raises(CredentialsError, match="'password'"):
        sc.parse_credentials(None, None, {"pixel_id": PIXEL})
    with pytest.raises(CredentialsError, match="'pixel_id'"):
        sc.parse_credentials(None, "tok", {})
    with pytest.raises(CredentialsError, match="'pixel_id' must be"):
        sc.parse_credentials(None, "tok", {"pixel_id": "bad pixel/../x"})
    with pytest.raises(CredentialsError, match="'test_mode'"):
        sc.parse_credentials(None, "tok", {"pixel_id": PIXEL, "test_mode": "yes"})
    assert "s3cr3t" not in repr(sc.parse_credentials(None, "s3cr3t", {"pixel_id": PIXEL}))
    assert get_destination("snapchat") is sc


def test_request_carries_the_token_in_a_masked_header_and_test_mode_validates() -> None:
    request = sc.build_request([planned(row())], CREDS, dest())
    assert request.url == f"https://tr.snapchat.com/v3/{PIXEL}/events"
    assert request.headers["Authorization"] == "Bearer tok" and not request.params
    assert "Bearer tok" not in json.dumps(request.masked())
    test = sc.parse_credentials(None, "tok", {"pixel_id": PIXEL, "test_mode": True})
    assert sc.build_request([], test, dest()).url.endswith("/events/validate")


def test_render_batches_at_most_2000() -> None:
    rows = [row(lead_id=f"L{i}") for i in range(2001)]
    sizes = [len(r["body"]["data"]) for r in render_requests(rows, dest(), CREDS, NOW)
             if "body" in r]
    assert sizes == [2000, 1]


# -- responses ------------------------------------------------------------------------------


def parse(status: int, body: Any, n: int = 3) -> Any:
    return sc.parse_response(status, json.dumps(body), {}, n)


def test_valid_and_invalid() -> None:
    assert parse(200, {"status": "VALID", "reason": "ok"}).kind is ResultKind.OK
    result = parse(400, {"status": "INVALID", "reason": "Unhashed PII", "event": 2,
                         "errors": {"codes": ["UNHASHED_PII"], "error_msgs": ["em"]}})
    assert result.kind is ResultKind.PERMANENT and list(result.event_errors) == [2]
    assert "Unhashed PII" in result.event_errors[2]
    assert parse(400, {"status": "INVALID", "reason": "x", "event": 9}).event_errors == {}


@pytest.mark.parametrize(("status", "body", "kind"), [
    (401, {"status": "INVALID", "reason": "Unauthorized"}, ResultKind.FATAL),
    (403, {"status": "INVALID"}, ResultKind.FATAL),
    (429, {"status": "INVALID", "reason": "Too many requests"}, ResultKind.TRANSIENT),
    (500, "<html>oops</html>", ResultKind.TRANSIENT),
    (200, {"ok": True}, ResultKind.TRANSIENT),  # G6: no Snap status, no acknowledgement
    (404, "<html>no</html>", ResultKind.FATAL),
])
def test_status_classes(status: int, body: Any, kind: ResultKind) -> None:
    assert parse(status, body).kind is kind


# -- the sender -----------------------------------------------------------------------------


class ScriptedClient:
    def __init__(self, *answers: tuple[int, dict[str, Any]]) -> None:
        self.answers = list(answers)
        self.bodies: list[dict[str, Any]] = []

    def send(self, request: Any) -> HttpResponse:
        self.bodies.append(json.loads(json.dumps(request.body)))
        status, body = self.answers.pop(0)
        return HttpResponse(status, json.dumps(body), {})


def envelopes(n: int) -> list[dict[str, Any]]:
    return [{"event_id": f"e{i}", "event_time": int(NOW.timestamp()) - 60,
             "body": planned(row(lead_id=f"L{i}"))} for i in range(n)]


def test_a_rejected_event_is_dropped_and_the_rest_lands_once() -> None:
    client = ScriptedClient((400, {"status": "INVALID", "reason": "bad", "event": 0}),
                            (200, {"status": "VALID"}))
    report = BatchSender(sc, CREDS, dest(), client, sleep=lambda s: None).deliver(  # type: ignore[arg-type]
        envelopes(3), NOW)
    assert report.outcomes["e0"].status == FAILED
    assert {report.outcomes[e].status for e in ("e1", "e2")} == {DELIVERED}
    assert [len(b["data"]) for b in client.bodies] == [3, 2]


def test_a_bad_token_stops_the_run() -> None:
    client = ScriptedClient((401, {"status": "INVALID", "reason": "Unauthorized"}))
    report = BatchSender(sc, CREDS, dest(), client).deliver(envelopes(2), NOW)  # type: ignore[arg-type]
    assert isinstance(report.error, FatalDestinationError)
    assert "leadsync_snapchat" in str(report.error) and report.outcomes == {}

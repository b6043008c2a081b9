"""The TikTok Events API destination: identity rules, payload shapes, response classes, and
what the sender makes of them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from leadsync.config import DestinationConfig, RetryConfig
from leadsync.delivery import BatchSender
from leadsync.destinations import get_destination
from leadsync.destinations import tiktok as tt
from leadsync.destinations.base import CredentialsError, FatalDestinationError, ResultKind
from leadsync.destinations.http import HttpResponse
from leadsync.pipeline import Planned, plan_row, render_requests
from leadsync.state import DELIVERED, FAILED
from tests.unit.sandbox_transport import sha

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
CREDS = tt.parse_credentials(None, "tok", {"event_source_id": "CRMSET0001",
                                           "test_event_code": "TEST123"})


def dest(**overrides: Any) -> DestinationConfig:
    base: dict[str, Any] = {"name": "tiktok", "type": "tiktok", "crm_name": "HubSpot",
                            "stages": {"lead": "Lead", "won": "Converted"},
                            "retry": RetryConfig(attempts=3)}
    base.update(overrides)
    return DestinationConfig(**base)


def row(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "lead_id": "L1", "stage": "won", "event_time": NOW - timedelta(hours=2),
        "updated_at": NOW - timedelta(hours=1), "email": "  Jane.Doe+x@GMail.com ",
        "phone": "(650) 555-0123", "country": "us", "external_id": " CRM-42 ",
        "ttclid": "E.C.P.abc123", "ttp": "ttp-cookie", "client_ip": "203.0.113.7",
        "user_agent": "Mozilla/5.0", "tiktok_lead_id": "7123456789012345678",
        "value": "1200.50", "currency": "eur",
    }
    base.update(overrides)
    return base


def planned(r: dict[str, Any], d: DestinationConfig | None = None) -> dict[str, Any]:
    plan = plan_row(r, d or dest(), tt, NOW)  # type: ignore[arg-type]
    assert isinstance(plan, Planned), plan
    return plan.envelope["body"]


# -- credentials --------------------------------------------------------------------------


def test_credentials_name_the_missing_field() -> None:
    with pytest.raises(CredentialsError, match="'password'"):
        tt.parse_credentials(None, None, {"event_source_id": "X1234"})
    with pytest.raises(CredentialsError, match="'event_source_id'"):
        tt.parse_credentials(None, "tok", {})
    with pytest.raises(CredentialsError, match="'event_source_id' must be"):
        tt.parse_credentials(None, "tok", {"event_source_id": "bad id!"})
    creds = tt.parse_credentials("localhost:1234/", "s3cr3t", {"event_source_id": "X1234"})
    assert creds.base_url == "https://localhost:1234"
    assert "s3cr3t" not in repr(creds)


def test_registered_as_destination_type() -> None:
    assert get_destination("tiktok") is tt


# -- events -------------------------------------------------------------------------------


def test_crm_event_hashes_by_tiktok_rules_and_keeps_click_ids_raw() -> None:
    event = planned(row())
    assert event["event"] == "Converted"
    assert event["event_time"] == int((NOW - timedelta(hours=2)).timestamp())
    assert event["event_id"].startswith("ls_")
    user = event["user"]
    # No gmail rule for TikTok: trim + lowercase only.
    assert user["email"] == sha("jane.doe+x@gmail.com")
    # E.164 *with* the '+'.
    assert user["phone"] == sha("+16505550123")
    assert user["external_id"] == sha("crm-42")
    assert user["ttclid"] == "E.C.P.abc123"
    assert user["ttp"] == "ttp-cookie"
    assert user["ip"] == "203.0.113.7"
    assert user["user_agent"] == "Mozilla/5.0"
    assert event["lead"] == {"lead_event_source": "HubSpot", "lead_id": "7123456789012345678"}
    assert event["properties"] == {"value": 1200.5, "currency": "EUR"}
    assert "page" not in event


def test_website_shape_has_page_and_no_lead() -> None:
    event = planned(row(event_source_url="https://example.com/quiz"), dest(shape="website"))
    assert event["page"] == {"url": "https://example.com/quiz"}
    assert "lead" not in event


def test_empty_and_junk_values_are_omitted() -> None:
    event = planned(row(email=" ", phone="n/a", client_ip="not-an-ip", value=None,
                        tiktok_lead_id="abc"))
    assert "email" not in event["user"] and "phone" not in event["user"]
    assert "ip" not in event["user"]
    assert "properties" not in event
    assert event["lead"] == {"lead_event_source": "HubSpot"}


def test_already_hashed_values_pass_through() -> None:
    digest = sha("jane@example.com").upper()
    assert planned(row(email=digest))["user"]["email"] == digest.lower()


def test_limited_data_use_flag() -> None:
    assert planned(row(limited_data_use=True))["limited_data_use"] is True
    assert "limited_data_use" not in planned(row(limited_data_use=None))


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"opted_out": True}, "opted_out"),
    ({"email": None, "phone": None, "external_id": None, "ttclid": None, "ttp": None,
      "tiktok_lead_id": None, "client_ip": None}, "no_match_keys"),
])
def test_ineligible_rows(overrides: dict[str, Any], reason: str) -> None:
    plan = plan_row(row(**overrides), dest(), tt, NOW)  # type: ignore[arg-type]
    assert not isinstance(plan, Planned) and plan.reason == reason


def test_ip_and_user_agent_together_are_enough() -> None:
    planned(row(email=None, phone=None, external_id=None, ttclid=None, ttp=None,
                tiktok_lead_id=None))


def test_event_older_than_the_window_expires() -> None:
    plan = plan_row(row(event_time=NOW - timedelta(days=40)), dest(), tt, NOW)  # type: ignore[arg-type]
    assert not isinstance(plan, Planned) and plan.status == "expired"


def test_request_shape_and_masking() -> None:
    request = tt.build_request([planned(row())], CREDS, dest())
    assert request.url == "https://business-api.tiktok.com/open_api/v1.3/event/track/"
    assert request.headers["Access-Token"] == "tok"
    assert request.body is not None
    assert request.body["event_source"] == "crm"
    assert request.body["event_source_id"] == "CRMSET0001"
    assert request.body["test_event_code"] == "TEST123"
    assert request.masked()["headers"]["Access-Token"] == "***"
    web = tt.build_request([], CREDS, dest(shape="website"))
    assert web.body is not None and web.body["event_source"] == "web"


def test_render_batches_at_most_1000() -> None:
    rows = [row(lead_id=f"L{i}") for i in range(1001)]
    sizes = [len(r["body"]["data"]) for r in render_requests(rows, dest(), CREDS, NOW)
             if "body" in r]
    assert sizes == [1000, 1]


# -- responses ------------------------------------------------------------------------------


def parse(code: Any, message: str = "", status: int = 200, n: int = 3) -> Any:
    body = json.dumps({"code": code, "message": message, "request_id": "r", "data": {}})
    return tt.parse_response(status, body, {}, n)


@pytest.mark.parametrize(("code", "kind"), [
    (0, ResultKind.OK),
    (20001, ResultKind.OK),
    (40100, ResultKind.TRANSIENT),
    (40700, ResultKind.TRANSIENT),
    (50002, ResultKind.TRANSIENT),
    (40001, ResultKind.FATAL),
    (40002, ResultKind.PERMANENT),
    (40006, ResultKind.PERMANENT),
])
def test_body_code_decides_with_http_200(code: int, kind: ResultKind) -> None:
    assert parse(code).kind is kind


def test_invalid_params_names_the_bad_events() -> None:
    result = parse(40002, "Batch.2.properties.contents.0.content_id: Not a valid string", n=3)
    assert result.kind is ResultKind.PERMANENT
    assert list(result.event_errors) == [2]
    assert parse(40002, "Batch.7.user.email: bad", n=3).event_errors == {}


@pytest.mark.parametrize(("status", "body", "kind"), [
    (502, "<html>Bad Gateway</html>", ResultKind.TRANSIENT),
    (429, "", ResultKind.TRANSIENT),
    (401, "", ResultKind.FATAL),
    (200, "<html>ok</html>", ResultKind.TRANSIENT),
    (400, "nope", ResultKind.PERMANENT),
])
def test_http_level_outcomes(status: int, body: str, kind: ResultKind) -> None:
    assert tt.parse_response(status, body, {}, 1).kind is kind


# -- the sender -----------------------------------------------------------------------------


class ScriptedClient:
    """Answers each request with the next scripted (status, body) and records the events."""

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
    client = ScriptedClient((200, {"code": 40002, "message": "Batch.1.user.email: bad"}),
                            (200, {"code": 0, "message": "OK"}))
    report = BatchSender(tt, CREDS, dest(), client, sleep=lambda s: None).deliver(  # type: ignore[arg-type]
        envelopes(3), NOW)
    assert report.outcomes["e1"].status == FAILED
    assert "Batch.1.user.email" in (report.outcomes["e1"].detail or "")
    assert {report.outcomes[e].status for e in ("e0", "e2")} == {DELIVERED}
    assert [len(b["data"]) for b in client.bodies] == [3, 2]
    assert report.acknowledged == 2


def test_throttling_is_retried_then_fatal_stops() -> None:
    client = ScriptedClient((200, {"code": 40100, "message": "Too many requests."}),
                            (200, {"code": 0, "message": "OK"}))
    delays: list[float] = []
    report = BatchSender(tt, CREDS, dest(), client, sleep=delays.append).deliver(  # type: ignore[arg-type]
        envelopes(2), NOW)
    assert report.count(DELIVERED) == 2 and report.retries == 1 and len(delays) == 1
    client = ScriptedClient((200, {"code": 40001, "message": "No permission"}))
    report = BatchSender(tt, CREDS, dest(), client).deliver(envelopes(2), NOW)  # type: ignore[arg-type]
    assert isinstance(report.error, FatalDestinationError)
    assert report.outcomes == {}

"""The LinkedIn Conversions API destination: credentials, identifier rules, the element shape of
LinkedIn's documented example, response classes, and what the sender makes of them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from leadsync.config import ConfigError, DestinationConfig, RetryConfig, parse_config
from leadsync.delivery import BatchSender
from leadsync.destinations import get_destination
from leadsync.destinations import linkedin as li
from leadsync.destinations.base import CredentialsError, FatalDestinationError, ResultKind
from leadsync.destinations.http import HttpResponse
from leadsync.pipeline import Planned, plan_row, render_requests
from leadsync.state import DELIVERED, FAILED
from tests.unit.sandbox_transport import sha

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
CREDS = li.parse_credentials(None, "tok", {})


def dest(**overrides: Any) -> DestinationConfig:
    base: dict[str, Any] = {"name": "linkedin", "type": "linkedin",
                            "stages": {"lead": "20000001", "won": "20000004"},
                            "retry": RetryConfig(attempts=3)}
    base.update(overrides)
    return DestinationConfig(**base)


def row(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "lead_id": "L1", "stage": "won", "event_time": NOW - timedelta(hours=2),
        "updated_at": NOW - timedelta(hours=1), "email": "  Mike.Smith@Example.COM ",
        "phone": "+1 650 555 0123", "first_name": "Mike", "last_name": "Smith",
        "country": "us", "li_fat_id": "df5gf5-gh6t7-ph4j7h-fgf6n1", "value": "1500",
        "currency": "usd",
    }
    base.update(overrides)
    return base


def planned(r: dict[str, Any], d: DestinationConfig | None = None) -> dict[str, Any]:
    plan = plan_row(r, d or dest(), li, NOW)  # type: ignore[arg-type]
    assert isinstance(plan, Planned), plan
    return plan.envelope["body"]


# -- credentials and config ---------------------------------------------------------------


def test_credentials_name_the_missing_or_bad_field() -> None:
    with pytest.raises(CredentialsError, match="'password'"):
        li.parse_credentials(None, None, {})
    with pytest.raises(CredentialsError, match="'api_version'"):
        li.parse_credentials(None, "tok", {"api_version": "2026-03"})
    with pytest.raises(CredentialsError, match="'api_version'"):
        li.parse_credentials(None, "tok", {"api_version": "202613"})
    creds = li.parse_credentials("localhost:9/", "s3cr3t", {"api_version": "202511"})
    assert (creds.base_url, creds.api_version) == ("https://localhost:9", "202511")
    assert "s3cr3t" not in repr(creds)
    assert get_destination("linkedin") is li


def test_config_wants_conversion_rule_ids() -> None:
    with pytest.raises(ConfigError, match=r"stages\.won: must be the numeric id of a LinkedIn"):
        parse_config({"destinations": [{"name": "li", "type": "linkedin",
                                        "stages": {"won": "Converted"}}]})
    with pytest.raises(ConfigError, match="shape"):
        parse_config({"destinations": [{"name": "li", "type": "linkedin", "shape": "website",
                                        "stages": {"won": "1"}}]})


# -- events ---------------------------------------------------------------------------------


def test_element_has_the_shape_of_linkedins_documented_example() -> None:
    event = planned(row())
    assert event == {
        "conversion": "urn:lla:llaPartnerConversion:20000004",
        "conversionHappenedAt": int((NOW - timedelta(hours=2)).timestamp()) * 1000,
        "eventId": event["eventId"],
        "user": {"userIds": [
            {"idType": "SHA256_EMAIL", "idValue": sha("mike.smith@example.com")},
            {"idType": "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID",
             "idValue": "df5gf5-gh6t7-ph4j7h-fgf6n1"},
        ]},
        "conversionValue": {"currencyCode": "USD", "amount": "1500.0"},
    }
    assert event["eventId"].startswith("ls_") and len(event["eventId"]) <= 64


def test_time_is_epoch_milliseconds_keeping_the_fraction() -> None:
    at = datetime(2023, 9, 26, 14, 41, 15, 123000, tzinfo=UTC)
    event = li.build_event(row(), dest(), "1", "e", at)
    assert event["conversionHappenedAt"] == 1695739275123  # 13 digits: ms, as in the docs


@pytest.mark.parametrize(("email", "expected"), [
    ("Person@Example.com", sha("person@example.com")),  # lower-cased
    ("  jane.doe+x@GMail.com\t", sha("jane.doe+x@gmail.com")),  # trimmed; no gmail rule
    (sha("person@example.com").upper(), sha("person@example.com")),  # a digest, lower-cased
])
def test_sha256_email_rule(email: str, expected: str) -> None:
    ids = planned(row(email=email))["user"]["userIds"]
    assert ids[0] == {"idType": "SHA256_EMAIL", "idValue": expected}


def test_names_and_phone_are_never_sent() -> None:
    """LinkedIn takes userInfo unhashed; leadsync never stages raw PII (G5)."""
    text = json.dumps(planned(row()))
    assert "userInfo" not in text and "Mike" not in text and "Smith" not in text
    assert "650" not in text


@pytest.mark.parametrize(("overrides", "kept"), [
    ({"email": "not-an-email"}, ["LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID"]),
    ({"li_fat_id": "has space"}, ["SHA256_EMAIL"]),
    ({"li_fat_id": None}, ["SHA256_EMAIL"]),
])
def test_unusable_identifiers_are_left_out(overrides: dict[str, Any], kept: list[str]) -> None:
    ids = planned(row(**overrides))["user"]["userIds"]
    assert [i["idType"] for i in ids] == kept


@pytest.mark.parametrize(("overrides", "reason", "status"), [
    ({"opted_out": True}, "opted_out", "skipped"),
    ({"email": None, "li_fat_id": None}, "no_match_keys", "quarantined"),  # as the contract
    ({"event_id": "x" * 65}, "event_id_too_long", "skipped"),
    ({"event_time": NOW - timedelta(days=91), "updated_at": NOW - timedelta(days=91)},
     "event_too_old", "expired"),
])
def test_rows_linkedin_does_not_get(overrides: dict[str, Any], reason: str,
                                    status: str) -> None:
    plan = plan_row(row(**overrides), dest(), li, NOW)  # type: ignore[arg-type]
    assert not isinstance(plan, Planned)
    assert (plan.reason, plan.status) == (reason, status)


def test_no_value_without_currency() -> None:
    assert "conversionValue" not in planned(row(currency=None))
    assert planned(row(value="12.345"))["conversionValue"]["amount"] == "12.345"


def test_request_headers_and_masking() -> None:
    request = li.build_request([planned(row())], CREDS, dest())
    assert request.url == "https://api.linkedin.com/rest/conversionEvents"
    assert request.headers["X-RestLi-Method"] == "BATCH_CREATE"
    assert request.headers["X-Restli-Protocol-Version"] == "2.0.0"
    assert request.headers["LinkedIn-Version"] == li.DEFAULT_API_VERSION
    assert request.headers["Authorization"] == "Bearer tok"
    assert request.masked()["headers"]["Authorization"] == "***"
    assert "Bearer tok" not in json.dumps(request.masked())


def test_render_batches_at_most_5000() -> None:
    rows = [row(lead_id=f"L{i}") for i in range(5001)]
    sizes = [len(r["body"]["elements"]) for r in render_requests(rows, dest(), CREDS, NOW)
             if "body" in r]
    assert sizes == [5000, 1]


# -- responses ------------------------------------------------------------------------------


def parse(status: int, body: Any, n: int = 3, headers: dict[str, str] | None = None) -> Any:
    return li.parse_response(status, json.dumps(body), headers or {}, n)


def test_batch_create_success_counts_every_element() -> None:
    result = parse(200, {"elements": [{"status": 201}] * 3})
    assert (result.kind, result.received, dict(result.event_errors)) == (ResultKind.OK, 3, {})
    partial = parse(200, {"elements": [{"status": 201}, {"status": 400, "error": "x"},
                                       {"status": 201}]})
    assert partial.kind is ResultKind.OK and partial.received == 2
    assert list(partial.event_errors) == [1]
    # G6: a 2xx that does not account for each element is not an acknowledgement.
    assert parse(200, {"elements": [{"status": 201}]}).kind is ResultKind.TRANSIENT
    assert li.parse_response(201, "", {}, 1).kind is ResultKind.TRANSIENT


def test_422_names_each_bad_element() -> None:
    # RudderStack's recorded LinkedIn response, with a second element added.
    message = ("Index: 0, ERROR :: /conversionValue/amount :: field is required but not found "
               "and has no default value\nERROR :: /user/userInfo/firstName :: field is "
               "required but not found and has no default value\nIndex: 2, ERROR :: "
               "/conversionHappenedAt :: must be within the past 90 days\n")
    result = parse(422, {"message": message, "status": 422})
    assert result.kind is ResultKind.PERMANENT
    assert sorted(result.event_errors) == [0, 2]
    assert "/user/userInfo/firstName" in result.event_errors[0]
    assert "90 days" in result.event_errors[2]


def test_400_indices_name_the_bad_elements() -> None:
    message = ("Incorrect conversions information provided. Conversion's method should be "
               "CONVERSIONS_API, indices [0, 2] (0-indexed)")
    result = parse(400, {"message": message, "status": 400})
    assert result.kind is ResultKind.PERMANENT and sorted(result.event_errors) == [0, 2]
    assert parse(400, {"message": "indices [7] (0-indexed)"}).event_errors == {}


@pytest.mark.parametrize(("status", "body", "kind"), [
    (401, {"status": 401, "serviceErrorCode": 65601, "code": "REVOKED_ACCESS_TOKEN",
           "message": "The token used in the request has been revoked by the user"},
     ResultKind.FATAL),
    (401, {"status": 401, "serviceErrorCode": 65600, "code": "INVALID_ACCESS_TOKEN",
           "message": "Invalid access token"}, ResultKind.FATAL),
    (403, {"status": 403, "message": "Not enough permissions"}, ResultKind.FATAL),
    (426, {"status": 426, "code": "NONEXISTENT_VERSION"}, ResultKind.FATAL),
    (429, {"status": 429, "message": "Resource level throttle"}, ResultKind.TRANSIENT),
    (503, "<html>unavailable</html>", ResultKind.TRANSIENT),
    (400, {"status": 400, "message": "something else"}, ResultKind.PERMANENT),
])
def test_status_classes(status: int, body: Any, kind: ResultKind) -> None:
    assert parse(status, body).kind is kind


def test_retry_after_is_honoured() -> None:
    assert parse(429, {}, headers={"Retry-After": "7"}).retry_after == 7.0


# -- the sender -----------------------------------------------------------------------------


class ScriptedClient:
    """Answers each request with the next scripted (status, body) and records the bodies."""

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


def test_a_rejected_element_is_dropped_and_the_rest_lands_once() -> None:
    client = ScriptedClient(
        (422, {"status": 422, "message": "Index: 1, ERROR :: /eventId :: bad\n"}),
        (200, {"elements": [{"status": 201}, {"status": 201}]}))
    report = BatchSender(li, CREDS, dest(), client, sleep=lambda s: None).deliver(  # type: ignore[arg-type]
        envelopes(3), NOW)
    assert report.outcomes["e1"].status == FAILED
    assert "/eventId" in (report.outcomes["e1"].detail or "")
    assert {report.outcomes[e].status for e in ("e0", "e2")} == {DELIVERED}
    assert [len(b["elements"]) for b in client.bodies] == [3, 2]
    assert report.acknowledged == 2


def test_throttling_is_retried_and_a_revoked_token_stops_the_run() -> None:
    client = ScriptedClient((429, {"status": 429}), (200, {"elements": [{"status": 201}] * 2}))
    delays: list[float] = []
    report = BatchSender(li, CREDS, dest(), client, sleep=delays.append).deliver(  # type: ignore[arg-type]
        envelopes(2), NOW)
    assert report.count(DELIVERED) == 2 and report.retries == 1 and len(delays) == 1
    client = ScriptedClient((401, {"status": 401, "code": "REVOKED_ACCESS_TOKEN"}))
    report = BatchSender(li, CREDS, dest(), client).deliver(envelopes(2), NOW)  # type: ignore[arg-type]
    assert isinstance(report.error, FatalDestinationError)
    assert "leadsync_linkedin" in str(report.error)
    assert report.outcomes == {}

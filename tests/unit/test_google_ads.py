"""The Google Ads API destination (uploadClickConversions): payload, per-row partial failures
and what the sender and the state store make of them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from leadsync.config import DestinationConfig, RetryConfig
from leadsync.db import make_engine
from leadsync.delivery import DEFERRED_REASON, DUPLICATE_REASON, BatchSender
from leadsync.destinations import get_destination
from leadsync.destinations import google_ads as ga
from leadsync.destinations.base import CredentialsError, FatalDestinationError, ResultKind
from leadsync.destinations.http import HttpResponse
from leadsync.pipeline import Planned, plan_row, render_requests
from leadsync.state import DELIVERED, FAILED, PENDING, LedgerRecord, StateStore
from tests.unit.sandbox_transport import sha

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
CREDS = ga.parse_credentials(None, None, {"access_token": "t", "developer_token": "DEVTOKEN"})


def dest(**overrides: Any) -> DestinationConfig:
    base: dict[str, Any] = {
        "name": "google_ads", "type": "google_ads", "customer_id": "1234567890",
        "login_customer_id": "987-654-3210",
        "stages": {"lead": "1000000001", "won": "1000000004"},
        "retry": RetryConfig(attempts=3)}
    base.update(overrides)
    return DestinationConfig(**base)


def row(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "lead_id": "L1", "stage": "won", "event_time": datetime(2026, 11, 26, 9, 5, 7,
                                                                tzinfo=UTC),
        "updated_at": NOW - timedelta(minutes=30), "email": "J.Smith@googlemail.com",
        "phone": "+44 20 7946 0123", "wbraid": "CjkKCQiAwbraidwbraid", "value": "10",
        "currency": "GBP", "ad_user_data": True, "ad_personalization": None,
    }
    base.update(overrides)
    return base


def planned(r: dict[str, Any], d: DestinationConfig | None = None) -> dict[str, Any]:
    plan = plan_row(r, d or dest(), ga, NOW)  # type: ignore[arg-type]
    assert isinstance(plan, Planned), plan
    return plan.envelope["body"]


def test_credentials_version_and_registration() -> None:
    assert get_destination("google_ads") is ga
    assert CREDS.api_version == "v26" and CREDS.base_url == "https://googleads.googleapis.com"
    with pytest.raises(CredentialsError, match="'api_version'"):
        ga.parse_credentials(None, None, {"access_token": "t", "api_version": "26"})
    assert "DEVTOKEN" not in repr(CREDS)


def test_click_conversion_shape() -> None:
    conv = planned(row())
    assert conv == {
        "conversionAction": "customers/1234567890/conversionActions/1000000004",
        "conversionDateTime": "2026-11-26 09:05:07+00:00",
        "orderId": conv["orderId"],
        "wbraid": "CjkKCQiAwbraidwbraid",
        "conversionValue": 10.0,
        "currencyCode": "GBP",
        "userIdentifiers": [
            {"userIdentifierSource": "FIRST_PARTY", "hashedEmail": sha("jsmith@googlemail.com")},
            {"userIdentifierSource": "FIRST_PARTY", "hashedPhoneNumber": sha("+442079460123")},
        ],
        "consent": {"adUserData": "GRANTED"},
    }
    assert conv["orderId"].startswith("ls_")


def test_leads_without_click_id_are_enhanced_conversions_for_leads() -> None:
    conv = planned(row(wbraid=None, gclid=None))
    assert not {"gclid", "gbraid", "wbraid"} & set(conv)
    assert len(conv["userIdentifiers"]) == 2
    plan = plan_row(row(wbraid=None, email=None, phone=None), dest(), ga, NOW)  # type: ignore[arg-type]
    assert not isinstance(plan, Planned) and plan.reason == "no_match_keys"


def test_request_headers_and_masking() -> None:
    request = ga.build_request([planned(row())], CREDS, dest())
    assert request.url == ("https://googleads.googleapis.com/v26/customers/1234567890"
                           ":uploadClickConversions")
    assert request.body is not None and request.body["partialFailure"] is True
    assert request.headers["developer-token"] == "DEVTOKEN"
    assert request.headers["login-customer-id"] == "9876543210"
    masked = request.masked()["headers"]
    assert masked["developer-token"] == "***" and masked["Authorization"] == "***"
    validate = ga.parse_credentials(None, None, {"access_token": "t", "validate_only": True})
    body = ga.build_request([], validate, dest()).body
    assert body is not None and body["validateOnly"] is True


def test_rendered_body_parses_into_the_official_request_type() -> None:
    from google.ads.googleads.v26.services.types.conversion_upload_service import (
        UploadClickConversionsRequest,
    )

    rows = [row(), row(lead_id="L2", stage="lead", wbraid=None, gclid="Cj0KCQiAgclidgclid",
                       ad_personalization=False, value=None)]
    [rendered] = [r for r in render_requests(rows, dest(), CREDS, NOW) if "body" in r]
    customer = rendered["url"].split("/customers/")[1].split(":")[0]
    parsed = UploadClickConversionsRequest.from_json(
        json.dumps({**rendered["body"], "customerId": customer}), ignore_unknown_fields=False)
    assert parsed.partial_failure is True and parsed.customer_id == "1234567890"
    assert len(parsed.conversions) == 2
    assert parsed.conversions[1].gclid == "Cj0KCQiAgclidgclid"
    assert parsed.conversions[1].consent.ad_personalization.name == "DENIED"
    assert parsed.conversions[0].user_identifiers[0].hashed_email == sha(
        "jsmith@googlemail.com")


# -- responses ------------------------------------------------------------------------------


def ads_error(code: str, index: int | None, kind: str = "conversionUploadError") -> dict[str, Any]:
    error: dict[str, Any] = {"errorCode": {kind: code}, "message": f"{code} happened"}
    if index is not None:
        error["location"] = {"fieldPathElements": [{"fieldName": "conversions", "index": index},
                                                   {"fieldName": "order_id"}]}
    return error


def partial(results: list[dict[str, Any]], *errors: dict[str, Any]) -> str:
    return json.dumps({"results": results, "jobId": "123", "partialFailureError": {
        "code": 3, "message": "first error", "details": [{
            "@type": "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure",
            "errors": list(errors)}]}})


def test_partial_failure_settles_each_row() -> None:
    ok = {"conversionAction": "customers/1/conversionActions/2", "conversionDateTime": "x"}
    body = partial([ok, {}, {}, {}, ok],
                   ads_error("ORDER_ID_ALREADY_IN_USE", 1),
                   ads_error("TOO_RECENT_EVENT", 2),
                   ads_error("INVALID_USER_IDENTIFIER", 3))
    result = ga.parse_response(200, body, {}, 5)
    assert result.kind is ResultKind.OK and result.received == 2
    assert set(result.event_duplicates) == {1}
    assert list(result.event_deferred) == [2]
    assert list(result.event_errors) == [3]
    assert "INVALID_USER_IDENTIFIER" in result.event_errors[3]


def test_a_row_without_result_or_error_is_not_claimed_delivered() -> None:
    result = ga.parse_response(200, partial([{}, {"conversionAction": "a"}],
                                            ads_error("CLICK_NOT_FOUND", None)), {}, 2)
    assert result.received == 1
    assert "CLICK_NOT_FOUND" in result.event_errors[0]


def test_full_success_and_validate_only() -> None:
    ok = {"conversionAction": "a", "conversionDateTime": "b"}
    result = ga.parse_response(200, json.dumps({"results": [ok, ok], "jobId": "9"}), {}, 2)
    assert result.kind is ResultKind.OK and result.received == 2
    assert ga.parse_response(200, "{}", {}, 2).received is None  # validate_only: no results


def rpc(status: int, state: str, *errors: dict[str, Any]) -> str:
    return json.dumps({"error": {"code": status, "message": "m", "status": state, "details": [{
        "@type": "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure",
        "errors": list(errors)}]}})


def test_quota_errors_are_retried_after_the_hint() -> None:
    quota = ads_error("RESOURCE_TEMPORARILY_EXHAUSTED", None, "quotaError")
    quota["details"] = {"quotaErrorDetails": {"rateScope": "ACCOUNT", "retryDelay": "42s"}}
    result = ga.parse_response(429, rpc(429, "RESOURCE_EXHAUSTED", quota), {}, 3)
    assert result.kind is ResultKind.TRANSIENT and result.retry_after == 42.0


@pytest.mark.parametrize(("status", "error", "kind"), [
    (401, ads_error("OAUTH_TOKEN_INVALID", None, "authenticationError"), ResultKind.FATAL),
    (403, ads_error("CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE", None, "notAllowlistedError"),
     ResultKind.FATAL),
    (500, ads_error("INTERNAL_ERROR", None, "internalError"), ResultKind.TRANSIENT),
    (400, ads_error("TOO_MANY_CONVERSIONS_IN_REQUEST", None), ResultKind.PERMANENT),
])
def test_request_level_errors(status: int, error: dict[str, Any], kind: ResultKind) -> None:
    assert ga.parse_response(status, rpc(status, "X", error), {}, 3).kind is kind


# -- the sender and the state store ------------------------------------------------------------


class ScriptedClient:
    def __init__(self, *answers: tuple[int, str]) -> None:
        self.answers = list(answers)

    def send(self, request: Any) -> HttpResponse:
        status, body = self.answers.pop(0)
        return HttpResponse(status, body, {})


def test_partial_failure_outcomes_reach_the_ledger_and_outbox(tmp_path: Any) -> None:
    envs = [{"event_id": f"e{i}", "event_time": int(NOW.timestamp()) - 600,
             "body": planned(row(lead_id=f"L{i}"))} for i in range(4)]
    ok = {"conversionAction": "a", "conversionDateTime": "b"}
    client = ScriptedClient((200, partial([ok, {}, {}, {}],
                                          ads_error("CLICK_CONVERSION_ALREADY_EXISTS", 1),
                                          ads_error("TOO_RECENT_EVENT", 2),
                                          ads_error("EXPIRED_EVENT", 3))))
    report = BatchSender(ga, CREDS, dest(), client).deliver(envs, NOW)  # type: ignore[arg-type]
    assert report.acknowledged == 1 and report.duplicates == 1 and report.deferred == 1
    assert report.outcomes["e0"].status == DELIVERED
    assert (report.outcomes["e1"].status, report.outcomes["e1"].reason) == (DELIVERED,
                                                                           DUPLICATE_REASON)
    assert (report.outcomes["e2"].status, report.outcomes["e2"].reason) == (PENDING,
                                                                           DEFERRED_REASON)
    assert report.outcomes["e3"].status == FAILED

    state = StateStore(make_engine(f"sqlite:///{tmp_path / 'state.db'}"))
    state.migrate()
    records = [LedgerRecord(e["event_id"], f"L{i}", "won", "1000000004", PENDING, NOW,
                            batch_id="b1") for i, e in enumerate(envs)]
    state.stage_batch("google_ads", "run1", "b1", 1, envs, records, None)
    batch = state.load_batch("b1")
    assert batch is not None
    state.record_outcomes(batch, report.outcomes, "run1")
    ledger = {r["event_id"]: r for r in state.ledger_rows("google_ads")}
    assert [ledger[f"e{i}"]["status"] for i in range(4)] == [DELIVERED, DELIVERED, PENDING,
                                                             FAILED]
    assert ledger["e2"]["reason"] == DEFERRED_REASON
    # The deferred event stays in the outbox for the next run; nothing else is resent.
    left = state.load_batch("b1")
    assert left is not None and left.status == "pending"
    assert [e["event_id"] for e in left.events] == ["e2"]


def test_quota_exhaustion_keeps_the_batch_pending() -> None:
    quota = ads_error("RESOURCE_EXHAUSTED", None, "quotaError")
    quota["details"] = {"quotaErrorDetails": {"retryDelay": "5s"}}
    client = ScriptedClient(*[(429, rpc(429, "RESOURCE_EXHAUSTED", quota))] * 3)
    delays: list[float] = []
    envs = [{"event_id": "e0", "event_time": int(NOW.timestamp()) - 600,
             "body": planned(row())}]
    report = BatchSender(ga, CREDS, dest(), client, sleep=delays.append).deliver(  # type: ignore[arg-type]
        envs, NOW)
    assert delays and all(d >= 5 for d in delays)
    assert report.outcomes == {} and report.error is not None
    assert not isinstance(report.error, FatalDestinationError)

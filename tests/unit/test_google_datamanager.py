"""The Google Data Manager destination: the leadsync_google connection and its tokens,
identity rules, events:ingest payloads, fast-fail isolation, and requestStatus:retrieve."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from leadsync.config import DestinationConfig, RetryConfig
from leadsync.delivery import RECEIPT_REASON, BatchSender
from leadsync.destinations import all_types, get_destination, has_request_status
from leadsync.destinations import google_common as gc
from leadsync.destinations import google_datamanager as dm
from leadsync.destinations.base import (
    CredentialsError,
    FatalDestinationError,
    RequestStatus,
    ResultKind,
    checks_request_status,
)
from leadsync.destinations.http import HttpResponse, TransportError
from leadsync.pipeline import Planned, plan_row, render_requests
from leadsync.state import DELIVERED, FAILED
from tests.unit.sandbox_transport import sha

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
CREDS = dm.parse_credentials(None, None, {"access_token": "static-test-token"})


def dest(**overrides: Any) -> DestinationConfig:
    base: dict[str, Any] = {
        "name": "google", "type": "google_datamanager", "customer_id": "123-456-7890",
        "login_customer_id": "9876543210",
        "stages": {"lead": "1000000001", "qualified": "1000000002", "won": "1000000004"},
        "retry": RetryConfig(attempts=3)}
    base.update(overrides)
    return DestinationConfig(**base)


def row(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "lead_id": "L1", "stage": "won", "event_time": NOW - timedelta(hours=2),
        "updated_at": NOW - timedelta(hours=1), "email": " Cloudy.SanFrancisco+shopping@GMAIL.com",
        "phone": "(800) 555-0100", "country": "US", "gclid": "Cj0KCQiAabcdefghijkl",
        "gbraid": "0AAAAAxyzxyzxyzxyz", "client_ip": "198.51.100.7", "user_agent": "UA/1.0",
        "value": 99.5, "currency": "usd", "ad_user_data": True, "ad_personalization": False,
    }
    base.update(overrides)
    return base


def planned(r: dict[str, Any], d: DestinationConfig | None = None) -> dict[str, Any]:
    plan = plan_row(r, d or dest(), dm, NOW)  # type: ignore[arg-type]
    assert isinstance(plan, Planned), plan
    return plan.envelope["body"]


# -- the leadsync_google connection ---------------------------------------------------------

SERVICE_ACCOUNT = {"type": "service_account", "client_email": "sa@p.iam.gserviceaccount.com",
                   "private_key": "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n",
                   "token_uri": "https://oauth2.googleapis.com/token", "project_id": "p"}


def test_connection_forms() -> None:
    static = dm.parse_credentials("http://127.0.0.1:9/", None, {"access_token": "abc"})
    assert static.base_url == "http://127.0.0.1:9"
    assert static.auth() == {"Authorization": "Bearer abc"}
    assert dm.parse_credentials(None, json.dumps(SERVICE_ACCOUNT), {}).auth.kind == \
        "service_account"
    assert dm.parse_credentials(None, None, {"keyfile_dict": SERVICE_ACCOUNT}).auth.kind == \
        "service_account"
    oauth = dm.parse_credentials(None, "client-secret", {"client_id": "cid",
                                                         "refresh_token": "rt",
                                                         "quota_project_id": "proj",
                                                         "validate_only": "true"})
    assert oauth.auth.kind == "oauth" and oauth.validate_only and oauth.quota_project == "proj"
    assert oauth.base_url == "https://datamanager.googleapis.com"
    for secret in ("client-secret", "rt", "abc"):
        assert secret not in repr(oauth) and secret not in repr(static)


@pytest.mark.parametrize(("password", "extra", "field"), [
    (None, {}, "no Google credentials"),
    ("{not json", {}, "'password' is not valid JSON"),
    (json.dumps({"type": "authorized_user"}), {}, "service-account key"),
    (json.dumps({"type": "service_account"}), {}, "lacks client_email"),
    (None, {"refresh_token": "rt"}, "'client_id'"),
    (None, {"refresh_token": "rt", "client_id": "c"}, "'password'"),
    (None, {"access_token": "a", "validate_only": "maybe"}, "'validate_only'"),
])
def test_connection_errors_name_the_field(password: str | None, extra: dict[str, Any],
                                          field: str) -> None:
    with pytest.raises(CredentialsError, match=field):
        dm.parse_credentials(None, password, extra)


class FakeGoogleCredentials:
    """Stands in for google-auth credentials: a token valid until ``expired`` is set."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.token: str | None = None
        self.refreshes = 0
        self.expired = False
        self.fail = fail

    @property
    def valid(self) -> bool:
        return self.token is not None and not self.expired

    def refresh(self, request: Any) -> None:
        if self.fail is not None:
            raise self.fail
        self.refreshes += 1
        self.token = f"minted-{self.refreshes}"
        self.expired = False


def token_source(monkeypatch: pytest.MonkeyPatch, fake: FakeGoogleCredentials,
                 refresh: str) -> gc.TokenSource:
    creds = dm.parse_credentials(None, "secret", {"client_id": "cid", "refresh_token": refresh})
    monkeypatch.setattr(creds.auth, "_build", lambda: fake)
    return creds.auth


def test_tokens_are_minted_once_and_cached_until_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGoogleCredentials()
    source = token_source(monkeypatch, fake, "rt-cache")
    assert source() == {"Authorization": "Bearer minted-1"}
    assert source() == {"Authorization": "Bearer minted-1"}
    # Parsing the same connection again (the next batch) reuses the process-wide source.
    again = dm.parse_credentials(None, "secret", {"client_id": "cid", "refresh_token": "rt-cache"})
    assert again.auth is source
    fake.expired = True
    assert source() == {"Authorization": "Bearer minted-2"}
    assert fake.refreshes == 2


def test_token_errors_are_fatal_or_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    from google.auth import exceptions as gexc

    refused = token_source(monkeypatch, FakeGoogleCredentials(gexc.RefreshError(
        "invalid_grant: Token has been expired or revoked.")), "rt-refused")
    with pytest.raises(FatalDestinationError, match="invalid_grant"):
        refused()
    flaky = token_source(monkeypatch, FakeGoogleCredentials(gexc.TransportError("reset")),
                         "rt-flaky")
    with pytest.raises(TransportError):
        flaky()


def test_service_account_tokens_come_from_google_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real google-auth path, with the token endpoint replaced (no network)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import service_account

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {**SERVICE_ACCOUNT, "private_key": pem, "client_email": "real@p.iam.example"}
    calls: list[Any] = []

    def fake_grant(request: Any, token_uri: str, assertion: str, **kwargs: Any) -> Any:
        calls.append(token_uri)
        return f"sa-token-{len(calls)}", datetime.now(UTC).replace(tzinfo=None) + timedelta(
            hours=1), {}

    monkeypatch.setattr("google.oauth2._client.jwt_grant", fake_grant)
    creds = dm.parse_credentials(None, json.dumps(info), {})
    assert creds.auth() == {"Authorization": "Bearer sa-token-1"}
    assert creds.auth() == {"Authorization": "Bearer sa-token-1"}  # cached until expiry
    assert calls == ["https://oauth2.googleapis.com/token"]
    assert isinstance(creds.auth._credentials, service_account.Credentials)
    assert creds.auth._credentials.scopes == [gc.DATAMANAGER_SCOPE]


def test_token_source_is_thread_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGoogleCredentials()
    source = token_source(monkeypatch, fake, "rt-threads")
    threads = [threading.Thread(target=source) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.refreshes == 1


# -- events -------------------------------------------------------------------------------


def test_event_shape_and_google_identity_rules() -> None:
    event = planned(row())
    assert event["destinationReferences"] == ["1000000004"]
    assert event["transactionId"].startswith("ls_")
    assert event["eventTimestamp"] == "2026-11-26T10:00:00Z"
    assert event["eventSource"] == "OTHER"
    # gmail: dots and +tag removed from the local part (Data Manager formatting guide).
    assert event["userData"]["userIdentifiers"] == [
        {"emailAddress": sha("cloudysanfrancisco@gmail.com")},
        {"phoneNumber": sha("+18005550100")},
    ]
    # One click id only: gclid wins over gbraid.
    assert event["adIdentifiers"]["gclid"] == "Cj0KCQiAabcdefghijkl"
    assert "gbraid" not in event["adIdentifiers"]
    assert event["adIdentifiers"]["landingPageDeviceInfo"] == {"userAgent": "UA/1.0",
                                                               "ipAddress": "198.51.100.7"}
    assert event["conversionValue"] == 99.5 and event["currency"] == "USD"
    assert event["consent"] == {"adUserData": "CONSENT_GRANTED",
                                "adPersonalization": "CONSENT_DENIED"}


def test_other_domains_keep_dots_and_tags() -> None:
    ids = planned(row(email="User.Name+NYC@Example.com"))["userData"]["userIdentifiers"]
    assert ids[0] == {"emailAddress": sha("user.name+nyc@example.com")}


def test_unknown_consent_is_left_unspecified_and_event_source_is_configurable() -> None:
    event = planned(row(ad_user_data=None, ad_personalization=None),
                    dest(event_source="WEB"))
    assert "consent" not in event
    assert event["eventSource"] == "WEB"


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"ad_user_data": False}, "consent_denied"),
    ({"opted_out": "true"}, "opted_out"),
    ({"email": None, "phone": None, "gclid": None, "gbraid": None}, "no_match_keys"),
])
def test_ineligible_rows(overrides: dict[str, Any], reason: str) -> None:
    plan = plan_row(row(**overrides), dest(), dm, NOW)  # type: ignore[arg-type]
    assert not isinstance(plan, Planned) and plan.reason == reason


def test_one_destination_per_conversion_action_in_the_batch() -> None:
    events = [planned(row(lead_id="a", stage="won")), planned(row(lead_id="b", stage="lead")),
              planned(row(lead_id="c", stage="won"))]
    request = dm.build_request(events, CREDS, dest())
    assert request.url == "https://datamanager.googleapis.com/v1/events:ingest"
    assert request.body is not None
    assert [d["productDestinationId"] for d in request.body["destinations"]] == [
        "1000000004", "1000000001"]
    assert request.body["destinations"][0] == {
        "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": "1234567890"},
        "loginAccount": {"accountType": "GOOGLE_ADS", "accountId": "9876543210"},
        "productDestinationId": "1000000004", "reference": "1000000004"}
    assert request.body["encoding"] == "HEX"
    assert "validateOnly" not in request.body
    assert request.masked()["headers"]["Authorization"] == "***"
    test_mode = dm.parse_credentials(None, None, {"access_token": "t", "validate_only": True})
    body = dm.build_request(events, test_mode, dest()).body
    assert body is not None and body["validateOnly"] is True


def test_rendered_body_parses_into_the_official_request_type() -> None:
    from google.ads.datamanager_v1 import Encoding, EventSource, IngestEventsRequest

    rows = [row(), row(lead_id="L2", stage="lead", gclid=None, value=None),
            row(lead_id="L3", stage="qualified", email=None, ad_personalization=None)]
    [rendered] = [r for r in render_requests(rows, dest(), CREDS, NOW) if "body" in r]
    parsed = IngestEventsRequest.from_json(json.dumps(rendered["body"]),
                                           ignore_unknown_fields=False)
    assert len(parsed.events) == 3 and len(parsed.destinations) == 3
    assert parsed.encoding == Encoding.HEX
    assert parsed.events[0].event_source == EventSource.OTHER
    assert parsed.events[0].transaction_id == rendered["body"]["events"][0]["transactionId"]
    assert parsed.events[0].ad_identifiers.gclid == "Cj0KCQiAabcdefghijkl"
    assert parsed.destinations[0].operating_account.account_id == "1234567890"


# -- responses ------------------------------------------------------------------------------


def rpc(status: int, state: str, *details: dict[str, Any]) -> str:
    return json.dumps({"error": {"code": status, "message": "m", "status": state,
                                 "details": list(details)}})


def violations(*pairs: tuple[str, str]) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
        {"field": f, "reason": r, "description": "d"} for f, r in pairs]}


def test_accepted_request_returns_its_id_as_receipt() -> None:
    result = dm.parse_response(200, json.dumps({"requestId": "abc-123"}), {}, 5)
    assert result.kind is ResultKind.OK and result.receipt == "abc-123"
    assert dm.parse_response(200, "<html/>", {}, 5).kind is ResultKind.TRANSIENT


def test_field_violations_name_the_bad_events() -> None:
    body = rpc(400, "INVALID_ARGUMENT", violations(
        ("events.events[1].user_data.user_identifiers[0]", "INVALID_HEX_ENCODING"),
        ("events[3].event_timestamp", "EVENT_TIME_INVALID")))
    result = dm.parse_response(400, body, {}, 4)
    assert result.kind is ResultKind.PERMANENT
    assert sorted(result.event_errors) == [1, 3]
    assert "INVALID_HEX_ENCODING" in result.event_errors[1]


def test_request_level_violations_are_fatal() -> None:
    body = rpc(400, "INVALID_ARGUMENT", violations(
        ("destinations[0].product_destination_id", "INVALID_CONVERSION_ACTION_ID")))
    result = dm.parse_response(400, body, {}, 4)
    assert result.kind is ResultKind.FATAL and "conversion action" in result.message


@pytest.mark.parametrize(("status", "state", "kind"), [
    (429, "RESOURCE_EXHAUSTED", ResultKind.TRANSIENT),
    (503, "UNAVAILABLE", ResultKind.TRANSIENT),
    (504, "DEADLINE_EXCEEDED", ResultKind.TRANSIENT),
    (401, "UNAUTHENTICATED", ResultKind.FATAL),
    (403, "PERMISSION_DENIED", ResultKind.FATAL),
    (400, "INVALID_ARGUMENT", ResultKind.PERMANENT),
])
def test_status_classes(status: int, state: str, kind: ResultKind) -> None:
    assert dm.parse_response(status, rpc(status, state), {}, 2).kind is kind


def test_retry_info_is_the_retry_hint() -> None:
    body = rpc(429, "RESOURCE_EXHAUSTED", {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                           "retryDelay": "17s"})
    assert dm.parse_response(429, body, {}, 1).retry_after == 17.0


# -- request status ----------------------------------------------------------------------------


def status_body(*entries: dict[str, Any]) -> str:
    return json.dumps({"requestStatusPerDestination": list(entries)})


def test_status_processing_success_partial_failed() -> None:
    processing = dm.parse_status_response(200, status_body(
        {"destination": {"productDestinationId": "1"}, "requestStatus": "PROCESSING"}), {})
    assert isinstance(processing, RequestStatus) and not processing.done
    mixed = dm.parse_status_response(200, status_body(
        {"destination": {"productDestinationId": "1"}, "requestStatus": "SUCCESS",
         "eventsIngestionStatus": {"recordCount": "5"}},
        {"destination": {"productDestinationId": "2"}, "requestStatus": "FAILED",
         "errorInfo": {"errorCounts": [{"recordCount": "2", "reason":
                                        "PROCESSING_ERROR_REASON_DENIED_CONSENT"}]},
         "eventsIngestionStatus": {"recordCount": "0"}}), {})
    assert isinstance(mixed, RequestStatus)
    assert mixed.state == "PARTIAL_SUCCESS" and mixed.done
    assert mixed.counts == {"1": {"ingested": 5}, "2": {"ingested": 0,
                                                        "error.DENIED_CONSENT": 2}}
    assert list(mixed.failed_destinations) == ["2"]


def test_status_lookup_errors() -> None:
    unknown = dm.parse_status_response(400, rpc(400, "INVALID_ARGUMENT", {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_REQUEST_ID"}), {})
    assert isinstance(unknown, RequestStatus) and unknown.state == "INVALID_REQUEST_ID"
    down = dm.parse_status_response(503, rpc(503, "UNAVAILABLE"), {})
    assert not isinstance(down, RequestStatus) and down.kind is ResultKind.TRANSIENT
    request = dm.build_status_request("rid", CREDS)
    assert request.method == "GET" and request.params == {"requestId": "rid"}
    assert request.url.endswith("/v1/requestStatus:retrieve")


def test_registered_with_status_checks() -> None:
    assert get_destination("google_datamanager") is dm
    assert has_request_status("google_datamanager")
    assert not has_request_status("meta") and not has_request_status("tiktok")
    # The declared set matches what the modules provide.
    for type_ in all_types():
        assert has_request_status(type_) == checks_request_status(get_destination(type_))


# -- the sender -----------------------------------------------------------------------------


class ScriptedClient:
    def __init__(self, *answers: tuple[int, str]) -> None:
        self.answers = list(answers)
        self.sizes: list[int] = []

    def send(self, request: Any) -> HttpResponse:
        self.sizes.append(len(request.body["events"]))
        status, body = self.answers.pop(0)
        return HttpResponse(status, body, {})


def test_fast_fail_isolates_the_bad_event_and_keeps_the_receipt() -> None:
    envs = [{"event_id": f"e{i}", "event_time": int(NOW.timestamp()) - 60,
             "body": planned(row(lead_id=f"L{i}"))} for i in range(4)]
    client = ScriptedClient(
        (400, rpc(400, "INVALID_ARGUMENT", violations(("events.events[2].currency",
                                                       "INVALID_CURRENCY_CODE")))),
        (200, json.dumps({"requestId": "req-9"})))
    report = BatchSender(dm, CREDS, dest(), client).deliver(envs, NOW)  # type: ignore[arg-type]
    assert client.sizes == [4, 3]
    assert report.outcomes["e2"].status == FAILED
    assert "INVALID_CURRENCY_CODE" in (report.outcomes["e2"].detail or "")
    for event_id in ("e0", "e1", "e3"):
        outcome = report.outcomes[event_id]
        assert (outcome.status, outcome.reason, outcome.detail) == (DELIVERED, RECEIPT_REASON,
                                                                    "req-9")

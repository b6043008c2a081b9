"""The Google emulators (Data Manager ingest + request status, Google Ads API click
conversion upload): auth, limits, field names, hash format, enums, fast-fail vs partial
failure, dedup keys, faults, and the real destination modules against them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from leadsync.config import DestinationConfig
from leadsync.db import make_engine
from leadsync.delivery import BatchSender
from leadsync.destinations import google_ads as ga
from leadsync.destinations import google_datamanager as dm
from leadsync.request_status import check_requests
from leadsync.sandbox import SandboxConfig, create_app
from leadsync.state import DELIVERED, FAILED, PENDING, LedgerRecord, StateStore
from tests.unit.sandbox_transport import TestClientTransport, sha

TOKEN = "sandbox-google-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CUSTOMER = "1234567890"
MANAGER = "9876543210"
ACTIONS = ("1000000001", "1000000004")
NOW = 1_764_000_000
NOW_DT = datetime.fromtimestamp(NOW, UTC)


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(clock: Clock) -> TestClient:
    return TestClient(create_app(SandboxConfig(clock=clock, datamanager_processing_seconds=600)))


def stats(client: TestClient, platform: str) -> dict[str, int]:
    return dict(client.get("/_sandbox/stats").json()[platform])


def add_faults(client: TestClient, platform: str, *faults: dict[str, Any]) -> None:
    response = client.post("/_sandbox/faults", json={"platform": platform,
                                                     "faults": list(faults)})
    assert response.status_code == 200, response.text


# ============================================================================================
# Data Manager
# ============================================================================================


def dm_destination(action: str = ACTIONS[0], **overrides: Any) -> dict[str, Any]:
    dest: dict[str, Any] = {
        "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": CUSTOMER},
        "loginAccount": {"accountType": "GOOGLE_ADS", "accountId": MANAGER},
        "productDestinationId": action, "reference": action}
    dest.update(overrides)
    return dest


def dm_event(transaction: str = "t-1", action: str = ACTIONS[0], **overrides: Any
             ) -> dict[str, Any]:
    event: dict[str, Any] = {
        "destinationReferences": [action], "transactionId": transaction,
        "eventTimestamp": "2025-11-24T14:00:00Z", "eventSource": "OTHER",
        "adIdentifiers": {"gclid": "Cj0KCQiAabcdefghijkl"},
        "userData": {"userIdentifiers": [{"emailAddress": sha("jane@example.com")},
                                         {"phoneNumber": sha("+18005550100")}]},
        "consent": {"adUserData": "CONSENT_GRANTED", "adPersonalization": "CONSENT_GRANTED"},
        "conversionValue": 10.0, "currency": "USD"}
    event.update(overrides)
    return event


def ingest(client: TestClient, events: list[Any], destinations: list[Any] | None = None,
           headers: dict[str, str] | None = None, **extra: Any) -> Any:
    body: dict[str, Any] = {"destinations": destinations or [dm_destination(a) for a in ACTIONS],
                            "encoding": "HEX", "events": events, **extra}
    return client.post("/v1/events:ingest", json=body, headers=AUTH if headers is None
                       else headers)


def status(client: TestClient, request_id: str) -> Any:
    return client.get("/v1/requestStatus:retrieve", params={"requestId": request_id},
                      headers=AUTH)


def violations(response: Any) -> list[tuple[str, str]]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    [bad] = [d for d in error["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    return [(v["field"], v["reason"]) for v in bad["fieldViolations"]]


def test_ingest_then_status_is_processing_then_success(client: TestClient, clock: Clock) -> None:
    response = ingest(client, [dm_event("t-1"), dm_event("t-2", ACTIONS[1])])
    assert response.status_code == 200, response.text
    request_id = response.json()["requestId"]
    stored = client.get("/_sandbox/google_datamanager/events").json()
    assert [(e["event_name"], e["event_id"]) for e in stored] == [(ACTIONS[0], "t-1"),
                                                                  (ACTIONS[1], "t-2")]
    early = status(client, request_id).json()["requestStatusPerDestination"]
    assert [s["requestStatus"] for s in early] == ["PROCESSING", "PROCESSING"]
    clock.now += 601
    done = status(client, request_id).json()["requestStatusPerDestination"]
    assert [s["requestStatus"] for s in done] == ["SUCCESS", "SUCCESS"]
    assert done[0]["eventsIngestionStatus"] == {"recordCount": "1"}
    assert done[0]["destination"]["productDestinationId"] == ACTIONS[0]


def test_processing_errors_are_counted_not_stored(client: TestClient, clock: Clock) -> None:
    denied = dm_event("t-2", consent={"adUserData": "CONSENT_DENIED"})
    junk_click = dm_event("t-3", adIdentifiers={"gclid": "not a gclid!"})
    request_id = ingest(client, [dm_event("t-1"), denied, junk_click,
                                 dm_event("t-4", ACTIONS[1], consent={
                                     "adUserData": "CONSENT_DENIED"})]).json()["requestId"]
    clock.now += 601
    first, second = status(client, request_id).json()["requestStatusPerDestination"]
    assert first["requestStatus"] == "PARTIAL_SUCCESS"
    assert first["eventsIngestionStatus"] == {"recordCount": "1"}
    assert first["errorInfo"]["errorCounts"] == [
        {"recordCount": "1", "reason": "PROCESSING_ERROR_REASON_DENIED_CONSENT"},
        {"recordCount": "1", "reason": "PROCESSING_ERROR_REASON_INVALID_GCLID"}]
    assert second["requestStatus"] == "FAILED"
    assert len(client.get("/_sandbox/google_datamanager/events").json()) == 1


@pytest.mark.parametrize(("mutate", "field", "reason"), [
    (lambda e: e["userData"]["userIdentifiers"][0].update(emailAddress="jane@example.com"),
     "events.events[1].user_data.user_identifiers[0].email_address", "INVALID_HEX_ENCODING"),
    (lambda e: e["userData"]["userIdentifiers"][0].update(emailAddress="abcd"),
     "events.events[1].user_data.user_identifiers[0].email_address", "INVALID_SHA256_FORMAT"),
    (lambda e: e.pop("eventSource"), "events.events[1].event_source", "REQUIRED_FIELD_MISSING"),
    (lambda e: e.pop("eventTimestamp"), "events.events[1].event_timestamp",
     "REQUIRED_FIELD_MISSING"),
    (lambda e: e.update(eventTimestamp="2020-01-01T00:00:00Z"),
     "events.events[1].event_timestamp", "EVENT_TIME_INVALID"),
    (lambda e: e.update(currency="usd"), "events.events[1].currency", "INVALID_CURRENCY_CODE"),
    (lambda e: e.update(destinationReferences=["nope"]),
     "events.events[1].destination_references", "INVALID_DESTINATION"),
    (lambda e: (e.pop("userData"), e.pop("adIdentifiers")), "events.events[1]",
     "NO_IDENTIFIERS_PROVIDED"),
    (lambda e: e["userData"].update(userIdentifiers=[{"emailAddress": sha(str(i))}
                                                     for i in range(11)]),
     "events.events[1].user_data.user_identifiers", "TOO_MANY_USER_IDENTIFIERS"),
])
def test_fast_fail_names_the_bad_event(client: TestClient, mutate: Any, field: str,
                                       reason: str) -> None:
    bad = dm_event("t-2")
    mutate(bad)
    response = ingest(client, [dm_event("t-1"), bad, dm_event("t-3")])
    assert violations(response) == [(field, reason)]
    assert client.get("/_sandbox/google_datamanager/events").json() == []


def test_every_bad_event_is_listed(client: TestClient) -> None:
    response = ingest(client, [dm_event("t-1", currency="x"), dm_event("t-2"),
                               dm_event("t-3", eventSource=None)])
    assert [f for f, _ in violations(response)] == ["events.events[0].currency",
                                                    "events.events[2].event_source"]


@pytest.mark.parametrize("body_mutation", [
    lambda b: b.update(unknownField=1),
    lambda b: b["events"][0].update(eventSource="CRM"),
    lambda b: b["events"][0].update(consent={"adUserData": "GRANTED"}),
    lambda b: b["events"][0].update(eventTimestamp="yesterday"),
    lambda b: b["events"][0]["adIdentifiers"].update(clickId="x"),
])
def test_json_level_problems_fail_the_request(client: TestClient, body_mutation: Any) -> None:
    body = {"destinations": [dm_destination()], "encoding": "HEX", "events": [dm_event()]}
    body_mutation(body)
    response = client.post("/v1/events:ingest", json=body, headers=AUTH)
    assert response.status_code == 400 and "Invalid" in response.json()["error"]["message"]


def test_snake_case_names_are_accepted(client: TestClient) -> None:
    event = {"transaction_id": "t-1", "event_timestamp": "2025-11-24T14:00:00Z",
             "event_source": "WEB", "ad_identifiers": {"gclid": "Cj0KCQiAabcdefghijkl"}}
    response = ingest(client, [event], [{"operating_account": {"account_type": "GOOGLE_ADS",
                                                              "account_id": CUSTOMER},
                                         "product_destination_id": ACTIONS[0]}])
    assert response.status_code == 200, response.text


def test_request_level_checks(client: TestClient) -> None:
    assert ingest(client, [dm_event()], headers={}).status_code == 401
    assert ingest(client, [dm_event()], headers={"Authorization": "Bearer x"}).status_code == 401
    other = dm_destination(operatingAccount={"accountType": "GOOGLE_ADS",
                                             "accountId": "1111111111"})
    assert ingest(client, [dm_event()], [other]).status_code == 403
    unknown_action = dm_destination("555")
    assert violations(ingest(client, [dm_event(action="555")], [unknown_action])) == [
        ("destinations[0].product_destination_id", "INVALID_CONVERSION_ACTION_ID")]
    assert violations(ingest(client, [dm_event()], [dm_destination(), dm_destination()])) == [
        ("destinations[1].reference", "DUPLICATE_DESTINATION_REFERENCE")]
    assert violations(ingest(client, [dm_event(f"t{i}") for i in range(2001)])) == [
        ("events", "TOO_MANY_EVENTS")]
    body = {"destinations": [dm_destination()], "events": [dm_event()]}
    response = client.post("/v1/events:ingest", json=body, headers=AUTH)
    assert violations(response) == [("encoding", "REQUIRED_FIELD_MISSING")]
    assert ingest(client, [dm_event(f"t{i}") for i in range(2000)]).status_code == 200


def test_resend_is_an_adjustment_not_a_second_conversion(client: TestClient) -> None:
    ingest(client, [dm_event("t-1")])
    ingest(client, [dm_event("t-1", conversionValue=20.0)])
    s = stats(client, "google_datamanager")
    assert (s["unique_events"], s["duplicate_events"]) == (1, 1)


def test_validate_only(client: TestClient) -> None:
    response = ingest(client, [dm_event()], validateOnly=True)
    assert response.status_code == 200
    assert client.get("/_sandbox/google_datamanager/events").json() == []
    assert len(client.get("/_sandbox/google_datamanager/events",
                          params={"test": "true"}).json()) == 1
    lookup = status(client, response.json()["requestId"])
    assert lookup.status_code == 400
    assert "INVALID_REQUEST_ID" in lookup.text
    assert status(client, "made-up").status_code == 400


def test_dm_faults(client: TestClient) -> None:
    add_faults(client, "google_datamanager", {"kind": "throttle"},
               {"kind": "google_error", "http_status": 500, "status": "INTERNAL"},
               {"kind": "reject_events", "event_ids": ["t-2"]})
    throttled = ingest(client, [dm_event()])
    assert throttled.status_code == 429 and "RetryInfo" in throttled.text
    assert ingest(client, [dm_event()]).status_code == 500
    assert violations(ingest(client, [dm_event("t-1"), dm_event("t-2")])) == [
        ("events.events[1]", "INVALID_EVENT")]
    assert ingest(client, [dm_event("t-2")]).status_code == 200


def dm_dest() -> DestinationConfig:
    return DestinationConfig(name="google", type="google_datamanager", customer_id=CUSTOMER,
                             login_customer_id=MANAGER,
                             stages={"lead": ACTIONS[0], "won": ACTIONS[1]})


def dm_rows(n: int, **overrides: Any) -> list[dict[str, Any]]:
    return [{"lead_id": f"L{i}", "stage": "won" if i % 2 else "lead",
             "event_time": NOW_DT - timedelta(hours=3), "email": f"p{i}@example.com",
             "gclid": "Cj0KCQiAabcdefghijkl", "ad_user_data": True, **overrides}
            for i in range(n)]


def envelopes_for(module: Any, dest: DestinationConfig, rows: list[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        event = module.build_event(r, dest, dest.stages[r["stage"]], f"id-{r['lead_id']}",
                                   r["event_time"])
        out.append({"event_id": f"id-{r['lead_id']}",
                    "event_time": int(r["event_time"].timestamp()), "body": event})
    return out


def test_datamanager_module_against_the_emulator_end_to_end(client: TestClient, clock: Clock,
                                                            tmp_path: Any) -> None:
    """A mixed batch lands once minus the rejected event; a later run checks its status."""
    dest = dm_dest()
    creds = dm.parse_credentials("http://sandbox", None, {"access_token": TOKEN})
    envs = envelopes_for(dm, dest, dm_rows(6))
    add_faults(client, "google_datamanager",
               {"kind": "reject_events", "event_ids": ["id-L2"], "reason": "INVALID_FORMAT"})
    transport = TestClientTransport(client)
    report = BatchSender(dm, creds, dest, transport).deliver(envs, NOW_DT)  # type: ignore[arg-type]
    assert report.outcomes["id-L2"].status == FAILED
    assert "INVALID_FORMAT" in (report.outcomes["id-L2"].detail or "")
    delivered = sorted(e for e, o in report.outcomes.items() if o.status == DELIVERED)
    assert delivered == ["id-L0", "id-L1", "id-L3", "id-L4", "id-L5"]
    stored = client.get("/_sandbox/google_datamanager/events").json()
    assert sorted(e["event_id"] for e in stored) == delivered
    assert stats(client, "google_datamanager")["duplicate_events"] == 0

    # The run records the outcomes; the next run registers the receipt and checks it.
    state = StateStore(make_engine(f"sqlite:///{tmp_path / 's.db'}"))
    state.migrate()
    state.stage_batch("google", "run-1", "b1", 1, envs,
                      [LedgerRecord(e["event_id"], e["event_id"][3:], "x", e["body"][
                          "destinationReferences"][0], PENDING, NOW_DT, batch_id="b1")
                       for e in envs], None)
    batch = state.load_batch("b1")
    assert batch is not None
    state.record_outcomes(batch, report.outcomes, "run-1")
    # The state store's clock is the wall clock; the emulator's is the test's.
    wall = datetime.now(UTC) + timedelta(seconds=5)
    counts = check_requests(state, "google", "google_datamanager", lambda: creds, transport,  # type: ignore[arg-type]
                            now=wall, exclude_run_id="run-1")
    assert counts == {"requests_registered": 1}  # the sending run's own requests wait
    counts = check_requests(state, "google", "google_datamanager", lambda: creds, transport,  # type: ignore[arg-type]
                            now=wall, exclude_run_id="run-2")
    assert counts["request_status.PROCESSING"] == 1
    [request] = state.request_rows("google")
    assert (request["status"], request["done"], request["n_events"]) == ("PROCESSING", 0, 5)
    assert request["batch_id"] == "b1"
    clock.now += 3600
    later = wall + timedelta(hours=1)
    counts = check_requests(state, "google", "google_datamanager", lambda: creds, transport,  # type: ignore[arg-type]
                            now=later, exclude_run_id="run-3")
    assert counts["request_status.SUCCESS"] == 1
    assert counts["request_records.ingested"] == 5
    [request] = state.request_rows("google")
    assert request["status"] == "SUCCESS" and request["done"] == 1
    assert request["counts"] == {ACTIONS[0]: {"ingested": 2}, ACTIONS[1]: {"ingested": 3}}
    assert check_requests(state, "google", "google_datamanager", lambda: creds, transport,  # type: ignore[arg-type]
                          now=later, exclude_run_id="run-4") == {"requests_registered": 0}


def test_a_failed_request_turns_its_events_into_dead_letters(client: TestClient, clock: Clock,
                                                             tmp_path: Any) -> None:
    dest = dm_dest()
    creds = dm.parse_credentials("http://sandbox", None, {"access_token": TOKEN})
    # Consent denied at the platform for every 'won' event (the pipeline skips denied rows;
    # here the body is forged to reach the platform's own processing check).
    envs = envelopes_for(dm, dest, dm_rows(4))
    for env in envs:
        if env["body"]["destinationReferences"] == [ACTIONS[1]]:
            env["body"]["consent"] = {"adUserData": "CONSENT_DENIED"}
    transport = TestClientTransport(client)
    report = BatchSender(dm, creds, dest, transport).deliver(envs, NOW_DT)  # type: ignore[arg-type]
    state = StateStore(make_engine(f"sqlite:///{tmp_path / 's.db'}"))
    state.migrate()
    state.stage_batch("google", "run-1", "b1", 1, envs,
                      [LedgerRecord(e["event_id"], e["event_id"], "x", e["body"][
                          "destinationReferences"][0], PENDING, NOW_DT, batch_id="b1")
                       for e in envs], None)
    batch = state.load_batch("b1")
    assert batch is not None
    state.record_outcomes(batch, report.outcomes, "run-1")
    clock.now += 3600
    counts = check_requests(state, "google", "google_datamanager", lambda: creds, transport,  # type: ignore[arg-type]
                            now=datetime.now(UTC) + timedelta(seconds=1))
    assert counts["request_status.PARTIAL_SUCCESS"] == 1 and counts["dead_lettered"] == 2
    ledger = {r["event_id"]: r for r in state.ledger_rows("google")}
    assert ledger["id-L1"]["status"] == FAILED and ledger["id-L1"]["reason"] == "request_failed"
    assert "PARTIAL_SUCCESS" in ledger["id-L1"]["detail"]
    assert ledger["id-L0"]["status"] == DELIVERED


# ============================================================================================
# Google Ads API
# ============================================================================================

UPLOAD = f"/v26/customers/{CUSTOMER}:uploadClickConversions"


def conversion(order: str | None = "o-1", **overrides: Any) -> dict[str, Any]:
    conv: dict[str, Any] = {
        "conversionAction": f"customers/{CUSTOMER}/conversionActions/{ACTIONS[0]}",
        "conversionDateTime": "2025-11-24 14:00:00+00:00", "gclid": "Cj0KCQiAabcdefghijkl",
        "userIdentifiers": [{"userIdentifierSource": "FIRST_PARTY",
                             "hashedEmail": sha("jane@example.com")}],
        "consent": {"adUserData": "GRANTED"}}
    if order is not None:
        conv["orderId"] = order
    conv.update(overrides)
    return conv


def upload(client: TestClient, conversions: list[Any], path: str = UPLOAD,
           headers: dict[str, str] | None = None, **extra: Any) -> Any:
    body = {"conversions": conversions, "partialFailure": True, **extra}
    return client.post(path, json=body, headers=AUTH if headers is None else headers)


def row_errors(response: Any) -> dict[int, str]:
    assert response.status_code == 200, response.text
    failure = response.json().get("partialFailureError")
    if not failure:
        return {}
    [detail] = failure["details"]
    assert detail["@type"].endswith("errors.GoogleAdsFailure")
    return {e["location"]["fieldPathElements"][0]["index"]: next(iter(e["errorCode"].values()))
            for e in detail["errors"]}


def test_upload_accepts_and_returns_a_result_per_row(client: TestClient) -> None:
    response = upload(client, [conversion("o-1"), conversion("o-2")])
    body = response.json()
    assert row_errors(response) == {}
    assert [r["conversionAction"] for r in body["results"]] == [
        f"customers/{CUSTOMER}/conversionActions/{ACTIONS[0]}"] * 2
    assert body["jobId"]
    stored = client.get("/_sandbox/google_ads/events").json()
    assert [(e["event_name"], e["event_id"]) for e in stored] == [(ACTIONS[0], "o-1"),
                                                                  (ACTIONS[0], "o-2")]


@pytest.mark.parametrize(("mutate", "code"), [
    (lambda c: c.update(conversionAction=f"customers/{CUSTOMER}/conversionActions/9"),
     "NO_CONVERSION_ACTION_FOUND"),
    (lambda c: c.update(conversionDateTime="2025-11-24T14:00:00Z"),
     "INVALID_STRING_DATE_TIME_SECONDS_WITH_OFFSET"),
    (lambda c: c.update(conversionDateTime="2025-11-24 14:00:00"),
     "INVALID_STRING_DATE_TIME_SECONDS_WITH_OFFSET"),
    (lambda c: c.update(conversionDateTime="2025-01-01 00:00:00+00:00"), "EXPIRED_EVENT"),
    (lambda c: c.update(conversionDateTime="2026-01-01 00:00:00+00:00"),
     "LATER_THAN_MAXIMUM_DATE"),
    (lambda c: c["userIdentifiers"][0].update(hashedEmail="jane@example.com"),
     "INVALID_USER_IDENTIFIER"),
    (lambda c: c["userIdentifiers"][0].update(hashedEmail=sha("x").upper()),
     "INVALID_USER_IDENTIFIER"),
    (lambda c: c.update(userIdentifiers=[{"mobileId": "x"}]), "UNSUPPORTED_USER_IDENTIFIER"),
    (lambda c: c.update(gbraid="0AAAAAabcdefghij", wbraid="CjkKCQiAabcdefghij"),
     "GBRAID_WBRAID_BOTH_SET"),
    (lambda c: c.update(gclid="not a gclid"), "UNPARSEABLE_GCLID"),
    (lambda c: c.update(currencyCode="usd"), "INVALID_VALUE"),
    (lambda c: (c.pop("gclid"), c.pop("userIdentifiers")), "REQUIRED"),
])
def test_row_errors_are_partial_failures(client: TestClient, mutate: Any, code: str) -> None:
    bad = conversion("o-2")
    mutate(bad)
    response = upload(client, [conversion("o-1"), bad, conversion("o-3")])
    assert row_errors(response) == {1: code}
    results = response.json()["results"]
    assert results[1] == {} and results[0] and results[2]
    assert len(client.get("/_sandbox/google_ads/events").json()) == 2


def test_order_ids_dedup_within_and_across_requests(client: TestClient) -> None:
    assert row_errors(upload(client, [conversion("o-1"), conversion("o-1")])) == {
        1: "DUPLICATE_ORDER_ID"}
    assert row_errors(upload(client, [conversion("o-1"), conversion("o-9")])) == {
        0: "ORDER_ID_ALREADY_IN_USE"}
    other_action = conversion("o-1", conversionAction=(
        f"customers/{CUSTOMER}/conversionActions/{ACTIONS[1]}"))
    assert row_errors(upload(client, [other_action])) == {}


def test_click_and_time_dedup_without_order_id(client: TestClient) -> None:
    assert row_errors(upload(client, [conversion(None)])) == {}
    assert row_errors(upload(client, [conversion(None)])) == {
        0: "CLICK_CONVERSION_ALREADY_EXISTS"}


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"headers": {}}, 401, "OAUTH_TOKEN_INVALID"),
    ({"path": "/v26/customers/1111111111:uploadClickConversions"}, 403,
     "USER_PERMISSION_DENIED"),
    ({"headers": {**AUTH, "login-customer-id": "5555555555"}}, 403, "USER_PERMISSION_DENIED"),
    ({"partialFailure": False}, 400, "PARTIAL_FAILURE_MODE_REQUIRED"),
    ({"jobId": 2**31}, 400, "INVALID_JOB_ID"),
])
def test_request_level_errors(client: TestClient, kwargs: dict[str, Any], status: int,
                              code: str) -> None:
    response = upload(client, [conversion()], **kwargs)
    assert response.status_code == status, response.text
    assert code in response.text
    assert "GoogleAdsFailure" in response.text


def test_request_shape_errors(client: TestClient) -> None:
    assert upload(client, [conversion()], path=f"/v19/customers/{CUSTOMER}"
                  ":uploadClickConversions").status_code == 404
    assert upload(client, [conversion(f"o{i}") for i in range(2001)]).status_code == 400
    assert upload(client, [conversion(debugEnabled=True)]).status_code == 400
    assert upload(client, [conversion(consent={"adUserData": "CONSENT_GRANTED"})]
                  ).status_code == 400
    assert upload(client, [conversion()], unknown=1).status_code == 400


def test_not_allowlisted_customers_are_told_to_use_data_manager(clock: Clock) -> None:
    client = TestClient(create_app(SandboxConfig(clock=clock, google_ads_allowlisted=set())))
    response = upload(client, [conversion()])
    assert response.status_code == 403
    assert "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE" in response.text
    result = ga.parse_response(response.status_code, response.text, {}, 1)
    assert result.kind.value == "fatal" and "google_datamanager" in result.message


def test_validate_only_returns_no_results(client: TestClient) -> None:
    response = upload(client, [conversion()], validateOnly=True)
    assert response.status_code == 200 and response.json() == {}
    assert client.get("/_sandbox/google_ads/events").json() == []


def test_ads_faults(client: TestClient) -> None:
    add_faults(client, "google_ads", {"kind": "throttle"},
               {"kind": "reject_events", "indices": [0],
                "reason": "conversionUploadError.TOO_RECENT_EVENT"})
    throttled = upload(client, [conversion()])
    assert throttled.status_code == 429
    result = ga.parse_response(429, throttled.text, {}, 1)
    assert result.kind.value == "transient" and result.retry_after == 1.0
    assert row_errors(upload(client, [conversion("o-1"), conversion("o-2")])) == {
        0: "TOO_RECENT_EVENT"}


def test_google_ads_module_against_the_emulator(client: TestClient) -> None:
    """Mixed batch through partial failure: one row rejected, one already delivered, one
    deferred; the accepted rows land once."""
    dest = DestinationConfig(name="gads", type="google_ads", customer_id=CUSTOMER,
                             stages={"lead": ACTIONS[0], "won": ACTIONS[1]})
    creds = ga.parse_credentials("http://sandbox", None, {"access_token": TOKEN})
    envs = envelopes_for(ga, dest, dm_rows(5))
    transport = TestClientTransport(client)
    # id-L1 was delivered by an earlier request.
    BatchSender(ga, creds, dest, transport).deliver([envs[1]], NOW_DT)  # type: ignore[arg-type]
    add_faults(client, "google_ads", {"kind": "reject_events", "event_ids": ["id-L3"]},)
    report = BatchSender(ga, creds, dest, transport).deliver(envs, NOW_DT)  # type: ignore[arg-type]
    assert report.outcomes["id-L3"].status == FAILED
    assert report.outcomes["id-L1"].status == DELIVERED
    assert report.outcomes["id-L1"].reason == "duplicate"
    assert report.acknowledged == 3 and report.duplicates == 1
    assert len(transport.sent) == 2  # partial failure: no resend
    stored = client.get("/_sandbox/google_ads/events").json()
    assert sorted(e["event_id"] for e in stored) == ["id-L0", "id-L1", "id-L2", "id-L4"]

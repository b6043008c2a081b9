"""The LinkedIn Conversions API emulator: headers, auth, versions, element rules, the 422
per-index message, dedup, faults, and the real destination module against it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from leadsync.config import DestinationConfig
from leadsync.delivery import BatchSender
from leadsync.destinations import linkedin as li
from leadsync.sandbox import SandboxConfig, create_app
from leadsync.state import DELIVERED, FAILED
from tests.unit.sandbox_transport import TestClientTransport, sha

TOKEN = "sandbox-linkedin-token"
RULE = "20000002"
NOW = 1_764_000_000
PATH = "/rest/conversionEvents"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "LinkedIn-Version": "202603",
           "X-Restli-Protocol-Version": "2.0.0", "X-RestLi-Method": "BATCH_CREATE"}


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
    return TestClient(create_app(SandboxConfig(clock=clock)))


def element(event_id: str = "evt-1", **overrides: Any) -> dict[str, Any]:
    # The shape of LinkedIn's documented BATCH_CREATE example.
    event: dict[str, Any] = {
        "conversion": f"urn:lla:llaPartnerConversion:{RULE}",
        "conversionHappenedAt": (NOW - 3600) * 1000,
        "conversionValue": {"currencyCode": "USD", "amount": "1500.0"},
        "user": {"userIds": [
            {"idType": "SHA256_EMAIL", "idValue": sha("mike@example.com")},
            {"idType": "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID",
             "idValue": "df5gf5-gh6t7-ph4j7h-fgf6n1"}],
            "userInfo": {"firstName": "mike", "lastName": "smith", "title": "software engineer",
                         "companyName": "microsoft", "countryCode": "US"}},
        "eventId": event_id,
    }
    event.update(overrides)
    return event


def post(client: TestClient, elements: list[Any], headers: dict[str, str] | None = None,
         body: Any = None) -> tuple[int, dict[str, Any]]:
    response = client.post(PATH, json=body if body is not None else {"elements": elements},
                           headers=HEADERS if headers is None else headers)
    return response.status_code, dict(response.json())


def stored(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    return list(client.get("/_sandbox/linkedin/events", params=params).json())


def stats(client: TestClient) -> dict[str, int]:
    return dict(client.get("/_sandbox/stats").json()["linkedin"])


def test_documented_batch_is_accepted_with_one_201_per_element(client: TestClient) -> None:
    status, body = post(client, [element("a"), element("b")])
    assert (status, body) == (200, {"elements": [{"status": 201}, {"status": 201}]})
    events = stored(client)
    assert [(e["destination"], e["event_id"]) for e in events] == [(RULE, "a"), (RULE, "b")]
    assert events[0]["event"] == element("a")
    assert events[0]["event_time"] == NOW - 3600


@pytest.mark.parametrize(("change", "status", "code"), [
    ({"Authorization": "Bearer wrong"}, 401, "INVALID_ACCESS_TOKEN"),
    ({"Authorization": ""}, 401, "INVALID_ACCESS_TOKEN"),
    ({"LinkedIn-Version": "202401"}, 426, "NONEXISTENT_VERSION"),
    ({"LinkedIn-Version": ""}, 400, "VERSION_MISSING"),
    ({"X-Restli-Protocol-Version": "1.0.0"}, 400, None),
    ({"X-RestLi-Method": "CREATE"}, 400, None),
])
def test_header_rules(client: TestClient, change: dict[str, str], status: int,
                      code: str | None) -> None:
    got, body = post(client, [element()], headers={**HEADERS, **change})
    assert got == status and body.get("code") == code
    assert stored(client) == []


@pytest.mark.parametrize(("mutate", "path"), [
    (lambda e: e.update(conversionHappenedAt=NOW - 3600), "/conversionHappenedAt"),  # seconds
    (lambda e: e.update(conversionHappenedAt=(NOW - 91 * 86400) * 1000),
     "/conversionHappenedAt"),
    (lambda e: e.update(conversionHappenedAt=(NOW + 3600) * 1000), "/conversionHappenedAt"),
    (lambda e: e.update(eventId="x" * 65), "/eventId"),
    (lambda e: e.update(conversion="urn:li:partner:1"), "/conversion"),
    (lambda e: e["conversionValue"].pop("amount"), "/conversionValue/amount"),
    (lambda e: e["conversionValue"].update(amount=1500), "/conversionValue/amount"),
    (lambda e: e["conversionValue"].update(currencyCode="usd"), "/conversionValue/currencyCode"),
    (lambda e: e["user"]["userIds"][0].update(idValue="mike@example.com"),
     "/user/userIds/0/idValue"),
    (lambda e: e["user"]["userIds"][0].update(idValue=sha("m").upper()),
     "/user/userIds/0/idValue"),
    (lambda e: e["user"]["userIds"][1].update(idValue=sha("uuid")), "/user/userIds/1/idValue"),
    (lambda e: e["user"]["userIds"][0].update(idType="EMAIL"), "/user/userIds/0/idType"),
    (lambda e: e["user"]["userInfo"].pop("lastName"), "/user/userInfo/lastName"),
    (lambda e: e.update(user={"userIds": []}), "/user"),
    (lambda e: e.update(extra=1), "/extra"),
])
def test_one_bad_element_rejects_the_whole_batch_naming_its_index(
        client: TestClient, mutate: Any, path: str) -> None:
    bad = element("b")
    mutate(bad)
    status, body = post(client, [element("a"), bad, element("c")])
    assert status == 422
    assert body["message"].startswith(f"Index: 1, ERROR :: {path} ::"), body["message"]
    assert li.bad_event_indices(body["message"], 3).keys() == {1}
    assert stored(client) == [] and stats(client)["rejected_requests"] == 1


def test_unknown_rule_is_a_400_naming_the_indices(client: TestClient) -> None:
    other = element("b", conversion="urn:lla:llaPartnerConversion:99")
    status, body = post(client, [element("a"), other])
    assert status == 400 and "indices [1] (0-indexed)" in body["message"]
    assert li.bad_event_indices(body["message"], 2).keys() == {1}


def test_request_level_rules(client: TestClient) -> None:
    assert post(client, [], body={"elements": []})[0] == 400
    assert post(client, [], body={"data": [element()]})[0] == 400
    assert post(client, [element(f"e{i}") for i in range(5001)])[0] == 400
    assert post(client, [element(f"e{i}") for i in range(5000)])[0] == 200


def test_dedup_per_rule_and_event_id(client: TestClient, clock: Clock) -> None:
    post(client, [element("a")])
    post(client, [element("a")])
    post(client, [element("a", conversion="urn:lla:llaPartnerConversion:20000003")])
    clock.now += 49 * 3600
    post(client, [element("a", conversionHappenedAt=(NOW + 48 * 3600) * 1000)])
    assert [e["duplicate"] for e in stored(client)] == [False, True, False, False]
    s = stats(client)
    assert (s["unique_events"], s["duplicate_events"]) == (3, 1)


def add_faults(client: TestClient, *faults: dict[str, Any]) -> None:
    response = client.post("/_sandbox/faults", json={"platform": "linkedin",
                                                     "faults": list(faults)})
    assert response.status_code == 200, response.text


def test_faults(client: TestClient) -> None:
    add_faults(client, {"kind": "throttle"}, {"kind": "http", "status": 503},
               {"kind": "reject_events", "indices": [1]})
    assert post(client, [element()])[0] == 429
    assert client.post(PATH, json={}, headers=HEADERS).status_code == 503
    status, body = post(client, [element("a"), element("b")])
    assert status == 422 and body["message"].startswith("Index: 1, ERROR :: /eventId ::")
    assert post(client, [element()])[0] == 200
    assert stats(client)["faulted_requests"] == 2
    bad = client.post("/_sandbox/faults", json={"platform": "linkedin",
                                                "faults": [{"kind": "tiktok_error"}]})
    assert bad.status_code == 422


def test_the_destination_module_against_the_emulator(client: TestClient) -> None:
    """A mixed batch: the rejected element is recorded as failed, the others land once."""
    now = datetime.fromtimestamp(NOW, UTC)
    dest = DestinationConfig(name="linkedin", type="linkedin", stages={"qualified": RULE})
    creds = li.parse_credentials("http://sandbox", TOKEN, {})
    envelopes = []
    for i in range(5):
        r = {"lead_id": f"L{i}", "stage": "qualified", "email": f"P{i}@Example.com"}
        event = li.build_event(r, dest, RULE, f"id-L{i}", now)
        envelopes.append({"event_id": event["eventId"],
                          "event_time": event["conversionHappenedAt"] // 1000, "body": event})
    add_faults(client, {"kind": "reject_events", "event_ids": ["id-L3"]})
    transport = TestClientTransport(client)
    report = BatchSender(li, creds, dest, transport).deliver(envelopes, now)  # type: ignore[arg-type]
    assert report.outcomes["id-L3"].status == FAILED
    assert "Index: 3" in (report.outcomes["id-L3"].detail or "")
    assert sorted(e for e, o in report.outcomes.items() if o.status == DELIVERED) == [
        "id-L0", "id-L1", "id-L2", "id-L4"]
    landed = stored(client)
    assert sorted(e["event_id"] for e in landed) == ["id-L0", "id-L1", "id-L2", "id-L4"]
    assert landed[0]["event"]["user"]["userIds"][0]["idValue"] == sha("p0@example.com")
    assert stats(client)["duplicate_events"] == 0 and report.acknowledged == 4

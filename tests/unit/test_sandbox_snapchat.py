"""The Snap Conversions API v3 emulator: auth, pixels, event rules, VALID/INVALID bodies,
the Test Event endpoint, dedup, faults, and the real destination module against it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from leadsync.config import DestinationConfig
from leadsync.delivery import BatchSender
from leadsync.destinations import snapchat as sc
from leadsync.sandbox import SandboxConfig, create_app
from leadsync.state import DELIVERED, FAILED
from tests.unit.sandbox_transport import TestClientTransport, sha

TOKEN = "sandbox-snapchat-token"
PIXEL = "5a9d5a9d-0000-4000-8000-000000000001"
NOW = 1_764_000_000
PATH = f"/v3/{PIXEL}/events"


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


def event(event_id: str = "EBBE201", **overrides: Any) -> dict[str, Any]:
    # After Snap's "Using the API" example, as an offline event.
    body: dict[str, Any] = {
        "event_name": "PURCHASE", "event_time": NOW - 3600, "event_id": event_id,
        "action_source": "OFFLINE",
        "user_data": {"em": [sha("person@example.com")], "ph": [sha("448444124653")],
                      "sc_click_id": "click-1", "client_ip_address": "203.0.113.9",
                      "client_user_agent": "UA"},
        "custom_data": {"currency": "USD", "value": "10"},
    }
    body.update(overrides)
    return body


def post(client: TestClient, events: list[Any], *, token: str | None = TOKEN,
         path: str = PATH, query_token: bool = False) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token and not query_token else {}
    params = {"access_token": token} if token and query_token else None
    response = client.post(path, json={"data": events}, headers=headers, params=params)
    return response.status_code, dict(response.json())


def stored(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    return list(client.get("/_sandbox/snapchat/events", params=params).json())


def stats(client: TestClient) -> dict[str, int]:
    return dict(client.get("/_sandbox/stats").json()["snapchat"])


def test_offline_event_is_valid_with_either_token_form(client: TestClient) -> None:
    status, body = post(client, [event("a")])
    assert status == 200 and body["status"] == "VALID"
    assert post(client, [event("b")], query_token=True)[1]["status"] == "VALID"
    events = stored(client)
    assert [(e["destination"], e["event_name"], e["event_id"]) for e in events] == [
        (PIXEL, "PURCHASE", "a"), (PIXEL, "PURCHASE", "b")]
    assert events[0]["event"] == event("a")


@pytest.mark.parametrize(("token", "path", "status"), [
    (None, PATH, 401), ("wrong", PATH, 401), (TOKEN, "/v3/unknown-pixel-1/events", 403)])
def test_auth_and_pixel(client: TestClient, token: str | None, path: str, status: int) -> None:
    got, body = post(client, [event()], token=token, path=path)
    assert got == status and body["status"] == "INVALID"
    assert stored(client) == []


@pytest.mark.parametrize(("mutate", "where"), [
    (lambda e: e["user_data"].update(em=["person@example.com"]), "data[1].user_data.em"),
    (lambda e: e["user_data"].update(em=[sha("p").upper()]), "data[1].user_data.em"),
    (lambda e: e["user_data"].update(ph=sha("448444124653")[:60]), "data[1].user_data.ph"),
    (lambda e: e["user_data"].update(sc_click_id=sha("click")), "data[1].user_data.sc_click_id"),
    (lambda e: e["user_data"].update(client_ip_address="300.1.1.1"),
     "data[1].user_data.client_ip_address"),
    (lambda e: e.update(user_data={"sc_click_id": "c"}), "data[1].user_data"),
    (lambda e: e.update(event_time=(NOW - 60) * 1000), "data[1].event_time"),
    (lambda e: e.update(event_time=NOW - 38 * 86400), "data[1].event_time"),
    (lambda e: e.update(event_time=NOW + 3600), "data[1].event_time"),
    (lambda e: e.update(event_name="QualifiedLead"), "data[1].event_name"),
    (lambda e: e.update(action_source="CRM"), "data[1].action_source"),
    (lambda e: e.update(action_source="WEB"), "data[1].event_source_url"),
    (lambda e: e.pop("custom_data"), "data[1].custom_data"),
    (lambda e: e["custom_data"].update(currency="dollars"), "data[1].custom_data.currency"),
    (lambda e: e.update(bogus=1), "data[1].bogus"),
])
def test_one_bad_event_rejects_the_whole_request_naming_it(client: TestClient, mutate: Any,
                                                           where: str) -> None:
    bad = event("b")
    mutate(bad)
    status, body = post(client, [event("a"), bad, event("c")])
    assert status == 400 and body["status"] == "INVALID" and body["event"] == 1
    assert body["reason"].startswith(f"{where}:"), body["reason"]
    assert sc.parse_response(status, str(body).replace("'", '"'), {}, 3).kind.value in (
        "permanent",)
    assert stored(client) == [] and stats(client)["rejected_requests"] == 1


def test_sign_up_needs_no_value_and_web_events_take_a_url(client: TestClient) -> None:
    sign_up = event("a", event_name="SIGN_UP")
    del sign_up["custom_data"]
    web = event("b", action_source="WEB", event_source_url="https://example.com/")
    assert post(client, [sign_up, web])[1]["status"] == "VALID"


def test_request_level_rules(client: TestClient) -> None:
    assert post(client, [])[0] == 400
    assert post(client, [event(f"e{i}") for i in range(2001)])[0] == 400
    assert client.post(PATH, json={"data": [event()], "pixel_id": PIXEL},
                       headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 400
    assert post(client, [event(f"e{i}") for i in range(2000)])[0] == 200


def test_validate_endpoint_stores_test_events_only(client: TestClient) -> None:
    status, body = post(client, [event()], path=f"{PATH}/validate")
    assert status == 200 and body["test_event"] is True
    assert body["event_logs"] == [{"event": 0, "status": "VALID", "warnings": []}]
    assert stored(client) == [] and len(stored(client, test=True)) == 1


def test_dedup_within_48_hours(client: TestClient, clock: Clock) -> None:
    post(client, [event()])
    post(client, [event()])
    clock.now += 49 * 3600
    post(client, [event(event_time=NOW + 48 * 3600)])
    assert [e["duplicate"] for e in stored(client)] == [False, True, False]


def add_faults(client: TestClient, *faults: dict[str, Any]) -> None:
    response = client.post("/_sandbox/faults", json={"platform": "snapchat",
                                                     "faults": list(faults)})
    assert response.status_code == 200, response.text


def test_faults(client: TestClient) -> None:
    add_faults(client, {"kind": "throttle"}, {"kind": "http", "status": 502},
               {"kind": "reject_events", "indices": [1]})
    assert post(client, [event()])[0] == 429
    assert client.post(PATH, json={}).status_code == 502
    status, body = post(client, [event("a"), event("b")])
    assert status == 400 and body["event"] == 1
    assert post(client, [event()])[0] == 200
    assert stats(client)["faulted_requests"] == 2


def test_the_destination_module_against_the_emulator(client: TestClient) -> None:
    """A mixed batch: the rejected event is recorded as failed, the others land once."""
    now = datetime.fromtimestamp(NOW, UTC)
    dest = DestinationConfig(name="snapchat", type="snapchat", stages={"lead": "SIGN_UP"})
    creds = sc.parse_credentials("http://sandbox", TOKEN, {"pixel_id": PIXEL})
    envelopes = []
    for i in range(5):
        r = {"lead_id": f"L{i}", "stage": "lead", "email": f"p{i}@example.com",
             "phone": "0844 412 4653", "country": "GB"}
        body = sc.build_event(r, dest, "SIGN_UP", f"id-L{i}", now)
        envelopes.append({"event_id": body["event_id"], "event_time": body["event_time"],
                          "body": body})
    add_faults(client, {"kind": "reject_events", "event_ids": ["id-L3"]})
    report = BatchSender(sc, creds, dest, TestClientTransport(client)).deliver(  # type: ignore[arg-type]
        envelopes, now)
    assert report.outcomes["id-L3"].status == FAILED
    assert "data[3]" in (report.outcomes["id-L3"].detail or "")
    assert sorted(e for e, o in report.outcomes.items() if o.status == DELIVERED) == [
        "id-L0", "id-L1", "id-L2", "id-L4"]
    landed = stored(client)
    assert sorted(e["event_id"] for e in landed) == ["id-L0", "id-L1", "id-L2", "id-L4"]
    assert landed[0]["event"]["user_data"]["ph"] == [sha("448444124653")]
    assert stats(client)["duplicate_events"] == 0 and report.acknowledged == 4

"""The TikTok Events API emulator: auth, limits, field names, hash format, shapes, dedup,
faults, and the real destination module against it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from leadsync.config import DestinationConfig
from leadsync.delivery import BatchSender
from leadsync.destinations import tiktok as tt
from leadsync.sandbox import SandboxConfig, create_app
from leadsync.state import DELIVERED, FAILED
from tests.unit.sandbox_transport import TestClientTransport, sha

TOKEN = "sandbox-tiktok-token"
CRM_SET = "SANDBOXCRM00000000001"
PIXEL = "SANDBOXPIXEL000000001"
NOW = 1_764_000_000
PATH = "/open_api/v1.3/event/track/"


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


def crm_event(event_id: str = "evt-1", **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": "QualifiedLead", "event_time": NOW - 3600, "event_id": event_id,
        "user": {"email": sha("jane@example.com"), "phone": sha("+16505550123"),
                 "ttclid": "E.C.P.abc", "ip": "203.0.113.9", "user_agent": "UA"},
        "lead": {"lead_id": "7123456789012345678", "lead_event_source": "HubSpot"},
        "properties": {"value": 10.0, "currency": "USD"},
    }
    event.update(overrides)
    return event


def post(client: TestClient, events: list[Any], *, token: str | None = TOKEN,
         source: str = "crm", source_id: str = CRM_SET, **extra: Any) -> dict[str, Any]:
    headers = {"Access-Token": token} if token else {}
    body = {"event_source": source, "event_source_id": source_id, "data": events, **extra}
    response = client.post(PATH, json=body, headers=headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def stored(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    return list(client.get("/_sandbox/tiktok/events", params=params).json())


def stats(client: TestClient) -> dict[str, int]:
    return dict(client.get("/_sandbox/stats").json()["tiktok"])


def test_crm_event_is_accepted_and_stored(client: TestClient) -> None:
    body = post(client, [crm_event()])
    assert body["code"] == 0 and body["message"] == "OK" and body["request_id"]
    [event] = stored(client)
    assert event["destination"] == CRM_SET
    assert (event["event_name"], event["event_id"]) == ("QualifiedLead", "evt-1")
    assert event["event"] == crm_event()


def test_web_event_with_page(client: TestClient) -> None:
    event = crm_event(page={"url": "https://example.com"})
    del event["lead"]
    assert post(client, [event], source="web", source_id=PIXEL)["code"] == 0


@pytest.mark.parametrize(("token", "source_id"), [(None, CRM_SET), ("wrong", CRM_SET),
                                                  (TOKEN, "UNKNOWN0001")])
def test_auth_and_event_source_failures_are_40001(client: TestClient, token: str | None,
                                                  source_id: str) -> None:
    assert post(client, [crm_event()], token=token, source_id=source_id)["code"] == 40001
    assert stored(client) == []


@pytest.mark.parametrize(("mutate", "where"), [
    (lambda e: e["user"].update(email="jane@example.com"), "Batch.1.user.email"),
    (lambda e: e["user"].update(email=sha("x").upper()), "Batch.1.user.email"),
    (lambda e: e["user"].update(ttclid=sha("x")), "Batch.1.user.ttclid"),
    (lambda e: e["user"].update(ip="300.1.1.1"), "Batch.1.user.ip"),
    (lambda e: e["user"].update(unknown="x"), "Batch.1.user.unknown"),
    (lambda e: e.update(event_time=(NOW - 60) * 1000), "Batch.1.event_time"),
    (lambda e: e.update(event_time=str(NOW)), "Batch.1.event_time"),
    (lambda e: e.update(event_time=NOW + 3600), "Batch.1.event_time"),
    (lambda e: e.pop("event"), "Batch.1.event"),
    (lambda e: e.update(extra_field=1), "Batch.1.extra_field"),
    (lambda e: e.update(lead={"lead_id": sha("7123456789012345678")}), "Batch.1.lead.lead_id"),
    (lambda e: e.update(lead={"lead_id": "7123456789012345678"}),
     "Batch.1.lead.lead_event_source"),
    (lambda e: e["properties"].update(currency="dollars"), "Batch.1.properties.currency"),
    (lambda e: e["properties"].pop("currency"), "Batch.1.properties.currency"),
    (lambda e: e.update(user={"ip": "203.0.113.9"}, lead={"lead_event_source": "X"}),
     "Batch.1.user"),
])
def test_one_bad_event_rejects_the_whole_batch(client: TestClient, mutate: Any,
                                               where: str) -> None:
    bad = crm_event("evt-2")
    mutate(bad)
    body = post(client, [crm_event(), bad, crm_event("evt-3")])
    assert body["code"] == 40002
    assert body["message"].startswith(f"{where}:"), body["message"]
    assert stored(client) == []
    assert stats(client)["rejected_requests"] == 1


def test_request_level_rules(client: TestClient) -> None:
    assert post(client, [crm_event(f"e{i}") for i in range(1001)])["code"] == 40002
    assert post(client, [])["code"] == 40002
    assert post(client, [crm_event()], source="email")["code"] == 40002
    assert post(client, [crm_event()], partner="x")["code"] == 40002
    event = crm_event()
    assert post(client, [event], source="web", source_id=PIXEL)["code"] == 40002  # lead on web
    assert post(client, [crm_event(f"e{i}") for i in range(1000)])["code"] == 0


def test_dedup_within_48_hours_and_test_events(client: TestClient, clock: Clock) -> None:
    post(client, [crm_event()])
    post(client, [crm_event()])
    clock.now += 49 * 3600
    post(client, [crm_event(event_time=NOW + 48 * 3600)])
    post(client, [crm_event()], test_event_code="TEST1")
    assert [e["duplicate"] for e in stored(client)] == [False, True, False]
    assert len(stored(client, test=True)) == 1
    s = stats(client)
    assert (s["unique_events"], s["duplicate_events"], s["test_events"]) == (2, 1, 1)


def add_faults(client: TestClient, *faults: dict[str, Any]) -> None:
    response = client.post("/_sandbox/faults", json={"platform": "tiktok",
                                                     "faults": list(faults)})
    assert response.status_code == 200, response.text


def test_faults(client: TestClient) -> None:
    add_faults(client, {"kind": "throttle"}, {"kind": "tiktok_error", "code": 50002},
               {"kind": "http", "status": 502}, {"kind": "reject_events", "indices": [1]})
    assert post(client, [crm_event()])["code"] == 40100
    assert post(client, [crm_event()])["code"] == 50002
    assert client.post(PATH, json={}, headers={"Access-Token": TOKEN}).status_code == 502
    body = post(client, [crm_event("a"), crm_event("b")])
    assert body["code"] == 40002 and body["message"].startswith("Batch.1.")
    assert post(client, [crm_event()])["code"] == 0
    assert stats(client)["faulted_requests"] == 3
    bad = client.post("/_sandbox/faults", json={"platform": "tiktok",
                                                "faults": [{"kind": "graph_error", "code": 1}]})
    assert bad.status_code == 422


def test_the_destination_module_against_the_emulator(client: TestClient) -> None:
    """A mixed batch: the rejected event is recorded as failed, the others land once."""
    now = datetime.fromtimestamp(NOW, UTC)
    dest = DestinationConfig(name="tiktok", type="tiktok", crm_name="HubSpot",
                             stages={"qualified": "QualifiedLead"})
    creds = tt.parse_credentials("http://sandbox", TOKEN, {"event_source_id": CRM_SET})
    rows = [{"lead_id": f"L{i}", "stage": "qualified", "email": f"p{i}@example.com",
             "tiktok_lead_id": "7123456789012345678"} for i in range(5)]
    envelopes = []
    for r in rows:
        event = tt.build_event(r, dest, "QualifiedLead", f"id-{r['lead_id']}", now)
        envelopes.append({"event_id": event["event_id"], "event_time": event["event_time"],
                          "body": event})
    add_faults(client, {"kind": "reject_events", "event_ids": ["id-L3"]})
    transport = TestClientTransport(client)
    report = BatchSender(tt, creds, dest, transport).deliver(envelopes, now)  # type: ignore[arg-type]
    assert report.outcomes["id-L3"].status == FAILED
    assert "Batch.3" in (report.outcomes["id-L3"].detail or "")
    assert sorted(e for e, o in report.outcomes.items() if o.status == DELIVERED) == [
        "id-L0", "id-L1", "id-L2", "id-L4"]
    assert sorted(e["event_id"] for e in stored(client)) == ["id-L0", "id-L1", "id-L2",
                                                             "id-L4"]
    assert stats(client)["duplicate_events"] == 0
    assert report.acknowledged == 4

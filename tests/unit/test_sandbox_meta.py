"""Tests of the local platform sandbox: the Meta Conversions API emulator."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi.testclient import TestClient

from leadsync.sandbox import SandboxConfig, SandboxServer, create_app
from leadsync.sandbox.server import check_loopback

TOKEN = "sandbox-meta-token"
PIXEL = "1234567890123456"
OTHER_PIXEL = "6543210987654321"
NOW = 1_764_000_000
DAY = 24 * 3600


def sha(value: str) -> str:
    """Returns the lowercase hex SHA-256 of a string."""
    return hashlib.sha256(value.encode()).hexdigest()


class FrozenClock:
    """A clock tests can set and advance."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def client(clock: FrozenClock) -> TestClient:
    config = SandboxConfig(meta_pixels={PIXEL, OTHER_PIXEL}, clock=clock)
    return TestClient(create_app(config))


def crm_event(event_id: str = "evt-1", **overrides: Any) -> dict[str, Any]:
    """A valid CRM-shaped event, as the pipeline sends it."""
    event: dict[str, Any] = {
        "event_name": "Marketing Qualified Lead",
        "event_time": NOW - 3600,
        "event_id": event_id,
        "action_source": "system_generated",
        "user_data": {
            "em": [sha("jane@example.com")],
            "ph": [sha("16505551212")],
            "lead_id": "1234567890123456",
        },
        "custom_data": {
            "event_source": "crm",
            "lead_event_source": "HubSpot",
            "value": 120.0,
            "currency": "usd",
        },
    }
    event.update(overrides)
    return event


def website_event(event_id: str = "web-1") -> dict[str, Any]:
    """A valid website-shaped event."""
    return {
        "event_name": "Lead",
        "event_time": NOW - 60,
        "event_id": event_id,
        "action_source": "website",
        "event_source_url": "https://example.com/quiz/done",
        "user_data": {
            "em": [sha("jane@example.com")],
            "client_user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
            "client_ip_address": "203.0.113.7",
            "fbc": "fb.1.1554763741205.AbCdEfGhIjKlMnOpQrStUvWxYz1234567890",
            "fbp": "fb.1.1558571054389.1098115397",
        },
    }


def post(
    client: TestClient,
    events: list[Any] | None,
    *,
    token: str | None = TOKEN,
    pixel: str = PIXEL,
    version: str = "v25.0",
    **extra: Any,
) -> Any:
    """Posts events as a JSON body."""
    body: dict[str, Any] = dict(extra)
    if events is not None:
        body["data"] = events
    if token is not None:
        body["access_token"] = token
    return client.post(f"/{version}/{pixel}/events", json=body)


def graph_error(response: Any, code: int, subcode: int | None = None) -> dict[str, Any]:
    """Asserts a Graph error envelope and returns ``error``."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {
        "message",
        "type",
        "code",
        "error_subcode",
        "is_transient",
        "error_user_title",
        "error_user_msg",
        "fbtrace_id",
    }
    assert error["code"] == code, error
    assert error["error_subcode"] == subcode, error
    assert error["is_transient"] is False
    assert error["fbtrace_id"]
    return error


def stats(client: TestClient) -> dict[str, int]:
    return client.get("/_sandbox/stats").json()["meta"]


def stored(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/_sandbox/meta/events", params=params)
    assert response.status_code == 200
    return response.json()


def add_faults(client: TestClient, *faults: dict[str, Any]) -> Any:
    return client.post("/_sandbox/faults", json={"platform": "meta", "faults": list(faults)})


# ------------------------------------------------------------------------------------------
# Accepted shapes
# ------------------------------------------------------------------------------------------


def test_crm_event_is_accepted_and_stored(client: TestClient) -> None:
    response = post(client, [crm_event()])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["events_received"] == 1
    assert body["messages"] == []
    assert isinstance(body["fbtrace_id"], str) and body["fbtrace_id"]
    [event] = stored(client)
    assert event["pixel_id"] == PIXEL
    assert event["event_name"] == "Marketing Qualified Lead"
    assert event["event_id"] == "evt-1"
    assert event["event_time"] == NOW - 3600
    assert event["received_at"] == NOW
    assert event["test_event_code"] is None
    assert event["duplicate"] is False
    assert event["event"] == crm_event()


def test_website_event_is_accepted(client: TestClient) -> None:
    assert post(client, [website_event()]).status_code == 200


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda e: e["user_data"].update(em=sha("a@b.co")), id="hashed-plain-string"),
        pytest.param(lambda e: e["user_data"].update(lead_id=123456789012345), id="lead-id-int"),
        pytest.param(lambda e: e["user_data"].update(lead_id="12345678901234567"), id="lead-17"),
        pytest.param(
            lambda e: e.update(
                user_data={"client_ip_address": "2001:db8::1", "client_user_agent": "UA"}
            ),
            id="ip-and-agent-together",
        ),
        pytest.param(lambda e: e.update(user_data={"lead_id": "123456789012345"}), id="only-lead"),
        pytest.param(
            lambda e: e.update(user_data={"external_id": [sha("c-1"), sha("c-2")]}),
            id="external-id-list",
        ),
        pytest.param(lambda e: e["custom_data"].update(currency="USD", value=0), id="value-zero"),
        pytest.param(lambda e: e["custom_data"].update(stage="sql", score=7), id="extra-keys"),
        pytest.param(lambda e: e.pop("custom_data"), id="no-custom-data"),
        pytest.param(lambda e: e.pop("event_id"), id="no-event-id"),
        pytest.param(
            lambda e: e.update(
                data_processing_options=["LDU"],
                data_processing_options_country=1,
                data_processing_options_state=1000,
                opt_out=False,
            ),
            id="ldu",
        ),
        pytest.param(lambda e: e.update(event_time=NOW + 60), id="60s-in-future"),
        pytest.param(lambda e: e.update(event_time=NOW - 7 * DAY), id="exactly-7-days-old"),
        pytest.param(
            lambda e: (
                e.pop("custom_data"),
                e.update(action_source="app", app_data={"advertiser_tracking_enabled": 1}),
            ),
            id="app-with-app-data",
        ),
        pytest.param(
            lambda e: e.update(
                event_name="Purchase",
                custom_data={"value": 10, "currency": "eur", "content_ids": ["sku-1"]},
            ),
            id="purchase-with-value",
        ),
    ],
)
def test_valid_variants_are_accepted(
    client: TestClient, mutate: Callable[[dict[str, Any]], Any]
) -> None:
    event = crm_event()
    mutate(event)
    response = post(client, [event])
    assert response.status_code == 200, response.text
    assert response.json()["events_received"] == 1


def test_form_encoded_sdk_shape_is_accepted(client: TestClient) -> None:
    # The official SDK json.dumps each event, then json-encodes the list as the form field.
    events = [crm_event("e1"), website_event("w1")]
    form = {
        "data": json.dumps([json.dumps(event) for event in events]),
        "access_token": TOKEN,
        "test_event_code": "TEST123",
    }
    response = client.post(f"/v25.0/{PIXEL}/events", data=form)
    assert response.status_code == 200, response.text
    assert response.json()["events_received"] == 2
    listed = stored(client, test=True)
    assert [e["event_id"] for e in listed] == ["e1", "w1"]
    assert listed[0]["event"] == events[0]
    assert listed[0]["test_event_code"] == "TEST123"


def test_form_encoded_plain_list_and_query_token(client: TestClient) -> None:
    form = {"data": json.dumps([crm_event()])}
    response = client.post(f"/v25.0/{PIXEL}/events?access_token={TOKEN}", data=form)
    assert response.status_code == 200, response.text


def test_form_encoded_invalid_event_is_rejected(client: TestClient) -> None:
    bad = crm_event(event_time=float(NOW))
    form = {"data": json.dumps([json.dumps(bad)]), "access_token": TOKEN}
    error = graph_error(client.post(f"/v25.0/{PIXEL}/events", data=form), 100, 2804001)
    assert error["error_user_msg"].startswith("data[0].event_time:")


def test_multipart_form_is_accepted(client: TestClient) -> None:
    response = client.post(
        f"/v25.0/{PIXEL}/events",
        data={"data": json.dumps([crm_event()]), "access_token": TOKEN},
        files={"unused": ("x.txt", b"x")},
    )
    assert response.status_code == 200, response.text


# ------------------------------------------------------------------------------------------
# Request-level rules
# ------------------------------------------------------------------------------------------


def test_missing_token_is_rejected(client: TestClient) -> None:
    error = graph_error(post(client, [crm_event()], token=None), 190)
    assert error["type"] == "OAuthException"
    assert "Invalid OAuth access token" in error["message"]


def test_wrong_token_is_rejected(client: TestClient) -> None:
    graph_error(post(client, [crm_event()], token="nope"), 190)


def test_token_from_query_and_bearer_header(client: TestClient) -> None:
    body = {"data": [crm_event()]}
    by_query = client.post(f"/v25.0/{PIXEL}/events", params={"access_token": TOKEN}, json=body)
    assert by_query.status_code == 200, by_query.text
    by_header = client.post(
        f"/v25.0/{PIXEL}/events", headers={"Authorization": f"Bearer {TOKEN}"}, json=body
    )
    assert by_header.status_code == 200, by_header.text
    bad_header = client.post(
        f"/v25.0/{PIXEL}/events", headers={"Authorization": "Bearer nope"}, json=body
    )
    graph_error(bad_header, 190)


def test_unknown_pixel_is_rejected(client: TestClient) -> None:
    error = graph_error(post(client, [crm_event()], pixel="999"), 100, 33)
    assert "999" in error["message"]


@pytest.mark.parametrize("version", ["25.0", "v25", "latest", "v25.0.1"])
def test_bad_version_is_rejected(client: TestClient, version: str) -> None:
    graph_error(post(client, [crm_event()], version=version), 2500)


@pytest.mark.parametrize("version", ["v25.0", "v24.0", "v3.2"])
def test_good_versions_are_accepted(client: TestClient, version: str) -> None:
    assert post(client, [crm_event()], version=version).status_code == 200


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (None, "required"),
        ("not json", "not valid JSON"),
        ({"event_name": "x"}, "JSON array"),
        ([], "at least one"),
        ("[]", "at least one"),
    ],
)
def test_bad_data_shapes_are_rejected(client: TestClient, data: Any, needle: str) -> None:
    error = graph_error(post(client, data), 100)
    assert needle in error["error_user_msg"] or needle in error["message"]


def test_non_object_event_is_rejected_with_its_index(client: TestClient) -> None:
    error = graph_error(post(client, [crm_event(), 5]), 100, 2804001)
    assert error["error_user_msg"].startswith("data[1]:")


def test_non_json_body_is_rejected(client: TestClient) -> None:
    response = client.post(
        f"/v25.0/{PIXEL}/events?access_token={TOKEN}",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    graph_error(response, 100)


def test_nan_value_is_rejected(client: TestClient) -> None:
    body = json.dumps({"data": [crm_event()], "access_token": TOKEN}).replace("120.0", "NaN")
    response = client.post(
        f"/v25.0/{PIXEL}/events", content=body, headers={"Content-Type": "application/json"}
    )
    graph_error(response, 100)


def test_batch_limit(client: TestClient) -> None:
    events = [crm_event(f"e{i}") for i in range(1000)]
    assert post(client, events).json()["events_received"] == 1000
    error = graph_error(post(client, [*events, crm_event("e1000")]), 100)
    assert "1000" in error["error_user_msg"]
    assert stats(client)["events_received"] == 1000


def test_empty_test_event_code_is_rejected(client: TestClient) -> None:
    graph_error(post(client, [crm_event()], test_event_code=""), 100)


# ------------------------------------------------------------------------------------------
# Event-level rules: each mutation must be rejected, naming data[0].<path>
# ------------------------------------------------------------------------------------------

HEX64 = sha("x")


def _ud(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda e: e["user_data"].update(values)


def _cd(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda e: e["custom_data"].update(values)


def _drop(*path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(event: dict[str, Any]) -> None:
        target = event
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def _set(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda e: e.update(values)


def _website(**user_data: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(event: dict[str, Any]) -> None:
        event.clear()
        event.update(website_event())
        event["user_data"].update(user_data)

    return mutate


INVALID_CASES: list[Any] = [
    # event_name
    pytest.param(_drop("event_name"), "event_name", 2804001, id="event_name-missing"),
    pytest.param(_set(event_name=""), "event_name", 2804001, id="event_name-empty"),
    pytest.param(_set(event_name=7), "event_name", 2804001, id="event_name-int"),
    # event_time
    pytest.param(_drop("event_time"), "event_time", 2804001, id="event_time-missing"),
    pytest.param(_set(event_time=float(NOW)), "event_time", 2804001, id="event_time-float"),
    pytest.param(_set(event_time=str(NOW)), "event_time", 2804001, id="event_time-string"),
    pytest.param(_set(event_time=True), "event_time", 2804001, id="event_time-bool"),
    pytest.param(_set(event_time=NOW * 1000), "event_time", 2804004, id="event_time-millis"),
    pytest.param(_set(event_time=NOW + 61), "event_time", 2804004, id="event_time-future"),
    pytest.param(_set(event_time=NOW - 7 * DAY - 1), "event_time", 2804003, id="too-old"),
    # event_id
    pytest.param(_set(event_id=123), "event_id", 2804001, id="event_id-int"),
    pytest.param(_set(event_id=""), "event_id", 2804001, id="event_id-empty"),
    # action_source
    pytest.param(_drop("action_source"), "action_source", 2804001, id="action_source-missing"),
    pytest.param(_set(action_source="crm"), "action_source", 2804001, id="action_source-enum"),
    # unknown keys
    pytest.param(_set(lead_id="1"), "lead_id", 2804001, id="unknown-top-level-key"),
    pytest.param(_ud(email="x"), "user_data.email", 2804001, id="unknown-user_data-key"),
    # user_data
    pytest.param(_drop("user_data"), "user_data", 2804050, id="user_data-missing"),
    pytest.param(_set(user_data=[]), "user_data", 2804001, id="user_data-list"),
    pytest.param(
        _set(user_data={"client_user_agent": "UA"}), "user_data", 2804050, id="no-customer-info"
    ),
    pytest.param(_set(user_data={}), "user_data", 2804050, id="user_data-empty"),
    pytest.param(_ud(em=["jane@example.com"]), "user_data.em[0]", 2804001, id="em-raw"),
    pytest.param(_ud(em=[HEX64.upper()]), "user_data.em[0]", 2804001, id="em-uppercase-hex"),
    pytest.param(_ud(em=[HEX64[:63]]), "user_data.em[0]", 2804001, id="em-63-chars"),
    pytest.param(_ud(em=hashlib.md5(b"x").hexdigest()), "user_data.em", 2804001, id="em-md5"),
    pytest.param(_ud(ph=[HEX64, 5]), "user_data.ph[1]", 2804001, id="ph-non-string"),
    pytest.param(_ud(ph=[]), "user_data.ph", 2804001, id="ph-empty-list"),
    pytest.param(_ud(ph=None), "user_data.ph", 2804001, id="ph-null"),
    pytest.param(_ud(fn="jane"), "user_data.fn", 2804001, id="fn-raw"),
    pytest.param(_ud(external_id=["crm-42"]), "user_data.external_id[0]", 2804001, id="ext-raw"),
    pytest.param(_ud(country="us"), "user_data.country", 2804001, id="country-raw"),
    pytest.param(_ud(lead_id=HEX64), "user_data.lead_id", 2804001, id="lead_id-hashed"),
    pytest.param(_ud(lead_id="12345"), "user_data.lead_id", 2804001, id="lead_id-short"),
    pytest.param(_ud(lead_id="123456789012345678"), "user_data.lead_id", 2804001, id="lead-18"),
    pytest.param(_ud(lead_id="l-1234567890123456"), "user_data.lead_id", 2804001, id="lead-alpha"),
    pytest.param(_ud(fbc=HEX64), "user_data.fbc", 2804001, id="fbc-hashed"),
    pytest.param(_ud(fbc="IwAR2abc"), "user_data.fbc", 2804001, id="fbc-bare-fbclid"),
    pytest.param(_ud(fbp="1098115397"), "user_data.fbp", 2804001, id="fbp-format"),
    pytest.param(_ud(client_ip_address=HEX64), "user_data.client_ip_address", 2804001, id="ip-h"),
    pytest.param(_ud(client_ip_address="1.2.3"), "user_data.client_ip_address", 2804001, id="ip"),
    pytest.param(_ud(client_user_agent=HEX64), "user_data.client_user_agent", 2804001, id="ua-h"),
    pytest.param(_ud(client_user_agent=["UA"]), "user_data.client_user_agent", 2804001, id="ua-l"),
    # website
    pytest.param(
        _website(client_user_agent=None), "user_data.client_user_agent", 2804001, id="web-ua-null"
    ),
    pytest.param(
        lambda e: (_website()(e), e["user_data"].pop("client_user_agent")),
        "user_data.client_user_agent",
        2804001,
        id="website-without-user-agent",
    ),
    pytest.param(
        lambda e: (_website()(e), e.pop("event_source_url")),
        "event_source_url",
        2804001,
        id="website-without-url",
    ),
    pytest.param(_set(event_source_url="example.com/x"), "event_source_url", 2804001, id="url"),
    # other optional fields
    pytest.param(_set(opt_out="no"), "opt_out", 2804001, id="opt_out-type"),
    pytest.param(_set(action_source="app"), "app_data", 2804001, id="app-without-app_data"),
    pytest.param(
        _set(data_processing_options=["GDPR"]), "data_processing_options", 2804001, id="dpo"
    ),
    pytest.param(
        _set(data_processing_options_country="1"),
        "data_processing_options_country",
        2804001,
        id="dpo-country",
    ),
    # custom_data
    pytest.param(_set(custom_data="x"), "custom_data", 2804001, id="custom_data-type"),
    pytest.param(_cd(currency="US"), "custom_data.currency", 2804001, id="currency-2-letters"),
    pytest.param(_cd(currency="U$D"), "custom_data.currency", 2804001, id="currency-symbol"),
    pytest.param(_cd(value=-1), "custom_data.value", 2804001, id="value-negative"),
    pytest.param(_cd(value="120"), "custom_data.value", 2804001, id="value-string"),
    pytest.param(_cd(value=True), "custom_data.value", 2804001, id="value-bool"),
    pytest.param(_cd(num_items=1.5), "custom_data.num_items", 2804001, id="num_items-float"),
    pytest.param(_cd(contents=["a"]), "custom_data.contents", 2804001, id="contents-type"),
    pytest.param(
        lambda e: (
            e.update(action_source="website", event_source_url="https://x.co"),
            e["user_data"].update(client_user_agent="UA"),
        ),
        "action_source",
        2804001,
        id="crm-not-system_generated",
    ),
    pytest.param(
        _drop("custom_data", "lead_event_source"),
        "custom_data.lead_event_source",
        2804001,
        id="crm-without-lead_event_source",
    ),
    pytest.param(
        _cd(lead_event_source=" "),
        "custom_data.lead_event_source",
        2804001,
        id="crm-blank-lead_event_source",
    ),
    pytest.param(
        _set(event_name="Purchase", custom_data={"currency": "usd"}),
        "custom_data.value",
        2804009,
        id="purchase-without-value",
    ),
]


@pytest.mark.parametrize(("mutate", "path", "subcode"), INVALID_CASES)
def test_invalid_event_is_rejected(
    client: TestClient, mutate: Callable[[dict[str, Any]], Any], path: str, subcode: int
) -> None:
    event = crm_event()
    mutate(event)
    error = graph_error(post(client, [event]), 100, subcode)
    assert error["error_user_msg"].startswith(f"data[0].{path}:"), error["error_user_msg"]
    assert error["error_user_title"]
    assert stored(client) == []
    assert stats(client)["rejected_requests"] == 1


def test_one_bad_event_rejects_the_whole_request(client: TestClient) -> None:
    events = [crm_event(f"e{i}") for i in range(5)]
    events[3]["user_data"]["em"] = ["jane@example.com"]
    error = graph_error(post(client, events), 100, 2804001)
    assert error["error_user_msg"].startswith("data[3].user_data.em[0]:")
    assert stored(client) == []
    assert stats(client) == {
        "requests": 1,
        "accepted_requests": 0,
        "rejected_requests": 1,
        "faulted_requests": 0,
        "events_received": 0,
        "unique_events": 0,
        "duplicate_events": 0,
        "test_events": 0,
    }
    del events[3]
    assert post(client, events).json()["events_received"] == 4


def test_first_bad_event_is_reported(client: TestClient) -> None:
    events = [crm_event(f"e{i}") for i in range(4)]
    events[1]["action_source"] = "nope"
    events[2]["event_time"] = "soon"
    error = graph_error(post(client, events), 100, 2804001)
    assert error["error_user_msg"].startswith("data[1].action_source:")


def test_too_old_event_rejects_the_whole_request_with_frozen_clock(clock: FrozenClock) -> None:
    client = TestClient(create_app(SandboxConfig(clock=clock)))
    fresh = crm_event("fresh", event_time=NOW - 3600)
    old = crm_event("old", event_time=NOW - 7 * DAY - 1)
    error = graph_error(post(client, [fresh, old]), 100, 2804003)
    assert error["error_user_title"] == "Event Timestamp Too Old"
    assert error["error_user_msg"].startswith("data[1].event_time:")
    assert stored(client) == []
    # Same payload is fine one second earlier in the sandbox's (frozen) time.
    clock.advance(-1)
    assert post(client, [fresh, old]).json()["events_received"] == 2


def test_future_tolerance_is_configurable(clock: FrozenClock) -> None:
    client = TestClient(create_app(SandboxConfig(clock=clock, max_future_seconds=0)))
    graph_error(post(client, [crm_event(event_time=NOW + 1)]), 100, 2804004)
    assert post(client, [crm_event(event_time=NOW)]).status_code == 200


# ------------------------------------------------------------------------------------------
# Dedup, test events, stats, reset
# ------------------------------------------------------------------------------------------


def test_dedup_within_window(client: TestClient, clock: FrozenClock) -> None:
    assert post(client, [crm_event("a")]).json()["events_received"] == 1
    clock.advance(47 * 3600)
    # Still counted as received, but flagged duplicate.
    resend = crm_event("a", event_time=int(clock.now) - 60)
    assert post(client, [resend]).json()["events_received"] == 1
    assert stats(client)["unique_events"] == 1
    assert stats(client)["duplicate_events"] == 1
    assert stats(client)["events_received"] == 2
    assert [e["duplicate"] for e in stored(client)] == [False, True]
    assert len(stored(client, unique=True)) == 1


def test_dedup_expires_after_window(client: TestClient, clock: FrozenClock) -> None:
    post(client, [crm_event("a")])
    clock.advance(48 * 3600 + 1)
    resend = crm_event("a", event_time=int(clock.now) - 60)
    assert post(client, [resend]).status_code == 200
    assert stats(client)["unique_events"] == 2
    assert stats(client)["duplicate_events"] == 0


def test_dedup_key_is_pixel_name_and_id(client: TestClient) -> None:
    post(client, [crm_event("a")])
    post(client, [crm_event("a", event_name="Sales Opportunity")])  # other name
    post(client, [crm_event("a")], pixel=OTHER_PIXEL)  # other pixel
    post(client, [crm_event("b")])  # other id
    event = crm_event()
    del event["event_id"]
    post(client, [event, event])  # no id: never deduplicated
    assert stats(client)["unique_events"] == 6
    assert stats(client)["duplicate_events"] == 0
    assert len(stored(client, pixel_id=OTHER_PIXEL)) == 1
    assert len(stored(client, event_id="a")) == 3


def test_duplicates_inside_one_request(client: TestClient) -> None:
    response = post(client, [crm_event("a"), crm_event("a"), crm_event("b")])
    assert response.json()["events_received"] == 3
    assert stats(client)["unique_events"] == 2
    assert stats(client)["duplicate_events"] == 1


def test_test_events_are_stored_apart(client: TestClient) -> None:
    post(client, [crm_event("a")], test_event_code="TEST42")
    post(client, [crm_event("a")], test_event_code="TEST42")
    post(client, [crm_event("a")])  # live: not a duplicate of the test event
    assert [e["event_id"] for e in stored(client)] == ["a"]
    test_events = stored(client, test=True)
    assert [(e["test_event_code"], e["duplicate"]) for e in test_events] == [
        ("TEST42", False),
        ("TEST42", True),
    ]
    counters = stats(client)
    assert counters["events_received"] == 3
    assert counters["test_events"] == 2
    assert counters["unique_events"] == 1
    assert counters["duplicate_events"] == 0


def test_test_event_code_from_query(client: TestClient) -> None:
    response = client.post(
        f"/v25.0/{PIXEL}/events",
        params={"access_token": TOKEN, "test_event_code": "T1"},
        json={"data": [crm_event()]},
    )
    assert response.status_code == 200
    assert stored(client, test=True)[0]["test_event_code"] == "T1"


def test_stats_and_reset(client: TestClient) -> None:
    post(client, [crm_event("a"), crm_event("b")])
    post(client, [crm_event("a")])
    post(client, [crm_event()], token="bad")
    assert stats(client) == {
        "requests": 3,
        "accepted_requests": 2,
        "rejected_requests": 1,
        "faulted_requests": 0,
        "events_received": 3,
        "unique_events": 2,
        "duplicate_events": 1,
        "test_events": 0,
    }
    add_faults(client, {"kind": "slow", "delay_s": 0})
    assert client.post("/_sandbox/reset").status_code == 200
    assert stats(client)["requests"] == 0
    assert stored(client) == []
    assert client.get("/_sandbox/faults").json() == {}
    assert client.get("/_sandbox/health").json()["status"] == "ok"


def test_store_path_persists_across_restarts(tmp_path: Path, clock: FrozenClock) -> None:
    path = str(tmp_path / "sandbox.sqlite")
    first = create_app(SandboxConfig(store_path=path, clock=clock))
    assert post(TestClient(first), [crm_event("a")]).status_code == 200
    first.state.sandbox.close()

    second = TestClient(create_app(SandboxConfig(store_path=path, clock=clock)))
    assert [e["event_id"] for e in stored(second)] == ["a"]
    post(second, [crm_event("a")])  # dedup keys survived the restart
    assert stats(second)["unique_events"] == 1
    assert stats(second)["duplicate_events"] == 1


# ------------------------------------------------------------------------------------------
# Faults
# ------------------------------------------------------------------------------------------


def test_graph_error_fault(client: TestClient) -> None:
    response = add_faults(
        client,
        {
            "kind": "graph_error",
            "code": 2,
            "is_transient": True,
            "message": "Service temporarily unavailable",
            "http_status": 500,
            "times": 2,
        },
    )
    assert response.status_code == 200, response.text
    for _ in range(2):
        faulted = post(client, [crm_event()])
        assert faulted.status_code == 500
        error = faulted.json()["error"]
        assert (error["code"], error["is_transient"]) == (2, True)
        assert error["message"] == "Service temporarily unavailable"
        assert error["error_subcode"] is None
    assert post(client, [crm_event()]).status_code == 200
    counters = stats(client)
    assert (counters["requests"], counters["faulted_requests"], counters["events_received"]) == (
        3,
        2,
        1,
    )


def test_graph_error_fault_defaults_and_precedes_validation(client: TestClient) -> None:
    add_faults(client, {"kind": "graph_error", "code": 1}, {"kind": "graph_error", "code": 190})
    # A fault answers before validation, even for an invalid request.
    first = post(client, [crm_event()], token="bad")
    assert first.status_code == 500
    assert first.json()["error"]["code"] == 1
    assert client.get("/_sandbox/faults").json()["meta"][0]["code"] == 190
    second = post(client, [crm_event()])
    assert second.status_code == 500  # is_transient defaults to true -> 500
    assert client.get("/_sandbox/faults").json() == {"meta": []}


def test_http_fault_returns_non_json_body(client: TestClient) -> None:
    add_faults(client, {"kind": "http", "status": 502, "body": "<html>Bad Gateway</html>"})
    response = post(client, [crm_event()])
    assert response.status_code == 502
    assert response.text == "<html>Bad Gateway</html>"
    assert response.headers["content-type"].startswith("text/html")
    assert stored(client) == []


def test_slow_fault_sleeps_then_processes(client: TestClient) -> None:
    add_faults(client, {"kind": "slow", "delay_s": 0.3})
    started = time.monotonic()
    response = post(client, [crm_event()])
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200
    assert len(stored(client)) == 1


def test_slow_fault_still_validates(client: TestClient) -> None:
    add_faults(client, {"kind": "slow", "delay_s": 0})
    graph_error(post(client, [crm_event()], token="bad"), 190)


def test_timeout_after_processing_stores_then_sleeps(client: TestClient) -> None:
    add_faults(client, {"kind": "timeout_after_processing", "delay_s": 0.3})
    started = time.monotonic()
    response = post(client, [crm_event("lost")])
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200
    assert [e["event_id"] for e in stored(client)] == ["lost"]
    # The client retries with the same event_id: Meta dedups it.
    post(client, [crm_event("lost")])
    assert stats(client)["unique_events"] == 1


@pytest.mark.parametrize(("code", "status"), [(17, None), (4, 400), (80003, 429)])
def test_throttle_fault(client: TestClient, code: int, status: int | None) -> None:
    fault: dict[str, Any] = {"kind": "throttle", "code": code}
    if status is not None:
        fault["http_status"] = status
    add_faults(client, fault)
    response = post(client, [crm_event()])
    assert response.status_code == (status or 400)
    error = response.json()["error"]
    assert error["code"] == code
    assert error["is_transient"] is True
    assert f"(#{code})" in error["message"]
    assert post(client, [crm_event()]).status_code == 200


def test_faults_are_fifo_and_listed(client: TestClient) -> None:
    add_faults(
        client,
        {"kind": "http", "status": 503, "body": "down", "times": 2},
        {"kind": "throttle", "code": 17},
    )
    add_faults(client, {"kind": "graph_error", "code": 2})
    queue = client.get("/_sandbox/faults").json()["meta"]
    assert [(f["kind"], f["times"]) for f in queue] == [
        ("http", 2),
        ("throttle", 1),
        ("graph_error", 1),
    ]
    assert post(client, [crm_event()]).status_code == 503
    assert client.get("/_sandbox/faults").json()["meta"][0]["times"] == 1
    assert post(client, [crm_event()]).status_code == 503
    assert post(client, [crm_event()]).json()["error"]["code"] == 17
    assert post(client, [crm_event()]).json()["error"]["code"] == 2
    assert post(client, [crm_event()]).status_code == 200
    assert client.get("/_sandbox/faults").json() == {"meta": []}


def test_control_routes_do_not_consume_faults(client: TestClient) -> None:
    add_faults(client, {"kind": "http", "status": 502})
    assert client.get("/_sandbox/stats").status_code == 200
    assert client.get("/_sandbox/meta/events").status_code == 200
    assert len(client.get("/_sandbox/faults").json()["meta"]) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"platform": "meta", "faults": [{"kind": "explode"}]},
        {"platform": "nope", "faults": [{"kind": "slow"}]},
        {"platform": "meta", "faults": [{"kind": "slow", "times": 0}]},
        {"platform": "meta", "faults": [{"kind": "http", "status": 200}]},
        {"platform": "meta", "faults": [{"kind": "graph_error"}]},
        {"platform": "meta", "faults": [{"kind": "slow", "delay": 1}]},
    ],
)
def test_invalid_fault_requests_are_refused(client: TestClient, body: dict[str, Any]) -> None:
    assert client.post("/_sandbox/faults", json=body).status_code == 422
    assert client.get("/_sandbox/faults").json() == {}


# ------------------------------------------------------------------------------------------
# Real server over HTTP
# ------------------------------------------------------------------------------------------


def test_sandbox_server_over_http() -> None:
    now = int(time.time())
    event = crm_event("http-1", event_time=now - 60)
    with SandboxServer() as sandbox:
        assert sandbox.url == f"http://127.0.0.1:{sandbox.port}"
        assert sandbox.port > 0
        endpoint = f"{sandbox.url}/v25.0/{PIXEL}/events"

        ok = requests.post(endpoint, json={"data": [event], "access_token": TOKEN}, timeout=5)
        assert ok.status_code == 200, ok.text
        assert ok.json()["events_received"] == 1

        form = {"data": json.dumps([json.dumps(event)]), "access_token": TOKEN}
        assert requests.post(endpoint, data=form, timeout=5).json()["events_received"] == 1

        bad = requests.post(endpoint, json={"data": [event], "access_token": "x"}, timeout=5)
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == 190

        # Response lost after processing: the client times out, yet the event was stored.
        requests.post(
            f"{sandbox.url}/_sandbox/faults",
            json={
                "platform": "meta",
                "faults": [{"kind": "timeout_after_processing", "delay_s": 1}],
            },
            timeout=5,
        ).raise_for_status()
        lost = crm_event("http-lost", event_time=now - 60)
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(endpoint, json={"data": [lost], "access_token": TOKEN}, timeout=0.3)
        ids = [
            e["event_id"]
            for e in requests.get(f"{sandbox.url}/_sandbox/meta/events", timeout=5).json()
        ]
        assert ids == ["http-1", "http-1", "http-lost"]

        # Concurrent resends of one event: exactly one unique copy (the store is thread-safe).
        copies = [copy.deepcopy(crm_event("race", event_time=now - 60)) for _ in range(16)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(
                pool.map(
                    lambda e: (
                        requests.post(
                            endpoint, json={"data": [e], "access_token": TOKEN}, timeout=5
                        ).status_code
                    ),
                    copies,
                )
            )
        assert statuses == [200] * 16
        assert len(sandbox.state.store.list_events("meta", event_id="race", unique=True)) == 1
        counters = requests.get(f"{sandbox.url}/_sandbox/stats", timeout=5).json()["meta"]
        assert counters["unique_events"] == 3
        assert counters["duplicate_events"] == 16
        url = sandbox.url
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{url}/_sandbox/health", timeout=1)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com", "::"])
def test_only_loopback_hosts(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        check_loopback(host)
    with pytest.raises(ValueError, match="loopback"):
        SandboxServer(host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts_are_allowed(host: str) -> None:
    assert check_loopback(host) == host

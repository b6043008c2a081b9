"""Sending one outbox batch: retries, fatal errors, isolation of bad events, acknowledgements,
expiry and splitting, against a fake Meta-like server."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from leadsync.config import DestinationConfig, RetryConfig
from leadsync.delivery import (
    BatchSender,
    DeliveryReport,
    TransientExhaustedError,
    backoff_delay,
    summarize,
)
from leadsync.destinations import meta
from leadsync.destinations.base import FatalDestinationError, HttpRequest
from leadsync.destinations.http import HttpResponse, TransportError
from leadsync.state import DELIVERED, EXPIRED, FAILED

NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
TOKEN = "fake-token"
CREDS = meta.parse_credentials("http://fake", TOKEN, {"pixel_id": "1234567890123456"})
BAD_MESSAGE = "Invalid parameter: user_data.em must be a SHA-256 hash"


def dest(attempts: int = 4, backoff_max: str = "30s") -> DestinationConfig:
    return DestinationConfig(name="meta", type="meta", crm_name="HubSpot",
                             stages={"lead": "Lead"},
                             retry=RetryConfig(attempts=attempts, backoff_base="1s",
                                               backoff_max=backoff_max))


def envelopes(n: int, age: timedelta = timedelta(hours=1), prefix: str = "e") -> list[dict]:
    ts = int((NOW - age).timestamp())
    return [{"event_id": f"{prefix}{i:05d}", "event_time": ts,
             "body": {"event_name": "Lead", "event_time": ts, "event_id": f"{prefix}{i:05d}",
                      "action_source": "system_generated", "user_data": {"em": ["0" * 64]}}}
            for i in range(n)]


def ok(n: int) -> HttpResponse:
    return HttpResponse(200, json.dumps({"events_received": n, "fbtrace_id": "x"}), {})


def graph_error(code: int, subcode: int | None = None, *, transient: bool = False,
                status: int = 400, message: str = "error",
                headers: dict[str, str] | None = None) -> HttpResponse:
    error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code,
                             "is_transient": transient}
    if subcode:
        error["error_subcode"] = subcode
    return HttpResponse(status, json.dumps({"error": error}), headers or {})


class FakeMeta:
    """Duck-types HttpClient. Scripted replies first (HttpResponse, or an exception to
    raise); then it behaves like Meta: a request holding any bad event is rejected whole
    (code 100), otherwise every event is accepted and acknowledged."""

    def __init__(self, script: list[HttpResponse | Exception] | None = None,
                 bad: set[str] | None = None, ack_shortfall: int = 0) -> None:
        self.script = list(script or [])
        self.bad = bad or set()
        self.ack_shortfall = ack_shortfall
        self.bodies: list[str] = []  # every request body received, serialised
        self.accepted: list[str] = []  # event ids, in acceptance order

    def send(self, request: HttpRequest) -> HttpResponse:
        assert request.body is not None
        self.bodies.append(json.dumps(request.body, sort_keys=True))
        if self.script:
            reply = self.script.pop(0)
            if isinstance(reply, Exception):
                raise reply
            if reply.status == 200:
                self.accepted.extend(e["event_id"] for e in request.body["data"])
            return reply
        ids = [e["event_id"] for e in request.body["data"]]
        if self.bad.intersection(ids):
            return graph_error(100, 2804001, message=BAD_MESSAGE)
        self.accepted.extend(ids)
        return ok(len(ids) - self.ack_shortfall)

    @property
    def sizes(self) -> list[int]:
        return [len(json.loads(b)["data"]) for b in self.bodies]


def sender(client: FakeMeta, sleeps: list[float] | None = None, **kw: Any) -> BatchSender:
    record = sleeps if sleeps is not None else []
    return BatchSender(meta, CREDS, dest(**kw), client,  # type: ignore[arg-type]
                       sleep=record.append, rng=random.Random(1))


def statuses(report: DeliveryReport) -> Counter[str]:
    return Counter(o.status for o in report.outcomes.values())


def test_ok_path() -> None:
    fake = FakeMeta()
    report = sender(fake).deliver(envelopes(10), NOW)

    assert report.error is None
    assert statuses(report) == {DELIVERED: 10}
    assert (report.requests, report.retries, report.acknowledged) == (1, 0, 10)
    assert sorted(fake.accepted) == [f"e{i:05d}" for i in range(10)]
    assert TOKEN in fake.bodies[0]  # the token is sent...
    assert summarize(report) == {"sent": 10, "acknowledged": 10, "delivered": 10, "failed": 0,
                                 "expired": 0, "duplicates": 0, "deferred": 0, "requests": 1,
                                 "retries": 0}


@pytest.mark.parametrize("first", [
    graph_error(2, transient=True, status=500),
    graph_error(1),
    HttpResponse(502, "<html>Bad Gateway</html>", {}),
    TransportError("no response from fake: ReadTimeout"),
], ids=["code2", "code1", "502", "transport"])
def test_transient_then_success(first: HttpResponse | Exception) -> None:
    fake = FakeMeta(script=[first])
    sleeps: list[float] = []
    report = sender(fake, sleeps).deliver(envelopes(5), NOW)

    assert report.error is None
    assert statuses(report) == {DELIVERED: 5}
    assert (report.requests, report.retries) == (2, 1)
    assert len(sleeps) == 1
    assert fake.bodies[0] == fake.bodies[1]  # the same request, same event ids
    assert sorted(fake.accepted) == [f"e{i:05d}" for i in range(5)]  # once


def test_transient_exhausted_leaves_the_batch_pending() -> None:
    fake = FakeMeta(script=[graph_error(2, transient=True, status=503)] * 10)
    sleeps: list[float] = []
    report = sender(fake, sleeps, attempts=3).deliver(envelopes(5), NOW)

    assert isinstance(report.error, TransientExhaustedError)
    assert "3 attempts" in str(report.error)
    assert report.outcomes == {}  # nothing decided: every event stays pending
    assert (report.requests, report.retries) == (3, 2)
    assert len(sleeps) == 2
    assert len(set(fake.bodies)) == 1
    assert fake.accepted == []


def test_throttling_honours_the_platform_hint() -> None:
    fake = FakeMeta(script=[graph_error(17, status=400),
                            graph_error(4, status=400, headers={"Retry-After": "12"})])
    sleeps: list[float] = []
    report = sender(fake, sleeps, backoff_max="45s").deliver(envelopes(3), NOW)

    assert statuses(report) == {DELIVERED: 3}
    assert sleeps[0] >= 45.0  # Graph's throttle default (60 s), capped by backoff_max
    assert sleeps[0] <= 45.0
    assert sleeps[1] >= 12.0


@pytest.mark.parametrize("reply", [
    graph_error(190, 463, message="Error validating access token"),
    graph_error(100, 33, message="Object with ID '1' does not exist"),
    graph_error(200, status=403),
    HttpResponse(404, "<html>Not Found</html>", {}),
])
def test_fatal_stops_without_retrying(reply: HttpResponse) -> None:
    fake = FakeMeta(script=[reply])
    sleeps: list[float] = []
    report = sender(fake, sleeps).deliver(envelopes(5), NOW)

    assert isinstance(report.error, FatalDestinationError)
    assert report.outcomes == {}
    assert report.requests == 1
    assert sleeps == []


def test_fatal_message_does_not_leak_the_token() -> None:
    fake = FakeMeta(script=[graph_error(190, message="Invalid OAuth access token.")])
    report = sender(fake).deliver(envelopes(1), NOW)
    assert TOKEN not in str(report.error)


def test_one_bad_event_among_1000_is_isolated_by_bisection() -> None:
    n = 1000
    fake = FakeMeta(bad={"e00637"})
    report = sender(fake).deliver(envelopes(n), NOW)

    assert report.error is None
    bad = report.outcomes["e00637"]
    assert (bad.status, bad.reason) == (FAILED, "rejected")
    assert BAD_MESSAGE in (bad.detail or "")
    assert statuses(report) == {DELIVERED: n - 1, FAILED: 1}
    # The other 999 reached the platform exactly once each.
    assert len(fake.accepted) == n - 1
    assert set(fake.accepted) == {f"e{i:05d}" for i in range(n)} - {"e00637"}
    assert report.acknowledged == n - 1
    # One request per level for each half: about 2·log2(n).
    depth = math.ceil(math.log2(n))
    assert depth < report.requests <= 2 * depth + 1
    assert report.retries == 0


def test_two_bad_events_are_both_isolated() -> None:
    fake = FakeMeta(bad={"e00003", "e00200"})
    report = sender(fake).deliver(envelopes(256), NOW)

    assert {k for k, o in report.outcomes.items() if o.status == FAILED} == {"e00003", "e00200"}
    assert Counter(fake.accepted) == Counter({f"e{i:05d}": 1 for i in range(256)
                                              if i not in (3, 200)})
    assert report.requests <= 4 * math.ceil(math.log2(256)) + 1


def test_a_single_bad_event_fails_with_the_platform_message() -> None:
    fake = FakeMeta(bad={"e00000"})
    report = sender(fake).deliver(envelopes(1), NOW)
    assert report.outcomes["e00000"].status == FAILED
    assert BAD_MESSAGE in (report.outcomes["e00000"].detail or "")
    assert report.requests == 1


def test_events_received_mismatch_is_not_delivered() -> None:
    fake = FakeMeta(ack_shortfall=1)
    report = sender(fake).deliver(envelopes(10), NOW)

    assert report.error is None
    assert statuses(report) == {FAILED: 10}
    outcome = report.outcomes["e00000"]
    assert outcome.reason == "ack_mismatch"
    assert "9 of 10" in (outcome.detail or "")
    assert report.acknowledged == 0
    assert summarize(report)["delivered"] == 0


def test_events_that_aged_out_while_pending_expire_unsent() -> None:
    fresh = envelopes(4, age=timedelta(days=1), prefix="f")
    stale = envelopes(3, age=timedelta(days=7), prefix="s")  # past the 7-day limit (+ margin)
    edge = envelopes(1, age=timedelta(days=7) - timedelta(minutes=2), prefix="k")  # still ok
    fake = FakeMeta()
    report = sender(fake).deliver(fresh + stale + edge, NOW)

    assert statuses(report) == {DELIVERED: 5, EXPIRED: 3}
    assert all(report.outcomes[e["event_id"]].reason == "event_too_old" for e in stale)
    assert sorted(fake.accepted) == sorted(e["event_id"] for e in fresh + edge)
    assert summarize(report)["expired"] == 3


def test_a_batch_that_aged_out_entirely_sends_nothing() -> None:
    fake = FakeMeta()
    report = sender(fake).deliver(envelopes(5, age=timedelta(days=8)), NOW)
    assert statuses(report) == {EXPIRED: 5}
    assert report.requests == 0
    assert fake.bodies == []


def test_batches_larger_than_the_platform_limit_are_split() -> None:
    fake = FakeMeta()
    report = sender(fake).deliver(envelopes(2500), NOW)

    assert fake.sizes == [1000, 1000, 500]
    assert max(fake.sizes) <= meta.LIMITS.max_batch_events
    assert statuses(report) == {DELIVERED: 2500}
    assert len(fake.accepted) == len(set(fake.accepted)) == 2500


def test_an_exhausted_group_keeps_earlier_groups_outcomes() -> None:
    # First group of 1000 accepted, the second keeps failing: its events stay pending.
    fake = FakeMeta(script=[ok(1000)] + [graph_error(2, transient=True, status=500)] * 5)
    report = sender(fake, attempts=2).deliver(envelopes(1500), NOW)

    assert isinstance(report.error, TransientExhaustedError)
    assert statuses(report) == {DELIVERED: 1000}
    assert all(f"e{i:05d}" not in report.outcomes for i in range(1000, 1500))


# -- backoff --------------------------------------------------------------------------------


def test_backoff_is_capped_and_jittered() -> None:
    retry = RetryConfig(backoff_base="1s", backoff_max="20s")
    rng = random.Random(7)
    for attempt in range(12):
        cap = min(20.0, 2.0 ** attempt)
        delays = [backoff_delay(attempt, retry, None, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap / 2  # jitter spreads over the range
    assert backoff_delay(50, retry, None, rng) <= 20.0  # no overflow, still capped


def test_backoff_respects_the_platform_hint_within_the_cap() -> None:
    retry = RetryConfig(backoff_base="1s", backoff_max="60s")
    rng = random.Random(3)
    for attempt in range(6):
        assert backoff_delay(attempt, retry, 15.0, rng) >= 15.0
        assert backoff_delay(attempt, retry, 3600.0, rng) == 60.0
        assert backoff_delay(attempt, retry, 0.0, rng) >= 0.0

"""Sending one outbox batch: retries with backoff, isolation of bad events, per-event outcomes.

Platform-agnostic: the destination module builds requests and classifies responses; this
module decides what to do with each class.

- transient: retry the same request (same event ids: the platform dedups) with exponential
  backoff and full jitter, honouring the platform's retry hint;
- permanent: the request is rejected as a whole (Meta rejects a batch for one bad event):
  drop the events the platform names, else split the batch in halves until each bad event is
  alone, record it as failed with the platform's message, and deliver the rest once;
- fatal: stop with a message that says what to fix.

An accepted request may still settle some events differently (Google Ads API partial
failures): named failures are recorded as failed, events the platform already had are
delivered (by the earlier request), and events it asks to see again later stay pending in the
outbox for the next run. A receipt (an asynchronous platform's request id) is kept with each
delivered event so that a later run can check how the request was processed.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from leadsync.config import DestinationConfig, RetryConfig
from leadsync.destinations.base import Destination, FatalDestinationError, ResultKind, SendResult
from leadsync.destinations.http import HttpClient, TransportError
from leadsync.redact import clean_message
from leadsync.state import DELIVERED, EXPIRED, FAILED, PENDING, EventOutcome
from leadsync.state.model import ACK_MISMATCH, RECEIPT, REJECTED

log = logging.getLogger(__name__)

#: Ledger reason of an event delivered in a request the platform processes later; the
#: ledger detail holds the platform's request id (see :mod:`leadsync.request_status`).
RECEIPT_REASON = RECEIPT
#: Ledger reason of an event the platform already had (delivered by an earlier request).
DUPLICATE_REASON = "duplicate"
#: Ledger reason of a pending event the platform asked to send again later.
DEFERRED_REASON = "deferred"


class TransientExhaustedError(RuntimeError):
    """Transient errors outlasted the retries; the rest of the batch stays pending."""


@dataclass
class DeliveryReport:
    """Per-event outcomes of one batch (events without one stay pending)."""

    outcomes: dict[str, EventOutcome] = field(default_factory=dict)
    requests: int = 0
    retries: int = 0
    acknowledged: int = 0
    duplicates: int = 0
    deferred: int = 0
    error: Exception | None = None

    def count(self, status: str) -> int:
        """How many events ended with ``status``."""
        return sum(1 for o in self.outcomes.values() if o.status == status)


def backoff_delay(attempt: int, retry: RetryConfig, hint: float | None,
                  rng: random.Random) -> float:
    """Full-jitter exponential backoff, never shorter than the platform's hint."""
    cap = min(retry.backoff_max.total_seconds(),
              retry.backoff_base.total_seconds() * (2 ** attempt))
    delay = rng.uniform(0, cap)
    if hint is not None:
        delay = max(delay, min(hint, retry.backoff_max.total_seconds()))
    return delay


class BatchSender:
    """Delivers envelopes ``{"event_id", "event_time", "body"}`` of one destination."""

    def __init__(
        self,
        module: Destination,
        creds: Any,
        dest: DestinationConfig,
        client: HttpClient,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.module = module
        self.creds = creds
        self.dest = dest
        self.client = client
        self.sleep = sleep
        self.rng = rng or random.Random()

    def deliver(self, envelopes: list[dict[str, Any]], now: datetime) -> DeliveryReport:
        """Sends the batch; returns what happened to each event."""
        report = DeliveryReport()
        limits = self.module.LIMITS
        max_age = self.dest.max_event_age or limits.max_event_age
        sendable = []
        for env in envelopes:
            # An event that aged out while pending would sink the whole request (Meta): it is
            # recorded as expired instead of sent.
            if max_age is not None and env["event_time"] < (
                now - max_age + limits.send_margin
            ).timestamp():
                report.outcomes[env["event_id"]] = EventOutcome(EXPIRED, "event_too_old",
                                                                 "aged out while pending")
            else:
                sendable.append(env)
        try:
            for start in range(0, len(sendable), limits.max_batch_events):
                self._send_group(sendable[start : start + limits.max_batch_events], report)
        except (TransientExhaustedError, FatalDestinationError) as exc:
            report.error = exc
        return report

    def _send_group(self, group: list[dict[str, Any]], report: DeliveryReport) -> None:
        if not group:
            return
        result = self._send_with_retries(group, report)
        settled = self._settle_named(group, result, report)
        rest = [env for i, env in enumerate(group) if i not in settled]
        if result.kind is ResultKind.OK:
            received = result.received if result.received is not None else len(rest)
            if received == len(rest):
                report.acknowledged += received
                outcome = (EventOutcome(DELIVERED, RECEIPT_REASON, result.receipt)
                           if result.receipt else EventOutcome(DELIVERED))
                for env in rest:
                    report.outcomes[env["event_id"]] = outcome
            else:
                # G6: never claim delivery the platform did not acknowledge.
                detail = f"platform acknowledged {received} of {len(rest)} events"
                for env in rest:
                    report.outcomes[env["event_id"]] = EventOutcome(FAILED, ACK_MISMATCH,
                                                                     detail)
            return
        # PERMANENT: isolate the bad events, then deliver the rest once.
        if settled:
            self._send_group(rest, report)
            return
        if len(group) == 1:
            report.outcomes[group[0]["event_id"]] = EventOutcome(
                FAILED, REJECTED, _clip(result.message))
            return
        mid = len(group) // 2
        self._send_group(group[:mid], report)
        self._send_group(group[mid:], report)

    def _settle_named(self, group: list[dict[str, Any]], result: SendResult,
                      report: DeliveryReport) -> set[int]:
        """Records the events the platform named; returns their indices in ``group``."""
        n = len(group)
        settled: set[int] = set()
        for i, message in result.event_errors.items():
            if 0 <= i < n:
                report.outcomes[group[i]["event_id"]] = EventOutcome(FAILED, REJECTED,
                                                                     _clip(message))
                settled.add(i)
        for i in result.event_duplicates:
            if 0 <= i < n and i not in settled:
                report.outcomes[group[i]["event_id"]] = EventOutcome(DELIVERED,
                                                                     DUPLICATE_REASON)
                report.duplicates += 1
                settled.add(i)
        for i, message in result.event_deferred.items():
            if 0 <= i < n and i not in settled:
                # Pending: the batch keeps the event and a later run sends it again.
                report.outcomes[group[i]["event_id"]] = EventOutcome(PENDING, DEFERRED_REASON,
                                                                     _clip(message))
                report.deferred += 1
                settled.add(i)
        return settled

    def _send_with_retries(self, group: list[dict[str, Any]],
                           report: DeliveryReport) -> SendResult:
        request = self.module.build_request([env["body"] for env in group], self.creds,
                                            self.dest)
        attempts = self.dest.retry.attempts
        last = ""
        for attempt in range(attempts):
            report.requests += 1
            hint: float | None = None
            try:
                resp = self.client.send(request)
            except TransportError as exc:
                result = SendResult(ResultKind.TRANSIENT, clean_message(str(exc)),
                                    code="transport")
            else:
                result = self.module.parse_response(resp.status, resp.body, resp.headers,
                                                    len(group))
            if result.kind is ResultKind.FATAL:
                raise FatalDestinationError(_clip(result.message))
            if result.kind is not ResultKind.TRANSIENT:
                return result
            last = _clip(result.message)
            hint = result.retry_after
            if attempt + 1 < attempts:
                delay = backoff_delay(attempt, self.dest.retry, hint, self.rng)
                log.warning("transient error from %s (%s); retry %d/%d in %.1fs",
                            self.dest.name, last, attempt + 1, attempts - 1, delay)
                report.retries += 1
                self.sleep(delay)
        raise TransientExhaustedError(
            f"{self.dest.name}: still failing after {attempts} attempts ({last}); the batch "
            "stays pending and is retried by the next run"
        )


def _clip(message: str, limit: int = 500) -> str:
    # Platform messages can quote the value they refused: only the cleaned text is kept.
    return clean_message(message, limit)


def summarize(report: DeliveryReport) -> Mapping[str, int]:
    """Run counters from a delivery report."""
    return {
        "sent": report.count(DELIVERED) + report.count(FAILED),
        "acknowledged": report.acknowledged,
        "delivered": report.count(DELIVERED),
        "failed": report.count(FAILED),
        "expired": report.count(EXPIRED),
        "duplicates": report.duplicates,
        "deferred": report.deferred,
        "requests": report.requests,
        "retries": report.retries,
    }


"""Later-run checks of requests a platform processes asynchronously (Data Manager).

An accepted ``events:ingest`` request only means "accepted for processing"; Google reports
how its records fared through ``requestStatus:retrieve`` minutes later. The sender keeps the
request id with each delivered event (ledger reason ``receipt``); on each later run this module
registers those requests in ``ls_requests``, asks the platform about the ones not final yet
(oldest first, backing off while they are still processing), records per-destination record
counts, and turns the events of a destination whose records all failed into dead letters.

Platform-agnostic: the destination module provides ``build_status_request`` and
``parse_status_response`` (:class:`leadsync.destinations.base.RequestStatusChecker`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from leadsync.delivery import RECEIPT_REASON
from leadsync.destinations import get_destination
from leadsync.destinations.base import (
    FatalDestinationError,
    RequestStatus,
    ResultKind,
    checks_request_status,
)
from leadsync.destinations.http import HttpClient, TransportError
from leadsync.redact import clean_message
from leadsync.state import StateStore, utcnow

log = logging.getLogger(__name__)

#: First look-up delay after a PROCESSING answer, doubled each time up to MAX_BACKOFF.
FIRST_BACKOFF = timedelta(minutes=15)
MAX_BACKOFF = timedelta(hours=6)
#: A request still not final this long after it was sent is given up on (status UNRESOLVED).
GIVE_UP_AFTER = timedelta(days=7)
#: Status look-ups per run at most (Data Manager: 300 requests/min per project for reads).
MAX_CHECKS_PER_RUN = 200


def _backoff(checks: int) -> timedelta:
    return min(MAX_BACKOFF, FIRST_BACKOFF * (2 ** min(checks, 10)))


def check_requests(
    state: StateStore,
    destination: str,
    destination_type: str,
    credentials: Callable[[], Any],
    client: HttpClient,
    *,
    now: datetime | None = None,
    exclude_run_id: str | None = None,
    limit: int = MAX_CHECKS_PER_RUN,
) -> dict[str, int]:
    """Registers new receipts and looks up the requests that are due.

    Args:
        state: The state store.
        destination: The destination's name.
        destination_type: Its type (the module must check request status).
        credentials: Returns the destination's credentials (called only if a look-up is due).
        client: The HTTP client.
        now: The current time (tests).
        exclude_run_id: A run whose own requests are not looked at yet (the current one).
        limit: Look-ups at most.

    Returns:
        Counters for the run: ``requests_registered``, ``requests_checked``,
        ``request_status.<STATE>``, ``request_records.<outcome>``, ``dead_lettered``.

    Raises:
        FatalDestinationError: The platform refused the credentials.
    """
    module = get_destination(destination_type)
    if not checks_request_status(module):
        return {}
    state.migrate()
    counts: Counter[str] = Counter()
    counts["requests_registered"] = state.collect_receipts(destination, RECEIPT_REASON)
    now = now or utcnow()
    due = state.due_requests(destination, now, exclude_run_id, limit)
    if not due:
        return dict(counts)
    creds = credentials()
    build = module.build_status_request  # type: ignore[attr-defined]
    parse = module.parse_status_response  # type: ignore[attr-defined]
    for request in due:
        request_id = request["request_id"]
        try:
            resp = client.send(build(request_id, creds))
        except TransportError as exc:
            log.warning("status of %s request %s: %s; next run retries", destination,
                        request_id, clean_message(str(exc)))
            counts["requests_unreachable"] += 1
            break
        result = parse(resp.status, resp.body, resp.headers)
        if not isinstance(result, RequestStatus):
            if result.kind is ResultKind.FATAL:
                raise FatalDestinationError(clean_message(result.message))
            log.warning("status of %s request %s: %s; next run retries", destination,
                        request_id, clean_message(result.message))
            counts["requests_unreachable"] += 1
            break  # throttled or down: stop asking for now
        status = result
        if not status.done and now - request["sent_at"] > GIVE_UP_AFTER:
            status = RequestStatus("UNRESOLVED", done=True, counts=status.counts,
                                   message=f"still {status.state} after {GIVE_UP_AFTER.days} "
                                           "days; no longer checked")
        failed = state.record_request_status(
            destination,
            request_id,
            status=status.state,
            done=status.done,
            next_check_at=now + _backoff(int(request["checks"])),
            counts={k: dict(v) for k, v in status.counts.items()},
            message=clean_message(status.message) if status.message else None,
            failed_event_names=list(status.failed_destinations),
            receipt_reason=RECEIPT_REASON,
        )
        counts["requests_checked"] += 1
        counts[f"request_status.{status.state}"] += 1
        if failed:
            counts["dead_lettered"] += failed
        for tally in status.counts.values():
            for key, value in tally.items():
                counts[f"request_records.{key}"] += int(value)
        log.info("%s request %s (%d events, batch %s): %s %s", destination, request_id,
                 request["n_events"], request["batch_id"], status.state,
                 {k: dict(v) for k, v in status.counts.items()})
    return dict(counts)


def check_requests_for(destination: str, run_id: str | None = None) -> dict[str, int]:
    """The DAG task's entry point: wiring from Airflow connections, counts added to the run."""
    from leadsync.config import get_config
    from leadsync.hooks import LeadsyncDatabaseHook, LeadsyncDestinationHook

    config = get_config()
    dest = config.destination(destination)
    state = StateStore(LeadsyncDatabaseHook(config.state.connection_id, "state").get_engine())
    hook = LeadsyncDestinationHook(dest.conn_id, dest.type)
    client = HttpClient(timeout=dest.retry.timeout.total_seconds())
    try:
        counts = check_requests(state, dest.name, dest.type, lambda: hook.credentials, client,
                                exclude_run_id=run_id)
    finally:
        client.close()
    if run_id and counts:
        state.update_run(run_id, dest.name, counts=counts)
    log.info("request status of %s: %s", dest.name, counts)
    return counts

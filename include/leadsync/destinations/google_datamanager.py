"""Google Ads conversions through the Data Manager API (``POST /v1/events:ingest``).

The default path to Google Ads: since 2026-06-15 Google takes new adopters of offline
conversion import only through Data Manager (``docs/platforms.md`` §4). OAuth scope
``datamanager``, no developer token, the manager account in the body (``loginAccount``).

One request carries the events of several stages: each mapped stage is a conversion action
(a *destination* of the request, at most 10), and each event names its action through
``destinationReferences``. The event's ``transactionId`` is leadsync's deterministic event id,
so a resend is an adjustment of the same conversion, never a second one.

Fast-fail: one invalid event rejects the whole request (HTTP 400 ``INVALID_ARGUMENT`` with
``google.rpc.BadRequest`` field violations such as ``events.events[3].user_data...``). The
events the violations name are recorded as failed and the rest is sent again. Processing is
asynchronous: an accepted request only has a ``requestId``, which is kept with each event and
looked up on a later run with ``requestStatus:retrieve`` (:mod:`leadsync.request_status`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from leadsync.destinations.base import (
    HttpRequest,
    Limits,
    RequestStatus,
    ResultKind,
    SendResult,
    Skip,
)
from leadsync.destinations.common import (
    currency_code,
    is_false,
    is_true,
    load_json,
    money,
    raw_text,
    retry_after,
    snippet,
)
from leadsync.destinations.google_common import (
    DATAMANAGER_SCOPE,
    FATAL_STATUSES,
    TRANSIENT_STATUSES,
    GoogleCredentials,
    RpcError,
    parse_google_connection,
    rpc_error,
)
from leadsync.identity import GOOGLE_RULES, hash_identifiers

if TYPE_CHECKING:
    from leadsync.config import DestinationConfig

TYPE = "google_datamanager"
DEFAULT_BASE_URL = "https://datamanager.googleapis.com"
INGEST_PATH = "/v1/events:ingest"
STATUS_PATH = "/v1/requestStatus:retrieve"
# 2,000 events per request (the proto and the limits page; a 10,000 figure elsewhere is a
# CONFLICT, docs/platforms.md §4). The age window is UNVERIFIED for Data Manager; 90 days is
# the longest Google Ads click-through window, beyond which no conversion can be attributed.
# A resent transactionId adjusts the same conversion, with no documented expiry.
LIMITS = Limits(max_batch_events=2000, max_event_age=timedelta(days=90), dedup_window=None)

# What the data contract judges for this platform: the identifier rules of the events it builds
# (an unusable value is dropped and counted, the row sent on its other keys) and the match keys,
# as groups of source columns; a group counts when each of its columns holds a usable value
# (IP and user agent only match together). A row with no group left is quarantined.
IDENTIFIER_RULES = GOOGLE_RULES
MATCH_KEY_GROUPS: tuple[tuple[str, ...], ...] = (
    ("email",), ("phone",), ("gclid",), ("gbraid",), ("wbraid",))
MAX_DESTINATIONS = 10
EVENT_SOURCES = frozenset({"WEB", "APP", "IN_STORE", "PHONE", "MESSAGE", "OTHER"})
DEFAULT_EVENT_SOURCE = "OTHER"  # a CRM stage change; Google gives no guidance (UNVERIFIED)

_CLICK_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{10,512}$")
_USER_KEYS = (("hashed_email", "emailAddress"), ("hashed_phone_number", "phoneNumber"))
# "events.events[3].user_data.user_identifiers[0]" (Google's documented example) or
# "events[3]...".
_EVENT_FIELD_RE = re.compile(r"(?:^|\.)events\[(\d+)\]")


def parse_credentials(
    host: str | None, password: str | None, extra: Mapping[str, Any]
) -> GoogleCredentials:
    """Validates a ``leadsync_google`` connection (see :mod:`google_common`)."""
    return parse_google_connection(host, password, extra, default_base_url=DEFAULT_BASE_URL,
                                   scope=DATAMANAGER_SCOPE)


def check_row(row: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """Rows Google must not receive: opted out, or ad_user_data consent refused."""
    if is_true(row.get("opted_out")):
        return Skip("opted_out")
    if is_false(row.get("ad_user_data")):
        return Skip("consent_denied")
    return None


def rfc3339(moment: datetime) -> str:
    """``2026-09-01T14:03:00Z`` (UTC, seconds)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def click_id(row: Mapping[str, Any]) -> tuple[str, str] | None:
    """The row's Google click id as (field, value): gclid, else gbraid, else wbraid.

    Only one is sent: the Google Ads API refuses gbraid with wbraid, and a gclid is the most
    precise of the three.
    """
    for column in ("gclid", "gbraid", "wbraid"):
        value = raw_text(row, column)
        if value and _CLICK_ID_RE.match(value):
            return column, value
    return None


def consent_status(value: Any, granted: str, denied: str) -> str | None:
    """The platform's consent word for a warehouse boolean (None when unknown)."""
    if is_true(value):
        return granted
    if is_false(value):
        return denied
    return None


def build_event(
    row: Mapping[str, Any],
    dest: DestinationConfig,
    event_name: str,
    event_id: str,
    event_time: datetime,
) -> dict[str, Any]:
    """One ``events[]`` entry; ``event_name`` is the stage's conversion action id."""
    event: dict[str, Any] = {
        "destinationReferences": [event_name],
        "transactionId": event_id,
        "eventTimestamp": rfc3339(event_time),
        "eventSource": dest.event_source or DEFAULT_EVENT_SOURCE,
    }
    ad: dict[str, Any] = {}
    click = click_id(row)
    if click:
        ad[click[0]] = click[1]
    device: dict[str, str] = {}
    agent = raw_text(row, "user_agent")
    if agent:
        device["userAgent"] = agent
    ip = raw_text(row, "client_ip")
    if ip:
        try:
            device["ipAddress"] = str(ipaddress.ip_address(ip))
        except ValueError:
            pass
    if device:
        ad["landingPageDeviceInfo"] = device
    if ad:
        event["adIdentifiers"] = ad
    hashed = hash_identifiers(row, GOOGLE_RULES)
    identifiers = [{field: hashed[key]} for key, field in _USER_KEYS if key in hashed]
    if identifiers:
        event["userData"] = {"userIdentifiers": identifiers}
    value = money(row.get("value"))
    currency = currency_code(row)
    if value is not None and currency:
        event["conversionValue"] = value
        event["currency"] = currency
    consent: dict[str, str] = {}
    for column, key in (("ad_user_data", "adUserData"),
                        ("ad_personalization", "adPersonalization")):
        word = consent_status(row.get(column), "CONSENT_GRANTED", "CONSENT_DENIED")
        if word:
            consent[key] = word
    if consent:
        event["consent"] = consent
    return event


def check_event(event: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """An event with neither a click id nor a hashed identifier (NO_IDENTIFIERS_PROVIDED)."""
    ad = event.get("adIdentifiers", {})
    if "userData" in event or any(k in ad for k in ("gclid", "gbraid", "wbraid")):
        return None
    return Skip("no_match_keys")


def _account(account_id: str) -> dict[str, str]:
    return {"accountType": "GOOGLE_ADS", "accountId": account_id}


def _headers(creds: GoogleCredentials) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if creds.quota_project:
        headers["x-goog-user-project"] = creds.quota_project
    return headers


def build_request(
    events: list[dict[str, Any]], creds: GoogleCredentials, dest: DestinationConfig
) -> HttpRequest:
    """One ``events:ingest`` request: a destination per conversion action in the batch."""
    if not dest.customer_id:
        raise ValueError(f"destination {dest.name!r}: customer_id is not set")
    references = list(dict.fromkeys(ref for e in events for ref in e["destinationReferences"]))
    destinations = []
    for reference in references:
        destination: dict[str, Any] = {"operatingAccount": _account(dest.customer_id)}
        if dest.login_customer_id:
            destination["loginAccount"] = _account(dest.login_customer_id)
        destination["productDestinationId"] = reference
        destination["reference"] = reference
        destinations.append(destination)
    body: dict[str, Any] = {"destinations": destinations, "encoding": "HEX",
                            "events": list(events)}
    if creds.validate_only:
        body["validateOnly"] = True
    return HttpRequest(method="POST", url=f"{creds.base_url}{INGEST_PATH}", body=body,
                       headers=_headers(creds), auth=creds.auth)


def _violations(error: RpcError) -> list[dict[str, Any]]:
    found = []
    for bad in error.details_of("google.rpc.BadRequest"):
        for violation in bad.get("fieldViolations") or []:
            if isinstance(violation, dict):
                found.append(violation)
    return found


def _classify_error(status: int, body: str, headers: Mapping[str, str],
                    n_sent: int) -> SendResult:
    data = load_json(body)
    error = rpc_error(data, status)
    if error is None:
        text = f"HTTP {status}: {snippet(body)}"
        if status >= 500 or status == 429:
            return SendResult(ResultKind.TRANSIENT, text, retry_after=retry_after(headers),
                              code=f"http_{status}")
        if status in (401, 403, 404):
            return SendResult(ResultKind.FATAL, f"{text}: check the leadsync_google "
                              "connection's host and credentials", code=f"http_{status}")
        return SendResult(ResultKind.PERMANENT, text, code=f"http_{status}")
    reasons = error.reasons()
    code = error.status or f"http_{status}"
    text = f"{code}: {error.message}" + (f" ({', '.join(reasons)})" if reasons else "")
    if status == 429 or status >= 500 or error.status in TRANSIENT_STATUSES:
        return SendResult(ResultKind.TRANSIENT, text,
                          retry_after=error.retry_delay() or retry_after(headers), code=code)
    if status in (401, 403) or error.status in FATAL_STATUSES:
        return SendResult(ResultKind.FATAL, f"Data Manager refused the credentials or account "
                          f"({text}). Check the leadsync_google connection (scope "
                          "datamanager) and that its user can access customer_id.", code=code)
    if status == 404:
        return SendResult(ResultKind.FATAL, f"{text}: check the connection's host", code=code)
    event_errors: dict[int, str] = {}
    elsewhere: list[str] = []
    for violation in _violations(error):
        field = str(violation.get("field") or "")
        detail = f"{field}: {violation.get('reason') or ''} {violation.get('description') or ''}"
        match = _EVENT_FIELD_RE.search(field)
        if match and int(match.group(1)) < n_sent:
            event_errors.setdefault(int(match.group(1)), detail.strip())
        else:
            elsewhere.append(detail.strip())
    if elsewhere and not event_errors:
        # The request itself (destinations, account, encoding) is wrong for every event.
        return SendResult(ResultKind.FATAL, f"Data Manager rejected the request ({text}: "
                          f"{'; '.join(elsewhere)}). Check customer_id, login_customer_id and "
                          "the conversion action ids in include/leadsync.yaml.", code=code)
    return SendResult(ResultKind.PERMANENT, text, code=code, event_errors=event_errors)


def parse_response(
    status: int, body: str, headers: Mapping[str, str], n_sent: int
) -> SendResult:
    """Accepted with a ``requestId`` (the receipt), or classified by ``google.rpc.Status``."""
    data = load_json(body)
    if 200 <= status < 300 and isinstance(data, dict) and "error" not in data:
        request_id = data.get("requestId")
        receipt = request_id if isinstance(request_id, str) and request_id else None
        warnings = data.get("fieldWarnings") or []
        note = f"; {len(warnings)} field warning(s)" if warnings else ""
        return SendResult(ResultKind.OK, f"accepted{note}", receipt=receipt)
    if 200 <= status < 300:
        return SendResult(ResultKind.TRANSIENT, f"HTTP {status} without an IngestEventsResponse: "
                          f"{snippet(body)}", code="bad_body")
    return _classify_error(status, body, headers, n_sent)


# -- asynchronous status (requestStatus:retrieve) ---------------------------------------------


def build_status_request(receipt: str, creds: GoogleCredentials) -> HttpRequest:
    """``GET /v1/requestStatus:retrieve?requestId=...``."""
    return HttpRequest(method="GET", url=f"{creds.base_url}{STATUS_PATH}", body=None,
                       params={"requestId": receipt}, headers=_headers(creds), auth=creds.auth)


def _count(value: Any) -> int:
    try:
        return int(value)  # int64 fields arrive as JSON strings
    except (TypeError, ValueError):
        return 0


def _strip(reason: Any, prefix: str) -> str:
    return str(reason or "UNSPECIFIED").removeprefix(prefix)


def parse_status_response(
    status: int, body: str, headers: Mapping[str, str]
) -> RequestStatus | SendResult:
    """The request's status per destination (conversion action), with record counts."""
    data = load_json(body)
    if not (200 <= status < 300 and isinstance(data, dict) and "error" not in data):
        error = rpc_error(data, status)
        if error is not None and "INVALID_REQUEST_ID" in error.reasons():
            # Validate-only requests and unknown ids have no status.
            return RequestStatus("INVALID_REQUEST_ID", done=True, message=error.message)
        result = _classify_error(status, body, headers, 0)
        if result.kind in (ResultKind.TRANSIENT, ResultKind.FATAL):
            return result
        return RequestStatus("LOOKUP_FAILED", done=True, message=result.message)
    per_destination = data.get("requestStatusPerDestination") or []
    counts: dict[str, dict[str, int]] = {}
    states: list[str] = []
    failed: list[str] = []
    for position, entry in enumerate(per_destination):
        if not isinstance(entry, dict):
            continue
        destination = entry.get("destination") or {}
        name = str(destination.get("productDestinationId") or destination.get("reference")
                   or position)
        state = str(entry.get("requestStatus") or "REQUEST_STATUS_UNKNOWN")
        states.append(state)
        if state == "FAILED":
            failed.append(name)
        tally: dict[str, int] = {}
        ingested = (entry.get("eventsIngestionStatus") or {}).get("recordCount")
        if ingested is not None:
            tally["ingested"] = _count(ingested)
        for item in (entry.get("errorInfo") or {}).get("errorCounts") or []:
            key = f"error.{_strip(item.get('reason'), 'PROCESSING_ERROR_REASON_')}"
            tally[key] = tally.get(key, 0) + _count(item.get("recordCount"))
        for item in (entry.get("warningInfo") or {}).get("warningCounts") or []:
            key = f"warning.{_strip(item.get('reason'), 'PROCESSING_WARNING_REASON_')}"
            tally[key] = tally.get(key, 0) + _count(item.get("recordCount"))
        counts[name] = tally
    if not states or any(s in ("PROCESSING", "REQUEST_STATUS_UNKNOWN") for s in states):
        return RequestStatus("PROCESSING", done=False, counts=counts)
    if all(s == "SUCCESS" for s in states):
        overall = "SUCCESS"
    elif all(s == "FAILED" for s in states):
        overall = "FAILED"
    else:
        overall = "PARTIAL_SUCCESS"
    return RequestStatus(overall, done=True, counts=counts, failed_destinations=tuple(failed))

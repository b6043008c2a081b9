"""Google Ads API click conversions (``POST /{version}/customers/{id}:uploadClickConversions``).

For accounts still allowlisted for offline conversion import through the Google Ads API
(new adopters must use :mod:`leadsync.destinations.google_datamanager`). Each stage maps to a
conversion action id of ``customer_id``; a conversion carries ``order_id`` = leadsync's
deterministic event id, ``conversion_date_time`` as ``yyyy-mm-dd hh:mm:ss+00:00``, the click
id when the lead has one, hashed email and phone as ``user_identifiers`` (enhanced conversions
for leads) and the row's consent. Facts: ``docs/platforms.md`` §3.

``partial_failure`` is always true (Google requires it): a 200 response may carry a
``partialFailureError`` whose errors name failed rows by ``location.fieldPathElements``
(``conversions``, index). Per row: ``ORDER_ID_ALREADY_IN_USE`` and
``CLICK_CONVERSION_ALREADY_EXISTS`` mean an earlier request delivered it (counted as
delivered); ``TOO_RECENT_EVENT`` / ``TOO_RECENT_CONVERSION_ACTION`` and internal errors are
deferred to a later run; anything else fails the row. Errors of the whole request (auth,
quota) come back as HTTP errors: quota errors are retried after ``retry_delay``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from leadsync.destinations.base import HttpRequest, Limits, ResultKind, SendResult, Skip
from leadsync.destinations.common import (
    currency_code,
    duration_seconds,
    load_json,
    money,
    retry_after,
    snippet,
)
from leadsync.destinations.google_common import (
    ADWORDS_SCOPE,
    GoogleCredentials,
    parse_google_connection,
    rpc_error,
)
from leadsync.destinations.google_datamanager import check_row, click_id, consent_status
from leadsync.identity import GOOGLE_RULES, hash_identifiers

if TYPE_CHECKING:
    from leadsync.config import DestinationConfig

TYPE = "google_ads"
DEFAULT_BASE_URL = "https://googleads.googleapis.com"
DEFAULT_API_VERSION = "v26"  # the latest version google-ads-python 34 knows (v23-v26)
# 2,000 conversions per request (TOO_MANY_CONVERSIONS_IN_REQUEST above). The age limit is the
# conversion action's click-through window (EXPIRED_EVENT), at most 90 days (UNVERIFIED).
# order_id is unique per conversion action with no documented expiry (ORDER_ID_ALREADY_IN_USE).
LIMITS = Limits(max_batch_events=2000, max_event_age=timedelta(days=90), dedup_window=None)

# What the data contract judges for this platform: the identifier rules of the events it builds
# (an unusable value is dropped and counted, the row sent on its other keys) and the match keys,
# as groups of source columns; a group counts when each of its columns holds a usable value
# (IP and user agent only match together). A row with no group left is quarantined.
IDENTIFIER_RULES = GOOGLE_RULES
MATCH_KEY_GROUPS: tuple[tuple[str, ...], ...] = (
    ("email",), ("phone",), ("gclid",), ("gbraid",), ("wbraid",))

DUPLICATE_CODES = frozenset({"ORDER_ID_ALREADY_IN_USE", "CLICK_CONVERSION_ALREADY_EXISTS"})
DEFERRED_CODES = frozenset({"TOO_RECENT_EVENT", "TOO_RECENT_CONVERSION_ACTION"})
QUOTA_CODES = frozenset({"RESOURCE_EXHAUSTED", "RESOURCE_TEMPORARILY_EXHAUSTED"})
FATAL_ERROR_TYPES = frozenset({"authenticationError", "authorizationError",
                               "notAllowlistedError", "headerError"})
_VERSION_RE = re.compile(r"^v\d{2,3}$")
_USER_KEYS = (("hashed_email", "hashedEmail"), ("hashed_phone_number", "hashedPhoneNumber"))

__all__ = ["LIMITS", "TYPE", "build_event", "build_request", "check_event", "check_row",
           "parse_credentials", "parse_response"]


def parse_credentials(
    host: str | None, password: str | None, extra: Mapping[str, Any]
) -> GoogleCredentials:
    """Validates a ``leadsync_google`` connection (see :mod:`google_common`)."""
    from leadsync.destinations.base import CredentialsError

    creds = parse_google_connection(host, password, extra, default_base_url=DEFAULT_BASE_URL,
                                    scope=ADWORDS_SCOPE)
    version = creds.api_version or DEFAULT_API_VERSION
    if not _VERSION_RE.match(version):
        raise CredentialsError(f"connection extra 'api_version' must look like 'v26', "
                               f"got {version!r}")
    return GoogleCredentials(creds.base_url, creds.auth, creds.quota_project,
                             creds.validate_only, creds.developer_token, version)


def conversion_date_time(moment: datetime) -> str:
    """``yyyy-mm-dd hh:mm:ss+00:00`` (the offset is required; UTC is always given)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")


def build_event(
    row: Mapping[str, Any],
    dest: DestinationConfig,
    event_name: str,
    event_id: str,
    event_time: datetime,
) -> dict[str, Any]:
    """One ``ClickConversion`` (REST JSON); ``event_name`` is the conversion action id."""
    conversion: dict[str, Any] = {
        "conversionAction": f"customers/{dest.customer_id}/conversionActions/{event_name}",
        "conversionDateTime": conversion_date_time(event_time),
        "orderId": event_id,
    }
    click = click_id(row)
    if click:
        conversion[click[0]] = click[1]
    value = money(row.get("value"))
    currency = currency_code(row)
    if value is not None and currency:
        conversion["conversionValue"] = value
        conversion["currencyCode"] = currency
    hashed = hash_identifiers(row, GOOGLE_RULES)
    identifiers = [{"userIdentifierSource": "FIRST_PARTY", field: hashed[key]}
                   for key, field in _USER_KEYS if key in hashed]
    if identifiers:
        conversion["userIdentifiers"] = identifiers
    consent: dict[str, str] = {}
    for column, key in (("ad_user_data", "adUserData"),
                        ("ad_personalization", "adPersonalization")):
        word = consent_status(row.get(column), "GRANTED", "DENIED")
        if word:
            consent[key] = word
    if consent:
        conversion["consent"] = consent
    return conversion


def check_event(event: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """A conversion with neither a click id nor a hashed email/phone cannot be matched."""
    if "userIdentifiers" in event or any(k in event for k in ("gclid", "gbraid", "wbraid")):
        return None
    return Skip("no_match_keys")


def build_request(
    events: list[dict[str, Any]], creds: GoogleCredentials, dest: DestinationConfig
) -> HttpRequest:
    """One ``uploadClickConversions`` request (``partialFailure`` always true)."""
    if not dest.customer_id:
        raise ValueError(f"destination {dest.name!r}: customer_id is not set")
    body: dict[str, Any] = {"conversions": list(events), "partialFailure": True}
    if creds.validate_only:
        body["validateOnly"] = True
    headers = {"Content-Type": "application/json"}
    secret: tuple[str, ...] = ()
    if creds.developer_token:
        headers["developer-token"] = creds.developer_token
        secret = ("developer-token",)
    if dest.login_customer_id:
        headers["login-customer-id"] = dest.login_customer_id
    version = creds.api_version or DEFAULT_API_VERSION
    return HttpRequest(
        method="POST",
        url=f"{creds.base_url}/{version}/customers/{dest.customer_id}:uploadClickConversions",
        body=body,
        headers=headers,
        secret_headers=secret,
        auth=creds.auth,
    )


def _error_code(error: Mapping[str, Any]) -> tuple[str, str]:
    """(error type, code) of a GoogleAdsError, e.g. ("conversionUploadError", "...")."""
    code = error.get("errorCode")
    if isinstance(code, Mapping) and code:
        kind, value = next(iter(code.items()))
        return str(kind), str(value)
    return "", ""


def _row_index(error: Mapping[str, Any]) -> int | None:
    elements = (error.get("location") or {}).get("fieldPathElements") or []
    for element in elements:
        if isinstance(element, Mapping) and element.get("fieldName") == "conversions":
            index = element.get("index")
            if isinstance(index, int) and not isinstance(index, bool):
                return index
    return None


def _ads_errors(details: Any) -> list[Mapping[str, Any]]:
    """The GoogleAdsError objects of a Status's ``details`` (GoogleAdsFailure entries)."""
    found: list[Mapping[str, Any]] = []
    for detail in details or []:
        if isinstance(detail, Mapping):
            found.extend(e for e in detail.get("errors") or [] if isinstance(e, Mapping))
    return found


def _partial_failure(data: Mapping[str, Any], failure: Mapping[str, Any],
                     n_sent: int) -> SendResult:
    results = data.get("results")
    succeeded: set[int] = set()
    if isinstance(results, list):
        succeeded = {i for i, r in enumerate(results[:n_sent]) if isinstance(r, Mapping) and r}
    errors: dict[int, str] = {}
    duplicates: set[int] = set()
    deferred: dict[int, str] = {}
    unplaced: list[str] = []
    for error in _ads_errors(failure.get("details")):
        kind, code = _error_code(error)
        text = f"{kind}.{code}: {error.get('message') or ''}".strip()
        index = _row_index(error)
        if index is None or not 0 <= index < n_sent:
            unplaced.append(text)
            continue
        succeeded.discard(index)
        if code in DUPLICATE_CODES:
            duplicates.add(index)
        elif code in DEFERRED_CODES or kind == "internalError":
            deferred.setdefault(index, text)
        else:
            errors.setdefault(index, text)
    named = set(errors) | duplicates | set(deferred)
    message = str(failure.get("message") or "partial failure")
    # G6: a row without a result and without a named error was not accepted either.
    for i in range(n_sent):
        if i not in succeeded and i not in named:
            errors[i] = "; ".join(unplaced) or f"no result for this conversion ({message})"
    return SendResult(ResultKind.OK, message, received=len(succeeded), event_errors=errors,
                      event_duplicates=frozenset(duplicates), event_deferred=deferred,
                      code="partial_failure")


def parse_response(
    status: int, body: str, headers: Mapping[str, str], n_sent: int
) -> SendResult:
    """Per-row outcomes from a 200; request-level errors by GoogleAdsFailure error codes."""
    data = load_json(body)
    if 200 <= status < 300 and isinstance(data, dict) and "error" not in data:
        failure = data.get("partialFailureError")
        if isinstance(failure, Mapping) and (failure.get("details") or failure.get("code")):
            return _partial_failure(data, failure, n_sent)
        results = data.get("results")
        if results is None:  # validate_only answers with no results
            return SendResult(ResultKind.OK, "accepted (no results: validate_only)")
        accepted = sum(1 for r in results if isinstance(r, Mapping) and r) if isinstance(
            results, list) else 0
        return SendResult(ResultKind.OK, "accepted", received=accepted)
    if 200 <= status < 300:
        return SendResult(ResultKind.TRANSIENT, f"HTTP {status} without an "
                          f"UploadClickConversionsResponse: {snippet(body)}", code="bad_body")
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
    ads_errors = _ads_errors(error.details)
    codes = [_error_code(e) for e in ads_errors]
    names = ", ".join(f"{k}.{c}" for k, c in codes if k) or error.status or f"HTTP {status}"
    text = f"{names}: {error.message}"
    if any(c in QUOTA_CODES for _, c in codes) or status == 429:
        delay = None
        for e in ads_errors:
            quota = (e.get("details") or {}).get("quotaErrorDetails") or {}
            delay = duration_seconds(quota.get("retryDelay")) if quota else None
            if delay is not None:
                break
        return SendResult(ResultKind.TRANSIENT, text,
                          retry_after=delay or error.retry_delay() or retry_after(headers),
                          code="quota")
    if any(k in FATAL_ERROR_TYPES for k, _ in codes) or status in (401, 403, 404):
        return SendResult(ResultKind.FATAL, f"Google Ads refused the request ({text}). Check "
                          "the leadsync_google connection, customer_id and login_customer_id "
                          "(and that the account is allowlisted for click conversion upload; "
                          "otherwise use type google_datamanager).", code=names)
    if status >= 500 or any(k == "internalError" for k, _ in codes):
        return SendResult(ResultKind.TRANSIENT, text, retry_after=retry_after(headers),
                          code=names)
    rows = {i: f"{k}.{c}: {e.get('message') or ''}" for e, (k, c) in zip(ads_errors, codes,
                                                                        strict=True)
            if (i := _row_index(e)) is not None and 0 <= i < n_sent}
    return SendResult(ResultKind.PERMANENT, text, code=names, event_errors=rows)

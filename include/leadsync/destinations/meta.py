"""Meta Conversions API (``POST /{version}/{pixel_id}/events``).

Two shapes, chosen per destination: ``crm`` (Conversion Leads: ``action_source``
``system_generated``, ``custom_data.event_source`` ``crm``, ``lead_event_source`` = the CRM's
name, ``user_data.lead_id`` raw) and ``website`` (needs the browser's user agent and page URL).
Facts: ``docs/platforms.md`` §1.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from leadsync.destinations.base import (
    CredentialsError,
    HttpRequest,
    Limits,
    ResultKind,
    SendResult,
    Skip,
)
from leadsync.destinations.common import base_url
from leadsync.identity import META_RULES

if TYPE_CHECKING:
    from leadsync.config import DestinationConfig

TYPE = "meta"
DEFAULT_BASE_URL = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v25.0"
# 1,000 events per request; one event older than 7 days fails the whole request.
LIMITS = Limits(max_batch_events=1000, max_event_age=timedelta(days=7),
                dedup_window=timedelta(hours=48))

# What the data contract judges for this platform: the identifier rules of the events it builds
# (an unusable value is dropped and counted, the row sent on its other keys) and the match keys,
# as groups of source columns; a group counts when each of its columns holds a usable value
# (IP and user agent only match together). A row with no group left is quarantined.
IDENTIFIER_RULES = META_RULES
MATCH_KEY_GROUPS: tuple[tuple[str, ...], ...] = (
    ("email",), ("phone",), ("external_id",), ("meta_lead_id",), ("fbc",), ("fbp",),
    ("first_name",), ("last_name",), ("client_ip", "user_agent"))

# build_request puts the events in the body as they are: push hands it the events' stored
# JSON (msgspec.Raw) instead of decoding the outbox and encoding it again.
RAW_EVENT_BODIES = True

_VERSION_RE = re.compile(r"^v\d+\.\d+$")
_PIXEL_RE = re.compile(r"^\d{5,20}$")
_LEAD_ID_RE = re.compile(r"^\d{15,17}$")
_FBC_RE = re.compile(r"^fb\.\d+\.\d+\..+$")
_CURRENCY_RE = re.compile(r"^[A-Za-z]{3}$")
_fbc_match = _FBC_RE.match
_lead_id_match = _LEAD_ID_RE.match
# hash_identifiers(row, META_RULES) without the wrapper's call (build_event runs per row).
_user_data = META_RULES._apply

# Graph error codes (docs/platforms.md §1).
_TRANSIENT_CODES = frozenset({1, 2, 4, 17, 32, 341, 368, 613, 5000, 21009, 80003})
_THROTTLE_CODES = frozenset({4, 17, 32, 613, 80003})
_FATAL_CODES = frozenset({10, 102, 190, 200, 294})
_MATCH_KEYS = ("em", "ph", "external_id", "lead_id", "fbc", "fbp", "fn", "ln")
_MATCH_KEY_SET = frozenset(_MATCH_KEYS)


@dataclass(frozen=True)
class MetaCredentials:
    """From connection ``leadsync_meta``: host, password = token, extra = pixel and options."""

    base_url: str
    access_token: str
    pixel_id: str
    api_version: str = DEFAULT_API_VERSION
    test_event_code: str | None = None

    def __repr__(self) -> str:  # never print the token
        return (
            f"MetaCredentials(base_url={self.base_url!r}, pixel_id={self.pixel_id!r}, "
            f"api_version={self.api_version!r}, access_token='***')"
        )


def parse_credentials(
    host: str | None, password: str | None, extra: Mapping[str, Any]
) -> MetaCredentials:
    """Validates the connection's fields; the error names the field to fix."""
    if not password:
        raise CredentialsError("connection field 'password' (the Meta access token) is empty")
    pixel = str(extra.get("pixel_id") or "").strip()
    if not pixel:
        raise CredentialsError("connection extra 'pixel_id' (the Meta dataset/pixel id) is missing")
    if not _PIXEL_RE.match(pixel):
        raise CredentialsError(f"connection extra 'pixel_id' must be numeric, got {pixel!r}")
    version = str(extra.get("api_version") or DEFAULT_API_VERSION).strip()
    if not _VERSION_RE.match(version):
        raise CredentialsError(
            f"connection extra 'api_version' must look like 'v25.0', got {version!r}"
        )
    base = base_url(host, DEFAULT_BASE_URL)
    test_code = extra.get("test_event_code")
    if test_code is not None and not isinstance(test_code, str):
        raise CredentialsError("connection extra 'test_event_code' must be a string")
    return MetaCredentials(base, password, pixel, version, test_code or None)


def _raw(row: Mapping[str, Any], column: str) -> str | None:
    value = row.get(column)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def check_row(row: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """Rows Meta must not receive: opted out."""
    if row.get("opted_out") in (True, 1, "true", "t", "1"):
        return Skip("opted_out")
    return None


def _money(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    if not number.is_finite() or number < 0:
        return None
    result = float(number)
    return result if math.isfinite(result) else None


def build_event(
    row: Mapping[str, Any],
    dest: DestinationConfig,
    event_name: str,
    event_id: str,
    event_time: datetime,
) -> dict[str, Any]:
    """One ``data[]`` event.

    Hashed ``user_data`` fields are single hex strings: Meta takes a string or a list of
    strings for each (docs/platforms.md §1), leadsync has one value per field, and the SDK's
    one-element lists cost an object per field per event and 4 bytes on the wire.

    Runs for every row: the raw fields are read inline (same rules as :func:`_raw`: text,
    trimmed, empty means absent) rather than through a call per column.
    """
    user: dict[str, Any] = _user_data(row)
    get = row.get
    value: Any = get("client_ip")
    if value is not None and (text := (value if value.__class__ is str else str(value)).strip()):
        user["client_ip_address"] = text
    value = get("user_agent")
    if value is not None and (text := (value if value.__class__ is str else str(value)).strip()):
        user["client_user_agent"] = text
    value = get("fbc")
    if value is not None and (text := (value if value.__class__ is str else str(value)).strip()) \
            and _fbc_match(text):
        user["fbc"] = text
    value = get("fbp")
    if value is not None and (text := (value if value.__class__ is str else str(value)).strip()) \
            and _fbc_match(text):
        user["fbp"] = text
    value = get("meta_lead_id")
    if value is not None and (text := (value if value.__class__ is str else str(value)).strip()) \
            and _lead_id_match(text):
        user["lead_id"] = text  # raw: Meta matches its own lead id as is

    shape = dest.shape
    website = shape == "website"
    custom: dict[str, Any]
    if shape == "crm":
        action_source = "system_generated"
        custom = {"event_source": "crm", "lead_event_source": dest.crm_name}
    else:
        action_source = dest.action_source or "website"
        custom = {}
    value = get("value")
    if value is not None:
        money = _money(value)
        currency = _raw(row, "currency")
        if money is not None and currency and _CURRENCY_RE.match(currency):
            custom["value"] = money
            custom["currency"] = currency.lower()

    event: dict[str, Any] = {
        "event_name": event_name,
        "event_time": int(event_time.timestamp()),
        "event_id": event_id,
        "action_source": action_source,
        "user_data": user,
    }
    if website:
        url = _raw(row, "event_source_url")
        if url:
            event["event_source_url"] = url
    if custom:
        event["custom_data"] = custom
    value = get("limited_data_use")
    if value is not None and value in (True, 1, "true", "t", "1"):
        # Limited Data Use with geolocation done by Meta (country 0, state 0).
        event["data_processing_options"] = ["LDU"]
        event["data_processing_options_country"] = 0
        event["data_processing_options_state"] = 0
    return event


def check_event(event: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """Match keys and shape requirements that only the built event can tell."""
    user = event["user_data"]
    if user.keys().isdisjoint(_MATCH_KEY_SET) and not (
        "client_ip_address" in user and "client_user_agent" in user
    ):
        return Skip("no_match_keys")
    if event["action_source"] == "website" and (
        "client_user_agent" not in user or "event_source_url" not in event
    ):
        return Skip("website_event_needs_user_agent_and_url")
    return None


def build_request(
    events: list[dict[str, Any]], creds: MetaCredentials, dest: DestinationConfig
) -> HttpRequest:
    """JSON body with ``data`` and the token (Graph accepts parameters in a JSON body)."""
    body: dict[str, Any] = {"data": events}
    if creds.test_event_code:
        body["test_event_code"] = creds.test_event_code
    body["access_token"] = creds.access_token
    return HttpRequest(
        method="POST",
        url=f"{creds.base_url}/{creds.api_version}/{creds.pixel_id}/events",
        body=body,
        headers={"Content-Type": "application/json"},
        secret_body_keys=("access_token",),
    )


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for key, value in headers.items():
        if key.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


def parse_response(
    status: int, body: str, headers: Mapping[str, str], n_sent: int
) -> SendResult:
    """Classifies a Graph API response by HTTP status, error code/subcode and is_transient."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        snippet = " ".join(body.split())[:120]
        if status >= 500 or status == 429:
            return SendResult(ResultKind.TRANSIENT, f"HTTP {status}: {snippet}",
                              retry_after=_retry_after(headers), code=f"http_{status}")
        if status in (401, 403, 404):
            return SendResult(ResultKind.FATAL, f"HTTP {status} from the Graph API: check the "
                              "connection's host, api_version and pixel_id", code=f"http_{status}")
        return SendResult(ResultKind.PERMANENT, f"HTTP {status}: {snippet}", code=f"http_{status}")

    if 200 <= status < 300 and "error" not in data:
        received = data.get("events_received")
        if not isinstance(received, int):
            return SendResult(ResultKind.TRANSIENT, "success without events_received",
                              code="no_events_received")
        return SendResult(ResultKind.OK, "ok", received=received)

    raw_error = data.get("error")
    error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    code = error.get("code")
    subcode = error.get("error_subcode")
    title = error.get("error_user_title") or ""
    message = error.get("error_user_msg") or error.get("message") or f"HTTP {status}"
    text = f"{title}: {message}" if title else str(message)
    code_str = f"{code}/{subcode}" if subcode else str(code)
    if code in _FATAL_CODES or (code == 100 and subcode == 33):
        return SendResult(
            ResultKind.FATAL,
            f"Meta rejected the credentials or dataset (code {code_str}): {text}. "
            "Check the leadsync_meta connection's token and pixel_id.",
            code=code_str,
        )
    if error.get("is_transient") is True or code in _TRANSIENT_CODES or status >= 500:
        retry = _retry_after(headers)
        if retry is None and code in _THROTTLE_CODES:
            retry = 60.0  # Graph throttling gives no hint; back off a minute
        return SendResult(ResultKind.TRANSIENT, f"code {code_str}: {text}",
                          retry_after=retry, code=code_str)
    return SendResult(ResultKind.PERMANENT, f"code {code_str}: {text}", code=code_str)

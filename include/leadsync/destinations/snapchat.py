"""Snapchat Conversions API v3 (``POST https://tr.snapchat.com/v3/{pixel_id}/events``).

Two shapes, chosen per destination like Meta's: ``crm`` (``action_source`` ``OFFLINE``: Snap's
offline events, for conversions that happen off the web such as a CRM stage change) and
``website`` (``WEB``, with the page URL and the browser's user agent). The stage map's values
must be Snap's standard event names (``SIGN_UP``, ``PURCHASE``, ``CUSTOM_EVENT_1`` ...): Snap
accepts no free-form names. ``event_time`` is Unix **seconds**; ``event_id`` is the dedup key
shared with the Snap Pixel (its ``client_dedup_id``).

Identifiers follow Snap's Parameters and Best Practices pages (each checked in the unit tests
against the page's own examples): ``em`` trimmed and lower-cased; ``ph`` digits only with the
country code, no ``+``, no ``00`` prefix and no leading zero (``+44 844 412 4653`` →
``448444124653``: the same form as Meta's); ``fn``/``ln`` lower-case, punctuation removed, other
letters kept as UTF-8 (``Raphaël`` → ``raphaël``); ``ge``, ``ct``, ``st``, ``zp``, ``country``
and ``external_id`` by the same rules as Meta's (Segment's Snap action does the same); all
SHA-256 hex, sent as one-element lists as in Snap's examples. ``sc_click_id`` (the ``ScCid``
URL parameter), ``sc_cookie1`` (the ``_scid`` cookie), ``client_ip_address`` and
``client_user_agent`` go raw.

The token goes in an ``Authorization: Bearer`` header (RudderStack's production client) rather
than the ``access_token`` query parameter of Snap's examples, which would put the token in
URLs that proxies and HTTP debug logs record. A connection with ``test_mode`` sends to
``/events/validate``: Snap's Test Event tool, which checks the events without recording them
as conversions.

Sources: developers.snap.com Conversions API pages (Using the API, Parameters, Best Practices,
Offline Events, Verify Set Up, Deduplication); Snap's business-sdk-v3-java ``api/openapi.yaml``
(response shapes); Segment ``snap-conversions-api/reportConversionEvent/snap-capi-v3.ts``;
RudderStack ``v0/destinations/snapchat_conversion`` (``MAX_BATCH_SIZE = 2000``).

Error model: **whole request**, inferred from the SDK's ``EventResponse`` (one ``status``,
``VALID`` or ``INVALID``, per request; ``event`` = the index of the bad event in error
responses, with ``errors.error_msgs``): the sender drops the named event and resends the rest.
401/403 (token or pixel) are fatal; 429 and 5xx are retried, honouring ``Retry-After``.

UNVERIFIED: the age window (Snap's v2 page: 37 days; Segment: 7 days; RudderStack's docs: 28
days; 37 is used, the one Snap itself wrote); the dedup window (48 hours assumed); the rate
limit (none documented); the HTTP status of throttling (429 assumed); whether Snap accepts the
valid events of a batch that has an invalid one; ``external_id`` (sent by Segment, absent from
Snap's SDK model).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from leadsync.config import SNAPCHAT_EVENT_NAMES
from leadsync.destinations.base import (
    CredentialsError,
    HttpRequest,
    Limits,
    ResultKind,
    SendResult,
    Skip,
)
from leadsync.destinations.common import (
    base_url,
    client_ip,
    currency_code,
    is_true,
    load_json,
    money,
    raw_text,
    retry_after,
    snippet,
)
from leadsync.identity import (
    Ruleset,
    country_rule,
    hash_identifiers_as_lists,
    normalize_city,
    normalize_country,
    normalize_email,
    normalize_external_id,
    normalize_gender,
    normalize_name,
    normalize_phone_digits,
    normalize_state,
    normalize_zip,
    value_rule,
)

if TYPE_CHECKING:
    from leadsync.config import DestinationConfig

TYPE = "snapchat"
DEFAULT_BASE_URL = "https://tr.snapchat.com"
# 2,000 events per request (RudderStack MAX_BATCH_SIZE; the published CAPI schema's maxItems).
LIMITS = Limits(max_batch_events=2000, max_event_age=timedelta(days=37),
                dedup_window=timedelta(hours=48))
EVENT_TIME_UNIT = "s"  # event_time: Unix seconds (Snap's examples)
DEDUP_KEY = "event_id"  # matched with the Snap Pixel's client_dedup_id, per pixel
ERROR_MODEL = "whole_request"  # INVALID names one event ("event": <index>); UNVERIFIED
RETRY_HINT = "Retry-After"  # honoured on 429/5xx when sent (UNVERIFIED: none documented)
RATE_LIMIT_PER_MINUTE: int | None = None  # UNVERIFIED: Snap documents no rate limit
# build_request puts the events in the body as they are: push hands it the events' stored
# JSON (msgspec.Raw) instead of decoding the outbox and encoding it again.
RAW_EVENT_BODIES = True

#: Snap's standard event names: the only ones it accepts (defined with the config checks).
EVENT_NAMES: Final = SNAPCHAT_EVENT_NAMES
#: Snap rejects a PURCHASE without a price and currency (Verify Set Up page).
VALUE_REQUIRED_EVENTS: Final = frozenset({"PURCHASE"})

#: Source columns that can match a row: email, phone, or IP with user agent (Segment's
#: validation; the click id and cookie improve matching but do not suffice alone).
MATCH_KEY_GROUPS: Final = (("email",), ("phone",), ("client_ip", "user_agent"))

#: ``user_data`` hashed keys (see the module docstring).
SNAPCHAT_RULES: Final = Ruleset(
    "snapchat",
    (
        value_rule("em", "email", normalize_email),
        country_rule("ph", "phone", normalize_phone_digits),
        value_rule("fn", "first_name", normalize_name, memoize=True),
        value_rule("ln", "last_name", normalize_name, memoize=True),
        value_rule("ge", "gender", normalize_gender, memoize=True),
        value_rule("ct", "city", normalize_city, memoize=True),
        country_rule("st", "state", normalize_state, memoize=True),
        country_rule("zp", "zip", normalize_zip, memoize=True),
        value_rule("country", "country", normalize_country, memoize=True),
        value_rule("external_id", "external_id", normalize_external_id),
    ),
)

#: The rules the events are built with (the data contract judges identifiers by them).
IDENTIFIER_RULES: Final = SNAPCHAT_RULES

_PIXEL_RE = re.compile(r"^[A-Za-z0-9-]{8,64}$")
_RAW_ID_RE = re.compile(r"^[\x21-\x7e]{1,512}$")  # printable, no spaces


@dataclass(frozen=True)
class SnapchatCredentials:
    """From connection ``leadsync_snapchat``: host, password = Conversions API token, extra =
    ``pixel_id`` and ``test_mode``."""

    base_url: str
    access_token: str
    pixel_id: str
    test_mode: bool = False

    def __repr__(self) -> str:  # never print the token
        return (f"SnapchatCredentials(base_url={self.base_url!r}, pixel_id={self.pixel_id!r}, "
                f"test_mode={self.test_mode!r}, access_token='***')")


def parse_credentials(
    host: str | None, password: str | None, extra: Mapping[str, Any]
) -> SnapchatCredentials:
    """Validates the connection's fields; the error names the field to fix."""
    if not password:
        raise CredentialsError("connection field 'password' (the Snap Conversions API token) "
                               "is empty")
    pixel = str(extra.get("pixel_id") or "").strip()
    if not pixel:
        raise CredentialsError("connection extra 'pixel_id' (the Snap Pixel id, a UUID) is "
                               "missing")
    if not _PIXEL_RE.match(pixel):
        raise CredentialsError(f"connection extra 'pixel_id' must be the Snap Pixel id (letters, "
                               f"digits and '-'), got {pixel!r}")
    test_mode = extra.get("test_mode", False)
    if not isinstance(test_mode, bool):
        raise CredentialsError("connection extra 'test_mode' must be true or false")
    base = base_url(host, DEFAULT_BASE_URL)
    return SnapchatCredentials(base, password, pixel, test_mode)


def check_row(row: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """Rows Snap must not receive: opted out."""
    if is_true(row.get("opted_out")):
        return Skip("opted_out")
    return None


def build_event(
    row: Mapping[str, Any],
    dest: DestinationConfig,
    event_name: str,
    event_id: str,
    event_time: datetime,
) -> dict[str, Any]:
    """One ``data[]`` event: hashed identifiers as one-element lists, click ids raw."""
    user: dict[str, Any] = hash_identifiers_as_lists(row, SNAPCHAT_RULES)
    for column in ("sc_click_id", "sc_cookie1"):
        text = raw_text(row, column)
        if text and _RAW_ID_RE.match(text):
            user[column] = text
    ip = client_ip(row)
    if ip:
        user["client_ip_address"] = ip
    agent = raw_text(row, "user_agent")
    if agent:
        user["client_user_agent"] = agent
    event: dict[str, Any] = {
        "event_name": event_name,
        "event_time": int(event_time.timestamp()),
        "event_id": event_id,
        "action_source": "OFFLINE" if dest.shape == "crm" else "WEB",
        "user_data": user,
    }
    if dest.shape == "website":
        url = raw_text(row, "event_source_url")
        if url:
            event["event_source_url"] = url
    value = money(row.get("value"))
    currency = currency_code(row)
    if value is not None and currency:
        event["custom_data"] = {"value": value, "currency": currency}
    if is_true(row.get("limited_data_use")):
        event["data_processing_options"] = ["LDU"]
    return event


def check_event(event: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """An event Snap would reject as insufficient PII, or a PURCHASE without a value."""
    user = event["user_data"]
    if "em" not in user and "ph" not in user and not (
        "client_ip_address" in user and "client_user_agent" in user
    ):
        return Skip("no_match_keys")
    if event["event_name"] in VALUE_REQUIRED_EVENTS and "custom_data" not in event:
        return Skip("purchase_needs_value_and_currency")
    if event["action_source"] == "WEB" and "event_source_url" not in event:
        return Skip("website_event_needs_url")
    return None


def build_request(
    events: list[dict[str, Any]], creds: SnapchatCredentials, dest: DestinationConfig
) -> HttpRequest:
    """One request of up to 2,000 events to the pixel (``/validate`` in test mode)."""
    suffix = "/validate" if creds.test_mode else ""
    return HttpRequest(
        method="POST",
        url=f"{creds.base_url}/v3/{creds.pixel_id}/events{suffix}",
        body={"data": list(events)},
        headers={"Authorization": f"Bearer {creds.access_token}",
                 "Content-Type": "application/json"},
        secret_headers=("Authorization",),
    )


def _error_text(data: Mapping[str, Any]) -> str:
    reason = str(data.get("reason") or "")
    errors = data.get("errors")
    msgs: list[str] = []
    if isinstance(errors, Mapping):
        codes = errors.get("codes") or []
        texts = errors.get("error_msgs") or []
        msgs = [str(m) for m in (texts if isinstance(texts, list) else [texts])]
        if isinstance(codes, list) and codes:
            msgs.insert(0, ",".join(str(c) for c in codes))
    return "; ".join(part for part in (reason, *msgs) if part) or "INVALID"


def parse_response(
    status: int, body: str, headers: Mapping[str, str], n_sent: int
) -> SendResult:
    """Classifies a response by HTTP status, then the body's ``status`` (VALID/INVALID)."""
    data = load_json(body)
    if status == 429 or status >= 500:
        return SendResult(ResultKind.TRANSIENT, f"HTTP {status}: {snippet(body)}",
                          retry_after=retry_after(headers), code=f"http_{status}")
    if status in (401, 403):
        return SendResult(ResultKind.FATAL, f"HTTP {status} from the Snap Conversions API "
                          f"({snippet(body)}): check the leadsync_snapchat connection's token "
                          "and pixel_id", code=f"http_{status}")
    if not isinstance(data, dict) or data.get("status") not in ("VALID", "INVALID"):
        if 200 <= status < 300:
            # G6: a 2xx without Snap's status proves nothing was accepted; retry (same ids).
            return SendResult(ResultKind.TRANSIENT, f"HTTP {status} without a Snap status: "
                              f"{snippet(body)}", code="no_status")
        if status == 404:
            return SendResult(ResultKind.FATAL, "HTTP 404 from the Snap Conversions API: "
                              "check the leadsync_snapchat connection's host and pixel_id",
                              code="http_404")
        return SendResult(ResultKind.PERMANENT, f"HTTP {status}: {snippet(body)}",
                          code=f"http_{status}")
    if data["status"] == "VALID" and 200 <= status < 300:
        return SendResult(ResultKind.OK, str(data.get("reason") or "VALID"), code="VALID")
    text = f"INVALID: {_error_text(data)}"
    index = data.get("event")
    errors: dict[int, str] = {}
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < n_sent:
        errors[index] = text
    return SendResult(ResultKind.PERMANENT, text, code="INVALID", event_errors=errors)

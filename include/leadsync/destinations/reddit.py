"""Reddit Conversions API v3 (``POST /api/v3/pixels/{pixel_id}/conversion_events``).

Facts and where they come from (no official Reddit SDK exists; Reddit's API reference at
ads-api.reddit.com/docs/v3 could not be read from here, so most facts are from RudderStack's
Reddit destination, ``rudderlabs/rudder-transformer`` ``src/cdk/v2/destinations/reddit``
(``transformV3.ts``, ``config.ts``, ``docs/businesslogic.md``) and
``src/v1/destinations/reddit/networkHandler.js``, and are marked UNVERIFIED):

* ``Authorization: Bearer <conversion access token>`` (Events Manager); body
  ``{"data": {"test_id"?, "events": [...]}}``; ``test_id`` (from Events Manager) makes the
  request a test whose events show under test events only.
* Event: ``event_at`` (Unix **milliseconds**), ``action_source`` (``WEBSITE``, ``APP``,
  ``PHYSICAL_STORE``, ``OTHER``), ``type {tracking_type, custom_event_name}`` with
  ``tracking_type`` one of ``PAGE_VISIT``, ``VIEW_CONTENT``, ``SEARCH``, ``ADD_TO_CART``,
  ``ADD_TO_WISHLIST``, ``PURCHASE``, ``LEAD``, ``SIGN_UP`` or ``CUSTOM`` (then
  ``custom_event_name`` names it), ``click_id`` (raw, the ``rdt_cid`` URL parameter),
  ``user {email, phone_number, external_id, ip_address, user_agent, ...}``, ``metadata
  {conversion_id, currency, value, item_count, products}``.
* Dedup key: ``metadata.conversion_id``, shared with the Reddit pixel.
* **UNVERIFIED** batch limit 1,000 events (RudderStack ``maxBatchSize``).
* **UNVERIFIED** age window: ``event_at`` at most 168 hours (7 days) old and at most 5 minutes
  in the future (RudderStack's validation, mirrored here as the limit and the default
  ``future_tolerance`` check of the contract).
* **UNVERIFIED** error model: a bad event fails the whole request with HTTP 400; RudderStack
  reads ``invalid_events [{event_index, error_message}]`` when present (then the sender drops
  those and resends the rest), otherwise the sender isolates the bad event by splitting. 401
  with ``error.reason`` ``UNAUTHORIZED`` = bad token (fatal); 429 and 5xx are retried
  (``Retry-After`` honoured when present).
* **UNVERIFIED** rate limit: "one request per second" (a third-party copy of the Ads API
  OpenAPI description); the destination's pool caps concurrency.
* **UNVERIFIED** dedup window: not documented; a reprocess never resends a delivered event
  (``dedup_window`` zero).

Normalisation: ``email`` follows Reddit's "Manual Advanced Matching" guide (read from a copy
of Reddit's documentation): lowercase, drop the ``+alias`` of the user name, drop every
non-alphanumeric character of the user name, then SHA-256 (``Al.ice$+Apple@Example.Com`` and
``alice@example.com`` both hash to ``ff8d9819...d976``). ``phone_number`` is E.164 with '+'
(UNVERIFIED), ``external_id`` trimmed + lowercased, ``ip_address`` hashed (RudderStack hashes
it; whether Reddit requires it hashed is UNVERIFIED, and hashing keeps an IP out of a
request's clear text), ``user_agent`` and ``click_id`` raw.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

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
    hash_identifiers,
    normalize_email,
    normalize_external_id,
    normalize_phone_e164,
    value_rule,
)

if TYPE_CHECKING:
    from leadsync.config import DestinationConfig

TYPE = "reddit"
DEFAULT_BASE_URL = "https://ads-api.reddit.com"
LIMITS = Limits(max_batch_events=1000, max_event_age=timedelta(days=7),
                dedup_window=timedelta(0))
RAW_EVENT_BODIES = True
#: Requests per second (UNVERIFIED, see the module docstring).
RATE_LIMIT_PER_SECOND = 1
#: How far in the future ``event_at`` may be (UNVERIFIED, RudderStack's validation).
MAX_FUTURE = timedelta(minutes=5)

TRACKING_TYPES: Final = frozenset({"PAGE_VISIT", "VIEW_CONTENT", "SEARCH", "ADD_TO_CART",
                                   "ADD_TO_WISHLIST", "PURCHASE", "LEAD", "SIGN_UP"})
ACTION_SOURCES: Final = frozenset({"WEBSITE", "APP", "PHYSICAL_STORE", "OTHER"})

#: Match keys the contract checks: hashed email, phone or external id, the click id, or the
#: IP address with the user agent.
MATCH_KEY_GROUPS = (("email",), ("phone",), ("external_id",), ("rdt_cid",),
                    ("client_ip", "user_agent"))
_MATCH_KEYS = ("email", "phone_number", "external_id")

_PIXEL_RE = re.compile(r"^[A-Za-z0-9_]{2,64}$")
_NOT_ALNUM = re.compile(r"[^0-9a-z]+")
_INDEX_KEYS = ("event_index", "index")


def normalize_email_reddit(value: object) -> str | None:
    """An email canonicalised as Reddit asks before hashing.

    Lowercased; the user name loses everything from its first '+' and every character that
    is not a letter or digit (``Al.ice$+Apple@Example.Com`` → ``alice@example.com``).

    Args:
        value: The raw email.

    Returns:
        The canonical address, or None when unusable (also when nothing of the user name is
        left).
    """
    s = normalize_email(value)
    if s is None:
        return None
    local, _, domain = s.rpartition("@")
    local = _NOT_ALNUM.sub("", local.partition("+")[0])
    return f"{local}@{domain}" if local else None


def normalize_ip_address(value: object) -> str | None:
    """An IP address in its canonical text form (hashed by the ruleset), or None."""
    if not isinstance(value, str):
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


#: ``user`` hashed keys (module docstring).
REDDIT_RULES: Final = Ruleset(
    "reddit",
    (
        value_rule("email", "email", normalize_email_reddit),
        country_rule("phone_number", "phone", normalize_phone_e164),
        value_rule("external_id", "external_id", normalize_external_id),
        value_rule("ip_address", "client_ip", normalize_ip_address),
    ),
)

#: What the data contract judges for this platform: the rules its ``user`` is built with (an
#: unusable email, phone or country is dropped and counted, the row sent on its other keys).
IDENTIFIER_RULES: Final = REDDIT_RULES


@dataclass(frozen=True)
class RedditCredentials:
    """From connection ``leadsync_reddit``: host, password = conversion access token,
    extra = ``pixel_id`` and ``test_id``."""

    base_url: str
    access_token: str
    pixel_id: str
    test_id: str | None = None

    def __repr__(self) -> str:  # never print the token
        return (f"RedditCredentials(base_url={self.base_url!r}, pixel_id={self.pixel_id!r}, "
                f"test_id={self.test_id!r}, access_token='***')")


def parse_credentials(
    host: str | None, password: str | None, extra: Mapping[str, Any]
) -> RedditCredentials:
    """Validates the connection's fields; the error names the field to fix."""
    if not password:
        raise CredentialsError("connection field 'password' (the Reddit conversion access "
                               "token from Events Manager) is empty")
    pixel = str(extra.get("pixel_id") or "").strip()
    if not pixel:
        raise CredentialsError("connection extra 'pixel_id' (the Reddit pixel id, e.g. "
                               "'t2_abc123', or the ad account id) is missing")
    if not _PIXEL_RE.match(pixel):
        raise CredentialsError(f"connection extra 'pixel_id' must be letters, digits and "
                               f"'_', got {pixel!r}")
    test_id = extra.get("test_id")
    if test_id is not None and not isinstance(test_id, str):
        raise CredentialsError("connection extra 'test_id' must be a string")
    base = base_url(host, DEFAULT_BASE_URL)
    return RedditCredentials(base, password, pixel, (test_id or "").strip() or None)


def check_row(row: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """Rows Reddit must not receive: opted out."""
    if is_true(row.get("opted_out")):
        return Skip("opted_out")
    return None


def event_type(event_name: str) -> dict[str, str]:
    """``type`` for a configured event name: a standard tracking type as it is, anything
    else as a custom event carrying the name."""
    name = event_name.strip()
    if name.upper() in TRACKING_TYPES and name == name.upper():
        return {"tracking_type": name}
    return {"tracking_type": "CUSTOM", "custom_event_name": name}


def build_event(
    row: Mapping[str, Any],
    dest: DestinationConfig,
    event_name: str,
    event_id: str,
    event_time: datetime,
) -> dict[str, Any]:
    """One ``events[]`` entry: email, phone, external id and IP hashed; click id raw."""
    user: dict[str, Any] = dict(hash_identifiers(row, REDDIT_RULES))
    agent = raw_text(row, "user_agent")
    if agent:
        user["user_agent"] = agent
    metadata: dict[str, Any] = {"conversion_id": event_id}
    value = money(row.get("value"))
    currency = currency_code(row)
    if value is not None and currency:
        metadata["value"] = value
        metadata["currency"] = currency
    event: dict[str, Any] = {
        "event_at": int(event_time.timestamp() * 1000),
        "action_source": "OTHER" if dest.shape == "crm" else "WEBSITE",
        "type": event_type(event_name),
        "user": user,
        "metadata": metadata,
    }
    click = raw_text(row, "rdt_cid")
    if click:
        event["click_id"] = click
    if dest.shape == "website":
        url = raw_text(row, "event_source_url")
        if url:
            event["event_source_url"] = url
    return event


def check_event(event: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """An event Reddit cannot match: no hashed id, no click id, no IP with user agent."""
    user = event["user"]
    if any(k in user for k in _MATCH_KEYS) or "click_id" in event:
        return None
    if "ip_address" in user and "user_agent" in user:
        return None
    return Skip("no_match_keys")


def build_request(
    events: list[dict[str, Any]], creds: RedditCredentials, dest: DestinationConfig
) -> HttpRequest:
    """One ``conversion_events`` request for up to 1,000 events of one pixel."""
    data: dict[str, Any] = {"events": list(events)}
    if creds.test_id:
        data["test_id"] = creds.test_id
    return HttpRequest(
        method="POST",
        url=f"{creds.base_url}/api/v3/pixels/{creds.pixel_id}/conversion_events",
        body={"data": data},
        headers={"Authorization": f"Bearer {creds.access_token}",
                 "Content-Type": "application/json"},
        secret_headers=("Authorization",),
    )


def invalid_event_indices(data: Any, n_sent: int) -> dict[int, str]:
    """The events a 400 names: ``invalid_events [{event_index, error_message}]``."""
    found: dict[int, str] = {}
    items = data.get("invalid_events") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return found
    for item in items:
        if not isinstance(item, dict):
            continue
        index = next((item[k] for k in _INDEX_KEYS if k in item), None)
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < n_sent:
            found.setdefault(index, str(item.get("error_message") or "invalid event"))
    return found


def _error_text(data: Any, body: str) -> str:
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            parts = [str(error.get(k)) for k in ("reason", "explanation", "message")
                     if error.get(k)]
            if parts:
                return ": ".join(parts)
        if data.get("message"):
            return str(data["message"])
    return snippet(body)


def parse_response(
    status: int, body: str, headers: Mapping[str, str], n_sent: int
) -> SendResult:
    """Classifies a response by HTTP status (the body names bad events on a 400)."""
    data = load_json(body)
    text = f"HTTP {status}: {_error_text(data, body)}"
    if status == 429 or status >= 500:
        return SendResult(ResultKind.TRANSIENT, text, retry_after=retry_after(headers),
                          code=f"http_{status}")
    if status in (401, 403, 404):
        return SendResult(ResultKind.FATAL, f"Reddit refused the request ({text}). Check the "
                          "leadsync_reddit connection's token and pixel_id.",
                          code=f"http_{status}")
    if 200 <= status < 300:
        return SendResult(ResultKind.OK, "accepted", code=str(status))
    return SendResult(ResultKind.PERMANENT, text, code=f"http_{status}",
                      event_errors=invalid_event_indices(data, n_sent) if status == 400 else {})

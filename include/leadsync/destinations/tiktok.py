"""TikTok Events API 2.0 (``POST /open_api/v1.3/event/track/``, header ``Access-Token``).

Two shapes, chosen per destination like Meta's: ``crm`` (``event_source`` ``crm``, the CRM event
set id as ``event_source_id``, ``lead {lead_id, lead_event_source}``) and ``website``
(``event_source`` ``web``, the pixel code, ``page.url``). Identifiers follow TikTok's rules
(email trim+lowercase, phone E.164 *with* ``+``, external_id hashed; click id, ``_ttp``, IP and
user agent raw). Facts: ``docs/platforms.md`` §2.

TikTok answers HTTP 200 even for errors and puts the outcome in the body ``code``: 0 (and
20001, which RudderStack also treats as success) accepted; 40100 throttled (retried with
backoff: no Retry-After is documented); 40700 and 5xxxx internal (retried); 40001 no
permission (fatal: fix the token or event source id); 40002 invalid parameters (the whole
batch is rejected; the message names the bad event as ``Batch.<index>.<field>``, which the
sender drops before resending the rest); other codes are permanent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

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
from leadsync.identity import TIKTOK_RULES, hash_identifiers

if TYPE_CHECKING:
    from leadsync.config import DestinationConfig

TYPE = "tiktok"
DEFAULT_BASE_URL = "https://business-api.tiktok.com"
TRACK_PATH = "/open_api/v1.3/event/track/"
# 1,000 events per request (docs/platforms.md §2). TikTok's age limit is UNVERIFIED; 28 days is
# its longest attribution window (third-party docs): older events would not be attributed.
# Same event + event_id within 48 hours is deduplicated (docs/platforms.md §2).
LIMITS = Limits(max_batch_events=1000, max_event_age=timedelta(days=28),
                dedup_window=timedelta(hours=48))

# What the data contract judges for this platform: the identifier rules of the events it builds
# (an unusable value is dropped and counted, the row sent on its other keys) and the match keys,
# as groups of source columns; a group counts when each of its columns holds a usable value
# (IP and user agent only match together). A row with no group left is quarantined.
IDENTIFIER_RULES = TIKTOK_RULES
MATCH_KEY_GROUPS: tuple[tuple[str, ...], ...] = (
    ("email",), ("phone",), ("external_id",), ("ttclid",), ("ttp",), ("tiktok_lead_id",),
    ("client_ip", "user_agent"))

# build_request puts the events in the body as they are: push hands it the events' stored
# JSON (msgspec.Raw) instead of decoding the outbox and encoding it again.
RAW_EVENT_BODIES = True

SUCCESS_CODES = frozenset({0, 20001})
THROTTLE_CODE = 40100
TRANSIENT_CODES = frozenset({40100, 40700})
FATAL_CODES = frozenset({40001})
INVALID_PARAMS_CODE = 40002

_EVENT_SOURCE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{4,64}$")
_LEAD_ID_RE = re.compile(r"^\d{6,32}$")
# "Batch.0.properties.contents.0.content_id: Not a valid string" (RudderStack's recorded
# response); "data[3]" / "data.3" are accepted too.
_BAD_EVENT_RE = re.compile(r"\b(?:Batch|batch|data)(?:\.|\[)(\d+)\]?")
_MATCH_KEYS = ("email", "phone", "external_id", "ttclid", "ttp")


@dataclass(frozen=True)
class TikTokCredentials:
    """From connection ``leadsync_tiktok``: host, password = access token, extra = ids."""

    base_url: str
    access_token: str
    event_source_id: str
    test_event_code: str | None = None

    def __repr__(self) -> str:  # never print the token
        return (
            f"TikTokCredentials(base_url={self.base_url!r}, "
            f"event_source_id={self.event_source_id!r}, "
            f"test_event_code={self.test_event_code!r}, access_token='***')"
        )


def parse_credentials(
    host: str | None, password: str | None, extra: Mapping[str, Any]
) -> TikTokCredentials:
    """Validates the connection's fields; the error names the field to fix."""
    if not password:
        raise CredentialsError("connection field 'password' (the TikTok Events API access "
                               "token) is empty")
    source_id = str(extra.get("event_source_id") or "").strip()
    if not source_id:
        raise CredentialsError("connection extra 'event_source_id' (the CRM event set id, or "
                               "the pixel code for shape 'website') is missing")
    if not _EVENT_SOURCE_ID_RE.match(source_id):
        raise CredentialsError(f"connection extra 'event_source_id' must be letters and "
                               f"digits, got {source_id!r}")
    test_code = extra.get("test_event_code")
    if test_code is not None and not isinstance(test_code, str):
        raise CredentialsError("connection extra 'test_event_code' must be a string")
    base = base_url(host, DEFAULT_BASE_URL)
    return TikTokCredentials(base, password, source_id, (test_code or "").strip() or None)


def check_row(row: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """Rows TikTok must not receive: opted out."""
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
    """One ``data[]`` event; email, phone and external_id hashed, click ids raw."""
    user: dict[str, Any] = dict(hash_identifiers(row, TIKTOK_RULES))
    for column, key in (("ttclid", "ttclid"), ("ttp", "ttp"), ("user_agent", "user_agent")):
        text = raw_text(row, column)
        if text:
            user[key] = text
    ip = client_ip(row)
    if ip:
        user["ip"] = ip

    event: dict[str, Any] = {
        "event": event_name,
        "event_time": int(event_time.timestamp()),
        "event_id": event_id,
        "user": user,
    }
    if dest.shape == "crm":
        lead: dict[str, Any] = {"lead_event_source": dest.crm_name}
        lead_id = raw_text(row, "tiktok_lead_id")
        if lead_id and _LEAD_ID_RE.match(lead_id):
            lead["lead_id"] = lead_id  # raw: TikTok matches its own lead id as is
        event["lead"] = lead
    else:
        url = raw_text(row, "event_source_url")
        if url:
            event["page"] = {"url": url}
    value = money(row.get("value"))
    currency = currency_code(row)
    if value is not None and currency:
        event["properties"] = {"value": value, "currency": currency}
    if is_true(row.get("limited_data_use")):
        event["limited_data_use"] = True
    return event


def check_event(event: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """An event TikTok cannot match (no identifier, no lead id, no IP + user agent)."""
    user = event["user"]
    if any(k in user for k in _MATCH_KEYS) or "lead_id" in event.get("lead", {}):
        return None
    if "ip" in user and "user_agent" in user:
        return None
    return Skip("no_match_keys")


def build_request(
    events: list[dict[str, Any]], creds: TikTokCredentials, dest: DestinationConfig
) -> HttpRequest:
    """One ``/event/track/`` request for up to 1,000 events of one event source."""
    body: dict[str, Any] = {
        "event_source": "crm" if dest.shape == "crm" else "web",
        "event_source_id": creds.event_source_id,
        "data": list(events),
    }
    if creds.test_event_code:
        body["test_event_code"] = creds.test_event_code
    return HttpRequest(
        method="POST",
        url=f"{creds.base_url}{TRACK_PATH}",
        body=body,
        headers={"Access-Token": creds.access_token, "Content-Type": "application/json"},
        secret_headers=("Access-Token",),
    )


def bad_event_indices(message: str, n_sent: int) -> dict[int, str]:
    """The events a 40002 message names (``Batch.<index>.<field>: <problem>``)."""
    found: dict[int, str] = {}
    for part in re.split(r"[;\n]", message):
        for match in _BAD_EVENT_RE.finditer(part):
            index = int(match.group(1))
            if 0 <= index < n_sent:
                found.setdefault(index, part.strip())
    return found


def parse_response(
    status: int, body: str, headers: Mapping[str, str], n_sent: int
) -> SendResult:
    """Classifies a response by HTTP status first, then by the body's ``code``."""
    data = load_json(body)
    if status >= 500 or status == 429:
        return SendResult(ResultKind.TRANSIENT, f"HTTP {status}: {snippet(body)}",
                          retry_after=retry_after(headers), code=f"http_{status}")
    if status in (401, 403, 404):
        return SendResult(ResultKind.FATAL, f"HTTP {status} from the TikTok Events API: check "
                          "the leadsync_tiktok connection's host and token",
                          code=f"http_{status}")
    code = data.get("code") if isinstance(data, dict) else None
    if not isinstance(code, int) or isinstance(code, bool):
        if 200 <= status < 300:
            # G6: a 200 without TikTok's envelope proves nothing was accepted; retry.
            return SendResult(ResultKind.TRANSIENT, f"HTTP {status} without a TikTok response "
                              f"code: {snippet(body)}", code="no_code")
        return SendResult(ResultKind.PERMANENT, f"HTTP {status}: {snippet(body)}",
                          code=f"http_{status}")
    assert isinstance(data, dict)
    message = str(data.get("message") or "")
    text = f"code {code}: {message}"
    if code in SUCCESS_CODES:
        return SendResult(ResultKind.OK, text, code=str(code))
    if code in TRANSIENT_CODES or 50000 <= code < 60000:
        return SendResult(ResultKind.TRANSIENT, text, retry_after=retry_after(headers),
                          code=str(code))
    if code in FATAL_CODES:
        return SendResult(ResultKind.FATAL, f"TikTok refused the request ({text}). Check the "
                          "leadsync_tiktok connection's token and event_source_id.",
                          code=str(code))
    errors = bad_event_indices(message, n_sent) if code == INVALID_PARAMS_CODE else {}
    return SendResult(ResultKind.PERMANENT, text, code=str(code), event_errors=errors)

"""LinkedIn Conversions API (``POST https://api.linkedin.com/rest/conversionEvents``).

Each CRM stage maps to a *conversion rule* (created in Campaign Manager with conversion
method ``CONVERSIONS_API``): the stage map's values are rule ids, sent as
``conversion: urn:lla:llaPartnerConversion:<id>``. One request is a Rest.li ``BATCH_CREATE``
(headers ``X-RestLi-Method: BATCH_CREATE``, ``X-Restli-Protocol-Version: 2.0.0`` and the
monthly ``LinkedIn-Version: YYYYMM``) of up to 5,000 ``elements``, each with
``conversionHappenedAt`` in epoch **milliseconds**, ``eventId`` (deduplicated against the
Insight Tag's event id), ``user.userIds`` and ``conversionValue``.

Identifiers: ``SHA256_EMAIL`` is the SHA-256 of the trimmed, lower-cased email (an email that
already is a SHA-256 digest goes through lower-cased); ``LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID``
is the ``li_fat_id`` click id, raw. ``user.userInfo`` (first and last name, company, title,
country) is **not** sent: LinkedIn takes those fields unhashed, and leadsync never writes raw
PII to the outbox (G5); a row matches on its email or ``li_fat_id``.

Sources: LinkedIn's Conversions API page (learn.microsoft.com, linkedin/marketing/integrations/
ads-reporting/conversions-api), Segment ``linkedin-conversions/api/index.ts``, RudderStack
``cdk/v2/destinations/linkedin_ads`` and ``v1/destinations/linkedin_ads/networkHandler.js`` with
its recorded responses.

Error model: **whole request**. One bad element fails the batch; LinkedIn answers 422 with a
message naming the bad elements (``Index: <i>, ERROR :: /path :: problem``, one line each) or
400 naming them as ``indices [i, j] (0-indexed)``; the sender drops those and resends the rest.
A 200 carries one ``{"status": 201}`` per element. 401 (invalid, expired or revoked token), 403
(no ``rw_conversions`` permission or ad account role) and 426 (the ``LinkedIn-Version`` is no
longer served) are fatal; 429 (throttled) and 5xx are retried, honouring ``Retry-After``.

UNVERIFIED: the rate limit (600 requests/min and 300,000/day per Salesforce's connector docs,
not LinkedIn's page); whether LinkedIn sends ``Retry-After`` with a 429; how long ``eventId``
deduplicates (24 hours assumed, the bound for a reprocess); the 64-character ``eventId`` limit
(Salesforce's docs); trimming the email before hashing (Segment lower-cases, LinkedIn's page
says lower-case); the 422 status (RudderStack found it "by trial and error").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
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
from leadsync.identity import Ruleset, hash_identifiers, normalize_email, value_rule

if TYPE_CHECKING:
    from leadsync.config import DestinationConfig

TYPE = "linkedin"
DEFAULT_BASE_URL = "https://api.linkedin.com"
EVENTS_PATH = "/rest/conversionEvents"
# LinkedIn serves each monthly version for about a year; Segment pins 202603 (RudderStack
# 202511). A connection's extra 'api_version' overrides it.
DEFAULT_API_VERSION = "202603"
RESTLI_PROTOCOL_VERSION = "2.0.0"
CONVERSION_URN_PREFIX = "urn:lla:llaPartnerConversion:"
# 5,000 elements per BATCH_CREATE (RudderStack MAX_BATCH_SIZE; Segment). LinkedIn rejects
# events older than 90 days (Segment and RudderStack validate it; Salesforce's docs: "rejected").
# Dedup window of eventId: UNVERIFIED, 24 hours assumed (a reprocess never resends older ones).
LIMITS = Limits(max_batch_events=5000, max_event_age=timedelta(days=90),
                dedup_window=timedelta(hours=24))
MAX_EVENT_ID_LENGTH = 64  # UNVERIFIED (Salesforce's connector docs)
EVENT_TIME_UNIT = "ms"  # conversionHappenedAt: epoch milliseconds
DEDUP_KEY = "eventId"  # shared with the Insight Tag's event id, per conversion rule
ERROR_MODEL = "whole_request"  # one bad element fails the batch; 400/422 name the elements
RETRY_HINT = "Retry-After"  # honoured on 429/5xx when sent (UNVERIFIED that LinkedIn sends it)
RATE_LIMIT_PER_MINUTE = 600  # UNVERIFIED (Salesforce's connector docs); 429 when exceeded
RATE_LIMIT_PER_DAY = 300_000  # UNVERIFIED (same source)
# build_request puts the events in the body as they are: push hands it the events' stored
# JSON (msgspec.Raw) instead of decoding the outbox and encoding it again.
RAW_EVENT_BODIES = True

ID_SHA256_EMAIL = "SHA256_EMAIL"
ID_FIRST_PARTY_UUID = "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID"

#: Source columns that can match a row (the data contract's no_match_keys rule uses these).
MATCH_KEY_GROUPS: Final = (("email",), ("li_fat_id",))

#: ``user.userIds`` hashed identifiers: the email, trimmed and lower-cased.
LINKEDIN_RULES: Final = Ruleset(
    "linkedin", (value_rule(ID_SHA256_EMAIL, "email", normalize_email),)
)

#: The rules the events are built with (the data contract judges identifiers by them).
IDENTIFIER_RULES: Final = LINKEDIN_RULES

_VERSION_RE = re.compile(r"^20\d{2}(0[1-9]|1[0-2])$")
_RULE_ID_RE = re.compile(r"^\d{1,20}$")
# li_fat_id: LinkedIn's first-party click id (a UUID-like token); anything with whitespace or
# control characters is not one.
_FAT_ID_RE = re.compile(r"^[A-Za-z0-9._~-]{1,256}$")
# "Index: 0, ERROR :: /conversionValue/amount :: field is required ...\nERROR :: ...\n"
_INDEX_RE = re.compile(r"Index:\s*(\d+)\s*,")
# "... Conversion's method should be CONVERSIONS_API, indices [0, 3] (0-indexed)"
_INDICES_RE = re.compile(r"indices\s*\[([\d,\s]+)\]")


@dataclass(frozen=True)
class LinkedInCredentials:
    """From connection ``leadsync_linkedin``: host, password = OAuth access token (scope
    ``rw_conversions``), extra = ``api_version`` (``YYYYMM``, optional)."""

    base_url: str
    access_token: str
    api_version: str = DEFAULT_API_VERSION

    def __repr__(self) -> str:  # never print the token
        return (f"LinkedInCredentials(base_url={self.base_url!r}, "
                f"api_version={self.api_version!r}, access_token='***')")


def parse_credentials(
    host: str | None, password: str | None, extra: Mapping[str, Any]
) -> LinkedInCredentials:
    """Validates the connection's fields; the error names the field to fix."""
    if not password:
        raise CredentialsError("connection field 'password' (the LinkedIn OAuth access token "
                               "with scope rw_conversions) is empty")
    version = str(extra.get("api_version") or DEFAULT_API_VERSION).strip()
    if not _VERSION_RE.match(version):
        raise CredentialsError(f"connection extra 'api_version' must be a LinkedIn-Version "
                               f"like '{DEFAULT_API_VERSION}' (YYYYMM), got {version!r}")
    base = base_url(host, DEFAULT_BASE_URL)
    return LinkedInCredentials(base, password, version)


def check_row(row: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """Rows LinkedIn must not receive: opted out."""
    if is_true(row.get("opted_out")):
        return Skip("opted_out")
    return None


def _amount(value: float) -> str:
    # LinkedIn's amount is a decimal string ("1500.0"); Decimal(repr) keeps it exact and
    # never switches to exponent notation for the values money() lets through.
    text = format(Decimal(repr(value)), "f")
    return text if "." in text else f"{text}.0"


def build_event(
    row: Mapping[str, Any],
    dest: DestinationConfig,
    event_name: str,
    event_id: str,
    event_time: datetime,
) -> dict[str, Any]:
    """One ``elements[]`` entry; ``event_name`` is the stage's conversion rule id."""
    user_ids: list[dict[str, str]] = [
        {"idType": key, "idValue": value}
        for key, value in hash_identifiers(row, LINKEDIN_RULES).items()
    ]
    fat_id = raw_text(row, "li_fat_id")
    if fat_id and _FAT_ID_RE.match(fat_id):
        user_ids.append({"idType": ID_FIRST_PARTY_UUID, "idValue": fat_id})
    event: dict[str, Any] = {
        "conversion": f"{CONVERSION_URN_PREFIX}{str(event_name).strip()}",
        "conversionHappenedAt": int(event_time.timestamp() * 1000),
        "eventId": event_id,
        "user": {"userIds": user_ids},
    }
    value = money(row.get("value"))
    currency = currency_code(row)
    if value is not None and currency:
        event["conversionValue"] = {"currencyCode": currency, "amount": _amount(value)}
    return event


def check_event(event: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """No user id to match on, or an event id LinkedIn would reject."""
    if not event["user"]["userIds"]:
        return Skip("no_match_keys")
    if len(event["eventId"]) > MAX_EVENT_ID_LENGTH:
        return Skip("event_id_too_long")
    return None


def build_request(
    events: list[dict[str, Any]], creds: LinkedInCredentials, dest: DestinationConfig
) -> HttpRequest:
    """One ``BATCH_CREATE`` of up to 5,000 conversion events."""
    return HttpRequest(
        method="POST",
        url=f"{creds.base_url}{EVENTS_PATH}",
        body={"elements": list(events)},
        headers={
            "Authorization": f"Bearer {creds.access_token}",
            "Content-Type": "application/json",
            "LinkedIn-Version": creds.api_version,
            "X-Restli-Protocol-Version": RESTLI_PROTOCOL_VERSION,
            "X-RestLi-Method": "BATCH_CREATE",
        },
        secret_headers=("Authorization",),
    )


def bad_event_indices(message: str, n_sent: int) -> dict[int, str]:
    """The elements a 400/422 message names, with the message lines about each."""
    found: dict[int, str] = {}
    current: int | None = None
    for line in message.splitlines():
        line = line.strip()
        if not line:
            continue
        match = _INDEX_RE.search(line)
        if match:
            index = int(match.group(1))
            current = index if 0 <= index < n_sent else None
            if current is not None:
                found[current] = line
        elif current is not None:  # "ERROR :: ..." continuing the element above
            found[current] = f"{found[current]}; {line}"
    for match in _INDICES_RE.finditer(message):
        for part in match.group(1).split(","):
            if part.strip().isdigit() and 0 <= int(part) < n_sent:
                found.setdefault(int(part), snippet(message, 300))
    return found


def _element_errors(elements: list[Any], n_sent: int) -> dict[int, str]:
    errors: dict[int, str] = {}
    for i, element in enumerate(elements[:n_sent]):
        status = element.get("status") if isinstance(element, dict) else None
        if not (isinstance(status, int) and 200 <= status < 300):
            detail = element.get("error") if isinstance(element, dict) else None
            errors[i] = f"element status {status}: {snippet(str(detail or ''), 200)}".strip()
    return errors


def parse_response(
    status: int, body: str, headers: Mapping[str, str], n_sent: int
) -> SendResult:
    """Classifies a ``BATCH_CREATE`` response by HTTP status, then its ``elements``."""
    data = load_json(body)
    message = str(data.get("message") or "") if isinstance(data, dict) else ""
    code = str(data.get("code") or "") if isinstance(data, dict) else ""
    text = f"HTTP {status}: {message or snippet(body)}"
    if 200 <= status < 300:
        elements = data.get("elements") if isinstance(data, dict) else None
        if not isinstance(elements, list) or len(elements) != n_sent:
            # G6: a 2xx that does not account for every element proves nothing; the retry
            # carries the same eventIds, which LinkedIn deduplicates.
            return SendResult(ResultKind.TRANSIENT, f"HTTP {status} without one status per "
                              f"element: {snippet(body)}", code="bad_body")
        errors = _element_errors(elements, n_sent)
        return SendResult(ResultKind.OK, "ok", received=n_sent - len(errors),
                          event_errors=errors, code=str(status))
    if status == 429 or status >= 500:
        return SendResult(ResultKind.TRANSIENT, text, retry_after=retry_after(headers),
                          code=f"http_{status}")
    if status in (401, 403):
        what = ("the token is invalid, expired or revoked" if status == 401 else
                "the token lacks rw_conversions or the member has no role on the ad account")
        return SendResult(ResultKind.FATAL, f"LinkedIn refused the request ({what}; "
                          f"{code or text}). Check the leadsync_linkedin connection's token.",
                          code=f"http_{status}")
    if status == 426:
        return SendResult(ResultKind.FATAL, f"LinkedIn no longer serves this LinkedIn-Version "
                          f"({text}). Set a current 'api_version' (YYYYMM) in the "
                          "leadsync_linkedin connection's extra.", code="http_426")
    if status == 404:
        return SendResult(ResultKind.FATAL, f"{text}. Check the leadsync_linkedin "
                          "connection's host.", code="http_404")
    errors = bad_event_indices(message, n_sent) if status in (400, 422) else {}
    return SendResult(ResultKind.PERMANENT, text, code=f"http_{status}", event_errors=errors)

"""Pinterest Conversions API v5 (``POST /v5/ad_accounts/{ad_account_id}/events``).

Facts, from Pinterest's own OpenAPI description (``pinterest/api-description``
``v5/openapi.yaml``, release 5.23: operation ``events/create``, schemas ``ConversionEvents``,
``ConversionEventsUserDataProperties``, ``ConversionApiResponse``) and the official generated
Python client (``pinterest/pinterest-python-generated-api-client`` docs):

* ``Authorization: Bearer <conversion access token>`` generated in Ads Manager; ``?test=true``
  marks a test request ("the events will not be recorded but the API will still return the
  same response messages").
* Body ``{"data": [...]}``, 1 to **1,000** events (``maxItems: 1000``). Required per event:
  ``event_name`` (``lead``, ``signup``, ``checkout``, ``custom``, ... - no custom names),
  ``action_source`` (``app_android``, ``app_ios``, ``web``, ``offline``), ``event_time`` (Unix
  **seconds**), ``event_id`` and ``user_data``.
* ``user_data`` needs at least one of ``em``, ``hashed_maids``, or ``client_ip_address`` +
  ``client_user_agent``. Hashed keys are SHA-256 hex in **lists**: ``em`` (lowercase email),
  ``ph`` (digits with country code, no symbols or leading zeros), ``fn``/``ln`` (lowercase),
  ``ct`` (lowercase, no spaces or punctuation), ``st`` (two-letter code, lowercase), ``zp``,
  ``country`` (ISO-3166 alpha-2, lowercase), ``ge`` (``f``/``m``/``n``), ``db``,
  ``external_id``. Raw strings: ``client_ip_address``, ``client_user_agent``, ``click_id`` (the
  ``_epik`` cookie / ``&epik=`` parameter).
* ``custom_data.value`` is a **string** ("parsed into a double"), ``currency`` ISO-4217,
  ``order_id`` "helps us deduplicate events when necessary".
* Rate limit: **5,000 calls per minute per ad account**.
* Responses: 200 ``{num_events_received, num_events_processed, events: [{status: processed |
  failed, error_message, warning_message}]}`` in request order (a per-event outcome); 400
  invalid request (code 4196); 401 code 2 "Authentication failed"; 403 code 29; 422 "Not all
  events were successfully processed" (``DetailedError {code, message, details}``); 429 code
  8 rate limited; 503 code 4197 "ramped down".
* Dedup: ``event_id`` against the Pinterest tag - but "events that took place offline cannot be
  deduplicated". So ``custom_data.order_id`` carries the event id too, and a reprocess never
  resends a delivered event (``dedup_window`` zero).

Choices and UNVERIFIED points:

* **UNVERIFIED** event age limit: none is documented. 60 days is the longest conversion
  attribution window in the same API (``ConversionAttributionWindowDays``: 0, 1, 7, 14, 30,
  60); older events could not be attributed, so they are not sent.
* **UNVERIFIED** the body of a 422: when ``details`` (or the body itself) holds the
  ``events`` list, failed events are dead letters and the others delivered; without it the
  request is treated as rejected and the sender isolates the bad events.
* **UNVERIFIED** ``Retry-After`` on 429: honoured when present; otherwise backoff.
* **CONFLICT** ``zp``: the API reference says "only digits", Segment's Pinterest destination
  says "five-digit zip for United States; for other locations, follow each country's
  standards". US codes are 5 digits either way; other countries keep their letters (as Meta).
* ``external_id`` has no documented normalisation: trimmed and lowercased like every other
  platform here. ``db`` is ``YYYYMMDD`` (Segment's example, 19971226).
"""

from __future__ import annotations

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
    normalize_date_of_birth,
    normalize_email,
    normalize_external_id,
    normalize_name,
    normalize_phone_digits,
    normalize_state,
    normalize_zip,
    value_rule,
)

if TYPE_CHECKING:
    from leadsync.config import DestinationConfig

TYPE = "pinterest"
DEFAULT_BASE_URL = "https://api.pinterest.com"
API_VERSION = "v5"
LIMITS = Limits(max_batch_events=1000, max_event_age=timedelta(days=60),
                dedup_window=timedelta(0))
RAW_EVENT_BODIES = True
#: Calls per minute per ad account (the endpoint's documented rate limit).
RATE_LIMIT_PER_MINUTE = 5000

#: ``event_name`` values the API accepts (``ConversionEvents.data[].event_name``).
EVENT_NAMES: Final = frozenset({
    "add_payment_info", "add_to_cart", "add_to_wishlist", "app_install", "checkout", "custom",
    "initiate_checkout", "lead", "page_visit", "search", "signup", "subscribe",
    "view_category", "view_content", "watch_video",
})
ACTION_SOURCES: Final = frozenset({"app_android", "app_ios", "web", "offline"})

# Pinterest error codes (the operation's documented responses).
CODE_AUTH_FAILED = 2
CODE_RATE_LIMITED = 8
CODE_NOT_PERMITTED = 29
CODE_INVALID = 4196
CODE_RAMPED_DOWN = 4197

#: Match keys the contract checks: Pinterest needs an email, a mobile ad id (not in the source
#: contract) or the IP address with the user agent.
MATCH_KEY_GROUPS = (("email",), ("client_ip", "user_agent"))

_AD_ACCOUNT_RE = re.compile(r"^\d{1,20}$")
_GENDERS: Final = {"f": "f", "female": "f", "woman": "f", "m": "m", "male": "m", "man": "m",
                   "n": "n", "nonbinary": "n", "non-binary": "n", "non binary": "n"}


def normalize_gender_pinterest(value: object) -> str | None:
    """``f``, ``m`` or ``n`` (non-binary), which Pinterest documents; None otherwise."""
    if not isinstance(value, str) or len(value) > 16:
        return None
    return _GENDERS.get(" ".join(value.strip().lower().split()))


def normalize_zip_pinterest(value: object, country: object = None) -> str | None:
    """Postal code: US ZIP as 5 digits, other countries as written without spaces (see the
    module docstring: CONFLICT between "only digits" and "follow each country's standards")."""
    return normalize_zip(value, country)


#: ``user_data`` hashed keys (module docstring). Phone is E.164 digits without '+'. Low-
#: cardinality fields are memoised by raw value, bounded, as in Meta's rules.
PINTEREST_RULES: Final = Ruleset(
    "pinterest",
    (
        value_rule("em", "email", normalize_email),
        country_rule("ph", "phone", normalize_phone_digits),
        value_rule("fn", "first_name", normalize_name, memoize=True),
        value_rule("ln", "last_name", normalize_name, memoize=True),
        value_rule("ct", "city", normalize_city, memoize=True),
        country_rule("st", "state", normalize_state, memoize=True),
        country_rule("zp", "zip", normalize_zip_pinterest, memoize=True),
        value_rule("country", "country", normalize_country, memoize=True),
        value_rule("db", "date_of_birth", normalize_date_of_birth, memoize=True),
        value_rule("ge", "gender", normalize_gender_pinterest, memoize=True),
        value_rule("external_id", "external_id", normalize_external_id),
    ),
)

#: What the data contract judges for this platform: the rules its ``user_data`` is built with (an
#: unusable email, phone or country is dropped and counted, the row sent on its other keys).
IDENTIFIER_RULES: Final = PINTEREST_RULES


@dataclass(frozen=True)
class PinterestCredentials:
    """From connection ``leadsync_pinterest``: host, password = conversion access token,
    extra = ``ad_account_id`` and ``test``."""

    base_url: str
    access_token: str
    ad_account_id: str
    test: bool = False

    def __repr__(self) -> str:  # never print the token
        return (f"PinterestCredentials(base_url={self.base_url!r}, "
                f"ad_account_id={self.ad_account_id!r}, test={self.test!r}, "
                "access_token='***')")


def parse_credentials(
    host: str | None, password: str | None, extra: Mapping[str, Any]
) -> PinterestCredentials:
    """Validates the connection's fields; the error names the field to fix."""
    if not password:
        raise CredentialsError("connection field 'password' (the Pinterest conversion access "
                               "token from Ads Manager) is empty")
    account = str(extra.get("ad_account_id") or "").strip()
    if not account:
        raise CredentialsError("connection extra 'ad_account_id' (the Pinterest ad account "
                               "id, digits) is missing")
    if not _AD_ACCOUNT_RE.match(account):
        raise CredentialsError(f"connection extra 'ad_account_id' must be digits, got "
                               f"{account!r}")
    test = extra.get("test", False)
    if not isinstance(test, bool):
        raise CredentialsError("connection extra 'test' must be true or false")
    base = base_url(host, DEFAULT_BASE_URL)
    return PinterestCredentials(base, password, account, test)


def check_row(row: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """Rows Pinterest must not receive: opted out."""
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
    """One ``data[]`` event: identifiers hashed in lists, IP, user agent and click id raw."""
    user: dict[str, Any] = dict(hash_identifiers_as_lists(row, PINTEREST_RULES))
    ip = client_ip(row)
    if ip:
        user["client_ip_address"] = ip
    agent = raw_text(row, "user_agent")
    if agent:
        user["client_user_agent"] = agent
    click = raw_text(row, "epik")
    if click:
        user["click_id"] = click
    custom: dict[str, Any] = {"order_id": event_id}
    value = money(row.get("value"))
    currency = currency_code(row)
    if value is not None and currency:
        custom["value"] = _decimal_text(value)
        custom["currency"] = currency
    event: dict[str, Any] = {
        "event_name": event_name,
        "action_source": "offline" if dest.shape == "crm" else "web",
        "event_time": int(event_time.timestamp()),
        "event_id": event_id,
        "user_data": user,
        "custom_data": custom,
    }
    if dest.shape == "website":
        url = raw_text(row, "event_source_url")
        if url:
            event["event_source_url"] = url
    return event


def _decimal_text(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def check_event(event: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
    """Pinterest's minimum: an email, or the IP address together with the user agent."""
    user = event["user_data"]
    if "em" in user or ("client_ip_address" in user and "client_user_agent" in user):
        return None
    return Skip("no_match_keys")


def build_request(
    events: list[dict[str, Any]], creds: PinterestCredentials, dest: DestinationConfig
) -> HttpRequest:
    """One ``events`` request for up to 1,000 events of one ad account."""
    return HttpRequest(
        method="POST",
        url=f"{creds.base_url}/{API_VERSION}/ad_accounts/{creds.ad_account_id}/events",
        body={"data": list(events)},
        headers={"Authorization": f"Bearer {creds.access_token}",
                 "Content-Type": "application/json"},
        params={"test": "true"} if creds.test else {},
        secret_headers=("Authorization",),
    )


def per_event_outcomes(data: Any, n_sent: int) -> tuple[int, dict[int, str]] | None:
    """``(num_events_processed, {index: error_message})`` from a ``ConversionApiResponse``,
    or None when ``data`` is not one (or does not describe the ``n_sent`` events)."""
    if not isinstance(data, dict):
        return None
    events = data.get("events")
    processed = data.get("num_events_processed")
    if not isinstance(processed, int) or isinstance(processed, bool):
        return None
    errors: dict[int, str] = {}
    if not isinstance(events, list) or len(events) != n_sent:
        # Counts without a usable list: the sender compares the count (G6: a shortfall is
        # recorded as ack_mismatch, never as delivered).
        return processed, errors
    for index, item in enumerate(events):
        status = item.get("status") if isinstance(item, dict) else None
        if status == "processed":
            continue
        message = item.get("error_message") if isinstance(item, dict) else None
        errors[index] = str(message or f"event status {status!r}")
    return processed, errors


def parse_response(
    status: int, body: str, headers: Mapping[str, str], n_sent: int
) -> SendResult:
    """Classifies a response: per-event statuses on 200 (and 422), codes otherwise."""
    data = load_json(body)
    code = data.get("code") if isinstance(data, dict) else None
    message = str(data.get("message") or "") if isinstance(data, dict) else snippet(body)
    text = f"HTTP {status}" + (f" code {code}" if code is not None else "") + f": {message}"
    if status == 429 or status >= 500:
        return SendResult(ResultKind.TRANSIENT, text, retry_after=retry_after(headers),
                          code=str(code) if code is not None else f"http_{status}")
    if status in (401, 403) or (status == 404 and not isinstance(data, dict)):
        return SendResult(ResultKind.FATAL, f"Pinterest refused the request ({text}). Check "
                          "the leadsync_pinterest connection's token and ad_account_id.",
                          code=str(code) if code is not None else f"http_{status}")
    if status in (200, 201, 422):
        details = data.get("details") if isinstance(data, dict) and status == 422 else data
        outcome = per_event_outcomes(details, n_sent)
        if outcome is not None:
            processed, errors = outcome
            return SendResult(ResultKind.OK, text if status == 422 else "processed",
                              received=processed, event_errors=errors,
                              code=str(code) if code is not None else str(status))
        if status != 422:
            # G6: a 200 that does not list the events proves nothing; retry (same ids).
            return SendResult(ResultKind.TRANSIENT, f"HTTP {status} without per-event "
                              f"statuses: {snippet(body)}", code="no_events")
    return SendResult(ResultKind.PERMANENT, text,
                      code=str(code) if code is not None else f"http_{status}")

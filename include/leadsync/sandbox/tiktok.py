"""TikTok Events API 2.0 emulator: ``POST /open_api/v1.3/event/track/``.

Strict like the Meta emulator: a payload it accepts should be one TikTok accepts
(``docs/platforms.md`` §2). TikTok answers **HTTP 200** for errors too and puts the
outcome in the body: ``{"code", "message", "request_id", "data"}``.

=======  ======================================================================================
code     case
=======  ======================================================================================
0        accepted (``message`` "OK")
40001    missing or unknown ``Access-Token``, or an ``event_source_id`` the token cannot use
         (TikTok: "No permission to operate pixel code ...")
40002    invalid parameters: the WHOLE batch is rejected; the message names the first bad
         event as ``Batch.<index>.<field path>: <problem>`` (RudderStack's recorded shape)
40100    throttled (fault ``throttle``): "Too many requests. Please retry in some time."
=======  ======================================================================================

Hashing: ``user.email``, ``user.phone``, ``user.external_id`` (and ``first_name``,
``last_name``, ``zip_code`` when sent) must be SHA-256 lowercase hex; ``ttclid``, ``ttp``,
``ip``, ``user_agent`` and ``lead.lead_id`` must be raw. ``event_time`` is Unix **seconds**.
Shapes: ``event_source`` ``crm`` needs ``lead.lead_event_source``; ``web`` takes ``page``.

Dedup: same ``event`` + ``event_id`` within 48 hours (``dedup_window_seconds``) is a duplicate
(stored flagged, still acknowledged). Requests with ``test_event_code`` are test events.
What TikTok does with old events is UNVERIFIED, so age is not checked; future times are.
"""

from __future__ import annotations

import ipaddress
import math
import re
import secrets
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from leadsync.sandbox.app import (
    EventInput,
    PlatformSpec,
    RejectEventsFault,
    SandboxState,
    ThrottleFault,
    TikTokErrorFault,
    post_processing_delay,
    pre_processing_delay,
    pre_processing_response,
)

PLATFORM_NAME = "tiktok"
MAX_EVENTS_PER_REQUEST = 1000

CODE_OK = 0
CODE_NO_PERMISSION = 40001
CODE_INVALID_PARAMS = 40002
CODE_THROTTLED = 40100

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ANY_CASE_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
CURRENCY_RE = re.compile(r"^[A-Za-z]{3}$")
LEAD_ID_RE = re.compile(r"^\d{6,32}$")

EVENT_SOURCES = frozenset({"web", "app", "offline", "crm"})
REQUEST_KEYS = frozenset({"event_source", "event_source_id", "partner_name", "test_event_code",
                          "data"})
EVENT_KEYS = frozenset({"event", "event_time", "event_id", "user", "properties", "page", "lead",
                        "limited_data_use", "app", "ad"})
HASHED_USER_KEYS = frozenset({"email", "phone", "external_id", "first_name", "last_name",
                              "zip_code"})
RAW_USER_KEYS = frozenset({"ttclid", "ttp", "ip", "user_agent", "locale", "city", "state",
                           "country", "idfa", "idfv", "gaid", "att_status"})
USER_KEYS = HASHED_USER_KEYS | RAW_USER_KEYS
PROPERTY_KEYS = frozenset({"contents", "content_type", "currency", "value", "order_id",
                           "shop_id", "query", "search_string", "description", "num_items",
                           "predicted_ltv", "delivery_category", "content_ids"})
LEAD_KEYS = frozenset({"lead_id", "lead_event_source"})
PAGE_KEYS = frozenset({"url", "referrer"})
_MATCH_KEYS = frozenset({"email", "phone", "external_id", "ttclid", "ttp", "idfa", "gaid"})


def new_request_id() -> str:
    """A random id shaped like TikTok's ``request_id``."""
    return f"{secrets.randbelow(10**18):018d}{secrets.token_hex(6).upper()}"


def envelope(code: int, message: str) -> dict[str, Any]:
    """TikTok's response body."""
    return {"code": code, "message": message, "request_id": new_request_id(), "data": {}}


class TikTokError(Exception):
    """An error answered with TikTok's envelope (HTTP 200 unless told otherwise)."""

    def __init__(self, code: int, message: str, http_status: int = 200) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status

    def response(self) -> JSONResponse:
        """The HTTP response."""
        return JSONResponse(envelope(self.code, self.message), status_code=self.http_status)


class _Invalid(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_user(user: Any) -> None:
    if not isinstance(user, dict):
        raise _Invalid("user", "Not a valid mapping type")
    for key in sorted(user):
        value = user[key]
        path = f"user.{key}"
        if key not in USER_KEYS:
            raise _Invalid(path, "Unknown field")
        values = value if isinstance(value, list) and key in HASHED_USER_KEYS else [value]
        for item in values:
            if not isinstance(item, str) or not item:
                raise _Invalid(path, "Not a valid string")
            if key in HASHED_USER_KEYS and not SHA256_RE.match(item):
                raise _Invalid(path, "must be hashed with SHA-256 (64 lowercase hex characters)")
            if key in RAW_USER_KEYS and ANY_CASE_SHA256_RE.match(item):
                raise _Invalid(path, "must be sent raw, not hashed")
        if key == "ip":
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise _Invalid(path, "Not a valid IP address") from None


def _check_properties(props: Any) -> None:
    if not isinstance(props, dict):
        raise _Invalid("properties", "Not a valid mapping type")
    for key in sorted(props):
        if key not in PROPERTY_KEYS:
            raise _Invalid(f"properties.{key}", "Unknown field")
    for key in ("value", "predicted_ltv"):
        if key in props and not (_is_number(props[key]) and props[key] >= 0):
            raise _Invalid(f"properties.{key}", "Not a valid number")
    if "currency" in props and not (isinstance(props["currency"], str)
                                    and CURRENCY_RE.match(props["currency"])):
        raise _Invalid("properties.currency", "must be an ISO 4217 currency code")
    if "value" in props and "currency" not in props:
        raise _Invalid("properties.currency", "is required when value is set")


def validate_event(event: Any, *, event_source: str, now: float, max_future: int) -> None:
    """Validates one ``data[]`` event; raises :class:`_Invalid` with a path in the event."""
    if not isinstance(event, dict):
        raise _Invalid("", "Not a valid mapping type")
    for key in sorted(event):
        if key not in EVENT_KEYS:
            raise _Invalid(key, "Unknown field")
    name = event.get("event")
    if not isinstance(name, str) or not name.strip():
        raise _Invalid("event", "Missing data for required field")
    if "event_time" not in event:
        raise _Invalid("event_time", "Missing data for required field")
    event_time = event["event_time"]
    if not _is_int(event_time):
        raise _Invalid("event_time", "Not a valid integer")
    if event_time > 10**11:
        raise _Invalid("event_time", "must be a Unix timestamp in seconds, not milliseconds")
    if event_time - now > max_future:
        raise _Invalid("event_time", "is in the future")
    if "event_id" in event and not (isinstance(event["event_id"], str) and event["event_id"]):
        raise _Invalid("event_id", "Not a valid string")
    if "user" not in event:
        raise _Invalid("user", "Missing data for required field")
    user = event["user"]
    _check_user(user)
    lead = event.get("lead")
    if lead is not None:
        if not isinstance(lead, dict):
            raise _Invalid("lead", "Not a valid mapping type")
        for key in sorted(lead):
            if key not in LEAD_KEYS:
                raise _Invalid(f"lead.{key}", "Unknown field")
        if "lead_id" in lead and not (isinstance(lead["lead_id"], str)
                                      and LEAD_ID_RE.match(lead["lead_id"])):
            raise _Invalid("lead.lead_id", "must be the TikTok lead id (digits, not hashed)")
        if "lead_event_source" in lead and not (isinstance(lead["lead_event_source"], str)
                                                and lead["lead_event_source"].strip()):
            raise _Invalid("lead.lead_event_source", "Not a valid string")
    if event_source == "crm":
        if not isinstance(lead, dict) or "lead_event_source" not in lead:
            raise _Invalid("lead.lead_event_source",
                           "is required for event_source crm (the CRM's name)")
    elif lead is not None:
        raise _Invalid("lead", "is only accepted with event_source crm")
    if "page" in event:
        page = event["page"]
        if not isinstance(page, dict):
            raise _Invalid("page", "Not a valid mapping type")
        for key in sorted(page):
            if key not in PAGE_KEYS or not isinstance(page[key], str):
                raise _Invalid(f"page.{key}", "Unknown field" if key not in PAGE_KEYS
                               else "Not a valid string")
    if "properties" in event:
        _check_properties(event["properties"])
    if "limited_data_use" in event and not isinstance(event["limited_data_use"], bool):
        raise _Invalid("limited_data_use", "Not a valid boolean")
    for key in ("app", "ad"):
        if key in event and not isinstance(event[key], dict):
            raise _Invalid(key, "Not a valid mapping type")
    matchable = any(k in user for k in _MATCH_KEYS) or (
        {"ip", "user_agent"} <= set(user)) or (isinstance(lead, dict) and "lead_id" in lead)
    if not matchable:
        raise _Invalid("user", "at least one identifier is required (email, phone, "
                       "external_id, ttclid, ttp, lead.lead_id, or ip with user_agent)")


def _invalid(index: int, path: str, problem: str) -> TikTokError:
    where = f"Batch.{index}.{path}" if path else f"Batch.{index}"
    return TikTokError(CODE_INVALID_PARAMS, f"{where}: {problem}")


def validate_request(body: Any, state: SandboxState) -> tuple[str, str, str | None, list[Any]]:
    """Validates the request; returns (event_source, event_source_id, test code, events)."""
    if not isinstance(body, dict):
        raise TikTokError(CODE_INVALID_PARAMS, "request body: Not a valid mapping type")
    for key in sorted(body):
        if key not in REQUEST_KEYS:
            raise TikTokError(CODE_INVALID_PARAMS, f"{key}: Unknown field")
    source = body.get("event_source")
    if source not in EVENT_SOURCES:
        raise TikTokError(CODE_INVALID_PARAMS, f"event_source: must be one of "
                          f"{', '.join(sorted(EVENT_SOURCES))}")
    source_id = body.get("event_source_id")
    if not isinstance(source_id, str) or not source_id:
        raise TikTokError(CODE_INVALID_PARAMS, "event_source_id: Missing data for required field")
    if source_id not in state.config.tiktok_event_sources:
        raise TikTokError(CODE_NO_PERMISSION, f"No permission to operate pixel code: "
                          f"{source_id}. You must be an admin or operator of this advertiser "
                          "account.")
    test_code = body.get("test_event_code")
    if test_code is not None and not (isinstance(test_code, str) and test_code.strip()):
        raise TikTokError(CODE_INVALID_PARAMS, "test_event_code: Not a valid string")
    data = body.get("data")
    if not isinstance(data, list) or not data:
        raise TikTokError(CODE_INVALID_PARAMS, "data: Missing data for required field")
    if len(data) > MAX_EVENTS_PER_REQUEST:
        raise TikTokError(CODE_INVALID_PARAMS, f"data: Length must be between 1 and "
                          f"{MAX_EVENTS_PER_REQUEST}.")
    now = state.now()
    for index, event in enumerate(data):
        try:
            validate_event(event, event_source=source, now=now,
                           max_future=state.config.max_future_seconds)
        except _Invalid as exc:
            raise _invalid(index, exc.path, exc.problem) from None
    return source, source_id, test_code, data


def _fault_error(fault: Any) -> TikTokError | None:
    if isinstance(fault, TikTokErrorFault):
        return TikTokError(fault.code, fault.message or "Sandbox injected error",
                           fault.http_status)
    if isinstance(fault, ThrottleFault):
        return TikTokError(CODE_THROTTLED, "Too many requests. Please retry in some time.",
                           fault.http_status or 200)
    return None


async def handle_track(state: SandboxState, request: Request) -> Response:
    """Handles one ``POST /open_api/v1.3/event/track/``."""
    store = state.store
    fault = state.take_fault(PLATFORM_NAME)
    replaced = pre_processing_response(fault)
    error = _fault_error(fault)
    if replaced is not None or error is not None:
        store.count_request(PLATFORM_NAME, "rejected", faulted=True)
        return replaced if replaced is not None else error.response()  # type: ignore[union-attr]
    await pre_processing_delay(fault)
    try:
        token = request.headers.get("access-token")
        if not token or token not in state.config.tiktok_tokens:
            raise TikTokError(CODE_NO_PERMISSION, "Access-Token: missing, or not a valid "
                              "access token")
        try:
            body = await request.json()
        except ValueError:
            raise TikTokError(CODE_INVALID_PARAMS, "request body: not valid JSON") from None
        _, source_id, test_code, events = validate_request(body, state)
        if isinstance(fault, RejectEventsFault):
            for index, event in enumerate(events):
                if fault.matches(index, event.get("event_id")):
                    raise _invalid(index, "event_id",
                                   fault.reason or "rejected by the sandbox (fault injection)")
    except TikTokError as exc:
        store.count_request(PLATFORM_NAME, "rejected")
        response: Response = exc.response()
    else:
        now = state.now()
        store.record_events(
            PLATFORM_NAME,
            source_id,
            [EventInput(event["event"], event.get("event_id"), event["event_time"], event)
             for event in events],
            received_at=now,
            dedup_window_seconds=state.config.dedup_window_seconds,
            test_event_code=test_code,
        )
        store.count_request(PLATFORM_NAME, "accepted")
        response = JSONResponse(envelope(CODE_OK, "OK"))
    await post_processing_delay(fault)
    return response


def build_routers(state: SandboxState) -> list[APIRouter]:
    """The TikTok API router and its control routes."""
    api = APIRouter(tags=["tiktok"])

    @api.post("/open_api/v1.3/event/track/")
    async def track(request: Request) -> Response:
        """TikTok Events API 2.0: report web, app, offline or CRM events."""
        return await handle_track(state, request)

    control = APIRouter(prefix="/_sandbox/tiktok", tags=["sandbox control"])

    @control.get("/events")
    def list_events(
        event_source_id: str | None = None,
        unique: bool = False,
        test: bool = Query(False, description="true: only test events; false: only live events"),
        event_name: str | None = None,
        event_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored TikTok events in receive order (``destination`` is the event source id)."""
        return state.store.list_events(PLATFORM_NAME, destination=event_source_id,
                                       unique=unique, test=test, event_name=event_name,
                                       event_id=event_id)

    return [api, control]


PLATFORM = PlatformSpec(
    name=PLATFORM_NAME,
    build_routers=build_routers,
    fault_kinds=frozenset({"tiktok_error", "throttle", "reject_events"}),
)

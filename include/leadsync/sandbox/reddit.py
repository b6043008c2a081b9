"""Reddit Conversions API v3 emulator: ``POST /api/v3/pixels/{pixel_id}/conversion_events``.

Strict like the other emulators (the facts and what is UNVERIFIED about them are in
:mod:`leadsync.destinations.reddit`). One bad event fails the whole request:

======  =====================================================================================
HTTP    case
======  =====================================================================================
200     accepted: ``{"message": "Successfully processed <n> conversion events."}``
        (UNVERIFIED body; clients must not rely on it)
400     invalid request or events: ``{"error": {"reason": "INVALID_REQUEST", "explanation"},
        "invalid_events": [{"event_index", "error_message"}]}`` naming every bad event
        (RudderStack's recorded shape); nothing is stored
401     missing or unknown bearer token (``error.reason`` ``UNAUTHORIZED``)
403     a pixel the token may not send to (``error.reason`` ``FORBIDDEN``)
429     fault ``throttle`` (``error.reason`` ``TOO_MANY_REQUESTS``)
======  =====================================================================================

Rules: ``event_at`` in **milliseconds**, at most ``reddit_max_age_seconds`` (7 days) old and
5 minutes in the future; ``user.email``, ``phone_number``, ``external_id``, ``ip_address``,
``idfa``, ``aaid`` must be SHA-256 lowercase hex, ``user_agent``, ``uuid`` and ``click_id`` raw;
a ``CUSTOM`` type needs ``custom_event_name``. Dedup: the same type + ``metadata.conversion_id``
within ``dedup_window_seconds`` is a duplicate (stored flagged, still acknowledged).
Requests with ``data.test_id`` are test events.
"""

from __future__ import annotations

import math
import re
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from leadsync.sandbox.app import (
    EventInput,
    PlatformSpec,
    RejectEventsFault,
    SandboxState,
    ThrottleFault,
    post_processing_delay,
    pre_processing_delay,
    pre_processing_response,
)

PLATFORM_NAME = "reddit"
MAX_EVENTS_PER_REQUEST = 1000
MAX_FUTURE_MS = 5 * 60 * 1000

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ANY_CASE_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")

TRACKING_TYPES = frozenset({"PAGE_VISIT", "VIEW_CONTENT", "SEARCH", "ADD_TO_CART",
                            "ADD_TO_WISHLIST", "PURCHASE", "LEAD", "SIGN_UP", "CUSTOM"})
ACTION_SOURCES = frozenset({"WEBSITE", "APP", "PHYSICAL_STORE", "OTHER"})
DATA_KEYS = frozenset({"events", "test_id", "partner"})
EVENT_KEYS = frozenset({"event_at", "action_source", "type", "click_id", "user", "metadata",
                        "event_source_url"})
HASHED_USER_KEYS = frozenset({"email", "phone_number", "external_id", "ip_address", "idfa",
                              "aaid"})
RAW_USER_KEYS = frozenset({"user_agent", "uuid"})
OBJECT_USER_KEYS = frozenset({"data_processing_options", "screen_dimensions"})
METADATA_KEYS = frozenset({"conversion_id", "currency", "value", "item_count", "products"})
_MATCH_KEYS = ("email", "phone_number", "external_id", "idfa", "aaid", "uuid")


class RedditError(Exception):
    """An error answered with Reddit's ``{"error": {"reason", "explanation"}}`` body."""

    def __init__(self, http_status: int, reason: str, explanation: str,
                 invalid_events: list[dict[str, Any]] | None = None) -> None:
        super().__init__(explanation)
        self.http_status = http_status
        self.reason = reason
        self.explanation = explanation
        self.invalid_events = invalid_events

    def response(self) -> JSONResponse:
        """The HTTP response."""
        body: dict[str, Any] = {"error": {"reason": self.reason,
                                          "explanation": self.explanation}}
        if self.invalid_events is not None:
            body["invalid_events"] = self.invalid_events
        return JSONResponse(body, status_code=self.http_status)


def _invalid(explanation: str) -> RedditError:
    return RedditError(400, "INVALID_REQUEST", explanation)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def event_problem(event: Any, now_ms: int, max_age_ms: int) -> str | None:
    """What is wrong with one event, or None."""
    if not isinstance(event, dict):
        return "event must be an object"
    for key in sorted(event):
        if key not in EVENT_KEYS:
            return f"{key}: unknown field"
    event_at = event.get("event_at")
    if not isinstance(event_at, int) or isinstance(event_at, bool):
        return "event_at: required, an integer (Unix milliseconds)"
    if event_at < 10**11:
        return "event_at: must be in milliseconds, not seconds"
    if event_at > now_ms + MAX_FUTURE_MS:
        return "event_at: must not be more than 5 minutes in the future"
    if event_at < now_ms - max_age_ms:
        return "event_at: must be less than 168 hours (7 days) old"
    if event.get("action_source") not in ACTION_SOURCES:
        return "action_source: required, one of WEBSITE, APP, PHYSICAL_STORE, OTHER"
    kind = event.get("type")
    if not isinstance(kind, dict) or kind.get("tracking_type") not in TRACKING_TYPES:
        return "type.tracking_type: required, a Reddit tracking type"
    if set(kind) - {"tracking_type", "custom_event_name"}:
        return "type: unknown field"
    if kind["tracking_type"] == "CUSTOM":
        name = kind.get("custom_event_name")
        if not isinstance(name, str) or not name.strip():
            return "type.custom_event_name: required for CUSTOM"
    elif "custom_event_name" in kind:
        return "type.custom_event_name: only for CUSTOM"
    click = event.get("click_id")
    if click is not None and (not isinstance(click, str) or not click
                              or ANY_CASE_SHA256_RE.match(click)):
        return "click_id: must be the raw click id"
    user = event.get("user", {})
    if not isinstance(user, dict):
        return "user: must be an object"
    for key in sorted(user):
        value = user[key]
        if key in HASHED_USER_KEYS:
            if not isinstance(value, str) or not SHA256_RE.match(value):
                return f"user.{key}: must be SHA-256 hashed (64 lowercase hex characters)"
        elif key in RAW_USER_KEYS:
            if not isinstance(value, str) or not value or ANY_CASE_SHA256_RE.match(value):
                return f"user.{key}: must be sent raw"
        elif key in OBJECT_USER_KEYS:
            if not isinstance(value, dict):
                return f"user.{key}: must be an object"
        else:
            return f"user.{key}: unknown field"
    if not (any(k in user for k in _MATCH_KEYS) or click
            or {"ip_address", "user_agent"} <= set(user)):
        return "user: no match key (email, phone_number, external_id, click_id, or "\
               "ip_address with user_agent)"
    metadata = event.get("metadata", {})
    if not isinstance(metadata, dict):
        return "metadata: must be an object"
    for key in sorted(metadata):
        if key not in METADATA_KEYS:
            return f"metadata.{key}: unknown field"
    conversion_id = metadata.get("conversion_id")
    if conversion_id is not None and (not isinstance(conversion_id, str) or not conversion_id):
        return "metadata.conversion_id: must be a non-empty string"
    if "value" in metadata and not (_is_number(metadata["value"]) and metadata["value"] >= 0):
        return "metadata.value: must be a number >= 0"
    if "currency" in metadata and not (isinstance(metadata["currency"], str)
                                       and CURRENCY_RE.match(metadata["currency"])):
        return "metadata.currency: must be an ISO-4217 code"
    if "value" in metadata and "currency" not in metadata:
        return "metadata.currency: required with value"
    return None


def _dedup_name(event: dict[str, Any]) -> str:
    kind = event["type"]
    return str(kind.get("custom_event_name") or kind["tracking_type"])


async def handle_conversion_events(state: SandboxState, request: Request,
                                   pixel_id: str) -> Response:
    """Handles one ``POST /api/v3/pixels/{pixel_id}/conversion_events``."""
    store = state.store
    fault = state.take_fault(PLATFORM_NAME)
    replaced = pre_processing_response(fault)
    if replaced is None and isinstance(fault, ThrottleFault):
        replaced = RedditError(fault.http_status or 429, "TOO_MANY_REQUESTS",
                               "Rate limit exceeded; retry later.").response()
    if replaced is not None:
        store.count_request(PLATFORM_NAME, "rejected", faulted=True)
        return replaced
    await pre_processing_delay(fault)
    try:
        auth = request.headers.get("authorization") or ""
        token = auth[7:] if auth[:7].lower() == "bearer " else ""
        if token not in state.config.reddit_tokens:
            raise RedditError(401, "UNAUTHORIZED", "Authorization Required: the bearer token "
                              "is missing or not valid")
        if pixel_id not in state.config.reddit_pixels:
            raise RedditError(403, "FORBIDDEN", f"no access to pixel {pixel_id}")
        try:
            body = await request.json()
        except ValueError:
            raise _invalid("request body is not valid JSON") from None
        data = body.get("data") if isinstance(body, dict) and set(body) == {"data"} else None
        if not isinstance(data, dict) or set(data) - DATA_KEYS:
            raise _invalid("body must be {\"data\": {\"events\", \"test_id\"?, \"partner\"?}}")
        events = data.get("events")
        if not isinstance(events, list) or not events:
            raise _invalid("data.events: required, a non-empty array")
        if len(events) > MAX_EVENTS_PER_REQUEST:
            raise _invalid(f"data.events: at most {MAX_EVENTS_PER_REQUEST} events")
        test_id = data.get("test_id")
        if test_id is not None and not (isinstance(test_id, str) and test_id.strip()):
            raise _invalid("data.test_id: must be a non-empty string")
        now = state.now()
        now_ms = int(now * 1000)
        max_age_ms = state.config.reddit_max_age_seconds * 1000
        invalid = []
        for index, event in enumerate(events):
            problem = event_problem(event, now_ms, max_age_ms)
            if problem is None and isinstance(fault, RejectEventsFault) and fault.matches(
                    index, (event.get("metadata") or {}).get("conversion_id")):
                problem = fault.reason or "rejected by the sandbox (fault injection)"
            if problem is not None:
                invalid.append({"event_index": index, "error_message": problem})
        if invalid:
            raise RedditError(400, "INVALID_REQUEST",
                              f"{len(invalid)} of {len(events)} events are invalid", invalid)
    except RedditError as exc:
        store.count_request(PLATFORM_NAME, "rejected")
        response: Response = exc.response()
    else:
        store.record_events(
            PLATFORM_NAME, pixel_id,
            [EventInput(_dedup_name(e), (e.get("metadata") or {}).get("conversion_id"),
                        e["event_at"] // 1000, e) for e in events],
            received_at=now,
            dedup_window_seconds=state.config.dedup_window_seconds,
            test_event_code=test_id,
        )
        store.count_request(PLATFORM_NAME, "accepted")
        response = JSONResponse(
            {"message": f"Successfully processed {len(events)} conversion events."})
    await post_processing_delay(fault)
    return response


def build_routers(state: SandboxState) -> list[APIRouter]:
    """The Reddit API router and its control routes."""
    api = APIRouter(tags=["reddit"])

    @api.post("/api/v3/pixels/{pixel_id}/conversion_events")
    async def conversion_events(request: Request, pixel_id: str) -> Response:
        """Reddit Conversions API v3: send conversion events."""
        return await handle_conversion_events(state, request, pixel_id)

    control = APIRouter(prefix="/_sandbox/reddit", tags=["sandbox control"])

    @control.get("/events")
    def list_events(
        pixel_id: str | None = None,
        unique: bool = False,
        test: bool = Query(False, description="true: only test events; false: only live events"),
        event_name: str | None = None,
        event_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored Reddit events in receive order (``event_id`` is ``metadata.conversion_id``,
        ``event_name`` the tracking type or custom event name)."""
        return state.store.list_events(PLATFORM_NAME, destination=pixel_id, unique=unique,
                                       test=test, event_name=event_name, event_id=event_id)

    return [api, control]


PLATFORM = PlatformSpec(
    name=PLATFORM_NAME,
    build_routers=build_routers,
    fault_kinds=frozenset({"throttle", "reject_events"}),
)

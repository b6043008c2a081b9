"""Snap Conversions API v3 emulator: ``POST /v3/{pixel_id}/events`` and ``/events/validate``.

Strict like the other emulators (sources in :mod:`leadsync.destinations.snapchat`). The token
comes as ``Authorization: Bearer <token>`` or as the ``access_token`` query parameter of Snap's
examples. Responses follow Snap's SDK (``EventResponse``/``ValidateResponse``):

======  =======================================================================================
status  case
======  =======================================================================================
200     ``{"status": "VALID", "reason": ...}`` (``/validate``: also ``test_event`` and
        ``event_logs``; its events are stored as test events)
400     ``{"status": "INVALID", "reason", "event": <index>, "errors": {"codes", "error_msgs"}}``:
        the WHOLE request is rejected, naming its first bad event
401     missing or unknown token
403     a pixel the token cannot send to
429     throttled (fault ``throttle``)
======  =======================================================================================

Events: ``event_name`` one of Snap's standard names, ``event_time`` Unix **seconds** no older
than ``snapchat_max_age_seconds`` and not in the future, ``action_source`` (``WEB``,
``MOBILE_APP``, ``OFFLINE`` or Snap's lower-case aliases), ``event_id``; ``WEB`` events need
``event_source_url``; ``user_data`` hashed keys (``em``, ``ph``, ``fn``, ``ln``, ``ge``, ``ct``,
``st``, ``zp``, ``country``, ``db``, ``external_id``) as 64-lowercase-hex strings or lists of
them, raw keys (``client_ip_address``, ``client_user_agent``, ``sc_click_id``, ``sc_cookie1``,
``madid``, ``idfv``) never hashed; at least ``em``, ``ph``, ``madid`` or IP + user agent
("Insufficient PII"); a ``PURCHASE`` needs ``custom_data.value`` and ``currency``. Dedup: same
event name + ``event_id`` within ``dedup_window_seconds`` (stored flagged, still VALID).
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any, TypeGuard

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from leadsync.config import SNAPCHAT_EVENT_NAMES
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

PLATFORM_NAME = "snapchat"
MAX_EVENTS = 2000

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ANY_CASE_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
CURRENCY_RE = re.compile(r"^[A-Za-z]{3}$")
ACTION_SOURCES = frozenset({"WEB", "MOBILE_APP", "OFFLINE", "website", "app", "physical_store",
                            "phone_call", "email", "chat", "system_generated", "other"})
EVENT_KEYS = frozenset({"event_name", "event_time", "event_id", "action_source",
                        "event_source_url", "user_data", "custom_data", "app_data",
                        "data_processing_options", "data_processing_options_country",
                        "data_processing_options_state", "integration", "opt_out"})
HASHED_USER_KEYS = frozenset({"em", "ph", "fn", "ln", "ge", "ct", "st", "zp", "country", "db",
                              "external_id"})
RAW_USER_KEYS = frozenset({"client_ip_address", "client_user_agent", "sc_click_id",
                           "sc_cookie1", "madid", "mobile_ad_id", "idfv", "lead_id",
                           "subscription_id"})
CUSTOM_KEYS = frozenset({"value", "currency", "content_ids", "content_category", "contents",
                         "num_items", "order_id", "search_string", "sign_up_method", "brands",
                         "status", "content_type"})


class SnapError(Exception):
    """An error answered with Snap's ``INVALID`` body."""

    def __init__(self, http_status: int, reason: str, *, event: int | None = None,
                 code: str = "INVALID_PARAMETER") -> None:
        super().__init__(reason)
        self.http_status = http_status
        self.reason = reason
        self.event = event
        self.code = code

    def response(self) -> JSONResponse:
        """The HTTP response."""
        body: dict[str, Any] = {"status": "INVALID", "reason": self.reason,
                                "errors": {"codes": [self.code], "error_msgs": [self.reason]}}
        if self.event is not None:
            body["event"] = self.event
        return JSONResponse(body, status_code=self.http_status)


class _Invalid(Exception):
    def __init__(self, path: str, problem: str, code: str = "INVALID_PARAMETER") -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem
        self.code = code


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_user(user: Any) -> None:
    if not isinstance(user, dict):
        raise _Invalid("user_data", "must be an object", "INSUFFICIENT_PII")
    for key in sorted(user):
        value = user[key]
        path = f"user_data.{key}"
        if key not in HASHED_USER_KEYS | RAW_USER_KEYS:
            raise _Invalid(path, "unknown parameter")
        if key in HASHED_USER_KEYS:
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str) and SHA256_RE.match(v) for v in values):
                raise _Invalid(path, "Unhashed PII: must be SHA-256 hex (64 lowercase hex "
                               "characters), or a list of them", "UNHASHED_PII")
        else:
            if not isinstance(value, str) or not value:
                raise _Invalid(path, "must be a non-empty string")
            if ANY_CASE_SHA256_RE.match(value):
                raise _Invalid(path, "must be sent raw, not hashed")
            if key == "client_ip_address":
                try:
                    ipaddress.ip_address(value)
                except ValueError:
                    raise _Invalid(path, "not a valid IP address") from None
    has_device = "madid" in user or "mobile_ad_id" in user
    if not ({"em", "ph"} & set(user) or has_device
            or {"client_ip_address", "client_user_agent"} <= set(user)):
        raise _Invalid("user_data", "Insufficient PII: em, ph, madid, or client_ip_address with "
                       "client_user_agent is required", "INSUFFICIENT_PII")


def _check_custom(custom: Any, event_name: str) -> None:
    if custom is None:
        custom = {}
    if not isinstance(custom, dict):
        raise _Invalid("custom_data", "must be an object")
    for key in sorted(custom):
        if key not in CUSTOM_KEYS:
            raise _Invalid(f"custom_data.{key}", "unknown parameter")
    value = custom.get("value")
    if value is not None:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number) or number < 0:
            raise _Invalid("custom_data.value", "must be a number >= 0")
    currency = custom.get("currency")
    if currency is not None and not (isinstance(currency, str) and CURRENCY_RE.match(currency)):
        raise _Invalid("custom_data.currency", "must be an ISO 4217 code")
    if event_name == "PURCHASE" and (value is None or currency is None):
        raise _Invalid("custom_data", "Missing price and/or currency in Purchase events",
                       "MISSING_PRICE_OR_CURRENCY")


def validate_event(event: Any, *, now: float, max_age: int, max_future: int) -> None:
    """Validates one ``data[]`` event; raises :class:`_Invalid` with a path."""
    if not isinstance(event, dict):
        raise _Invalid("", "must be an object")
    for key in sorted(event):
        if key not in EVENT_KEYS:
            raise _Invalid(key, "unknown parameter")
    name = event.get("event_name")
    if not isinstance(name, str) or name not in SNAPCHAT_EVENT_NAMES:
        raise _Invalid("event_name", "required: one of Snap's standard event names")
    event_time = event.get("event_time")
    if not _is_int(event_time):
        raise _Invalid("event_time", "required: Unix seconds (integer)", "INVALID_TIMESTAMP")
    if event_time > 10**11:
        raise _Invalid("event_time", "Timestamp invalid or out of range: seconds, not "
                       "milliseconds", "INVALID_TIMESTAMP")
    if event_time - now > max_future or now - event_time > max_age:
        raise _Invalid("event_time", "Timestamp invalid or out of range", "INVALID_TIMESTAMP")
    source = event.get("action_source")
    if source not in ACTION_SOURCES:
        raise _Invalid("action_source", f"required: one of {', '.join(sorted(ACTION_SOURCES))}")
    if "event_id" in event and not (isinstance(event["event_id"], str) and event["event_id"]):
        raise _Invalid("event_id", "must be a non-empty string")
    url = event.get("event_source_url")
    if source in ("WEB", "website") and not (isinstance(url, str) and url):
        raise _Invalid("event_source_url", "required for WEB events")
    if "user_data" not in event:
        raise _Invalid("user_data", "Insufficient PII: user_data is required", "INSUFFICIENT_PII")
    _check_user(event["user_data"])
    _check_custom(event.get("custom_data"), name)
    options = event.get("data_processing_options")
    if options is not None and not (isinstance(options, list)
                                    and all(isinstance(o, str) for o in options)):
        raise _Invalid("data_processing_options", "must be a list of strings")


def _token(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:]
    return request.query_params.get("access_token", "")


def validate_request(body: Any, state: SandboxState) -> list[dict[str, Any]]:
    """Validates the request body; returns its events or raises :class:`SnapError`."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise SnapError(400, "The request body must be {\"data\": [...]}")
    for key in sorted(body):
        if key != "data":
            raise SnapError(400, f"{key}: unknown parameter")
    data = body["data"]
    if not data or len(data) > MAX_EVENTS:
        raise SnapError(400, f"data must hold 1 to {MAX_EVENTS} events")
    now = state.now()
    for index, event in enumerate(data):
        try:
            validate_event(event, now=now, max_age=state.config.snapchat_max_age_seconds,
                           max_future=state.config.max_future_seconds)
        except _Invalid as exc:
            where = f"data[{index}].{exc.path}" if exc.path else f"data[{index}]"
            raise SnapError(400, f"{where}: {exc.problem}", event=index,
                            code=exc.code) from None
    return data


def _fault_error(fault: Any) -> SnapError | None:
    if isinstance(fault, ThrottleFault):
        return SnapError(fault.http_status or 429, "Too many requests", code="RATE_LIMITED")
    return None


async def handle_events(state: SandboxState, request: Request, pixel_id: str,
                        validate_only: bool) -> Response:
    """Handles one ``POST /v3/{pixel_id}/events`` (or ``/events/validate``)."""
    store = state.store
    fault = state.take_fault(PLATFORM_NAME)
    replaced = pre_processing_response(fault)
    error = _fault_error(fault)
    if replaced is not None or error is not None:
        store.count_request(PLATFORM_NAME, "rejected", faulted=True)
        return replaced if replaced is not None else error.response()  # type: ignore[union-attr]
    await pre_processing_delay(fault)
    try:
        token = _token(request)
        if not token or token not in state.config.snapchat_tokens:
            raise SnapError(401, "Unauthorized: missing or invalid access token",
                            code="UNAUTHORIZED")
        if pixel_id not in state.config.snapchat_pixels:
            raise SnapError(403, f"The access token cannot send events to asset {pixel_id}",
                            code="FORBIDDEN")
        try:
            body = await request.json()
        except ValueError:
            raise SnapError(400, "The request body is not valid JSON") from None
        events = validate_request(body, state)
        if isinstance(fault, RejectEventsFault):
            for index, event in enumerate(events):
                if fault.matches(index, event.get("event_id")):
                    reason = fault.reason or "rejected by the sandbox (fault injection)"
                    raise SnapError(400, f"data[{index}].event_id: {reason}", event=index)
    except SnapError as exc:
        store.count_request(PLATFORM_NAME, "rejected")
        response: Response = exc.response()
    else:
        store.record_events(
            PLATFORM_NAME,
            pixel_id,
            [EventInput(e["event_name"], e.get("event_id"), e["event_time"], e) for e in events],
            received_at=state.now(),
            dedup_window_seconds=state.config.dedup_window_seconds,
            test_event_code="validate" if validate_only else None,
        )
        store.count_request(PLATFORM_NAME, "accepted")
        if validate_only:
            response = JSONResponse({
                "status": "VALID", "test_event": True, "reason": "Test events validated",
                "event_logs": [{"event": i, "status": "VALID", "warnings": []}
                               for i in range(len(events))]})
        else:
            response = JSONResponse({"status": "VALID",
                                     "reason": f"{len(events)} event(s) processed"})
    await post_processing_delay(fault)
    return response


def build_routers(state: SandboxState) -> list[APIRouter]:
    """The Snap API router and its control routes."""
    api = APIRouter(tags=["snapchat"])

    @api.post("/v3/{pixel_id}/events")
    async def events(pixel_id: str, request: Request) -> Response:
        """Snap Conversions API v3: web, app and offline events for a pixel or app."""
        return await handle_events(state, request, pixel_id, validate_only=False)

    @api.post("/v3/{pixel_id}/events/validate")
    async def validate(pixel_id: str, request: Request) -> Response:
        """Snap's Test Event tool: validates the events, stores them as test events."""
        return await handle_events(state, request, pixel_id, validate_only=True)

    control = APIRouter(prefix="/_sandbox/snapchat", tags=["sandbox control"])

    @control.get("/events")
    def list_events(
        pixel_id: str | None = None,
        unique: bool = False,
        test: bool = Query(False, description="true: only /validate events"),
        event_name: str | None = None,
        event_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored Snap events in receive order (``destination`` is the pixel id)."""
        return state.store.list_events(PLATFORM_NAME, destination=pixel_id, unique=unique,
                                       test=test, event_name=event_name, event_id=event_id)

    return [api, control]


PLATFORM = PlatformSpec(
    name=PLATFORM_NAME,
    build_routers=build_routers,
    fault_kinds=frozenset({"throttle", "reject_events"}),
)

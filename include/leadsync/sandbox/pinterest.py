"""Pinterest Conversions API v5 emulator: ``POST /v5/ad_accounts/{ad_account_id}/events``.

Strict like the other emulators: a payload it accepts should be one Pinterest accepts (the
facts are in :mod:`leadsync.destinations.pinterest`, from Pinterest's OpenAPI description).

======  =====================================================================================
HTTP    case
======  =====================================================================================
200     every event processed: ``{num_events_received, num_events_processed, events: [{status:
        "processed", error_message, warning_message}]}`` in request order
400     the request does not match the schema (``{"code": 4196, "message": ...}`` naming the
        first bad field as ``data[<i>].<path>``): nothing is stored
401     missing or unknown bearer token (code 2, "Authentication failed.")
403     an ad account the token may not use (code 29)
422     some events failed (hashing, minimum user data, future time, fault ``reject_events``):
        ``{"code", "message": "Not all events were successfully processed.", "details": <the
        200 body>}``; the processed ones are stored. UNVERIFIED shape: Pinterest documents a
        422 ``DetailedError {code, message, details}`` without describing ``details``
429     fault ``throttle`` (code 8)
======  =====================================================================================

Dedup: Pinterest deduplicates tag and API events by ``event_id`` but "events that took place
offline cannot be deduplicated": ``action_source`` ``offline`` events are never flagged as
duplicates here, so a resend shows up as a second unique event. ``?test=true`` requests are
stored as test events. The event age is not checked (Pinterest documents no limit).
"""

from __future__ import annotations

import ipaddress
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

PLATFORM_NAME = "pinterest"
MAX_EVENTS_PER_REQUEST = 1000

CODE_AUTH_FAILED = 2
CODE_RATE_LIMITED = 8
CODE_NOT_PERMITTED = 29
CODE_INVALID = 4196

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ANY_CASE_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
DECIMAL_RE = re.compile(r"^\d+(\.\d+)?$")

EVENT_NAMES = frozenset({
    "add_payment_info", "add_to_cart", "add_to_wishlist", "app_install", "checkout", "custom",
    "initiate_checkout", "lead", "page_visit", "search", "signup", "subscribe",
    "view_category", "view_content", "watch_video",
})
ACTION_SOURCES = frozenset({"app_android", "app_ios", "web", "offline"})
EVENT_KEYS = frozenset({"event_name", "action_source", "event_time", "event_id", "user_data",
                        "custom_data", "event_source_url", "opt_out", "partner_name",
                        "app_id", "app_name", "app_version", "device_brand", "device_carrier",
                        "device_model", "device_type", "os_version", "wifi", "language",
                        "app_info", "device_info"})
REQUIRED_EVENT_KEYS = ("event_name", "action_source", "event_time", "event_id", "user_data")
HASHED_USER_KEYS = frozenset({"em", "hashed_maids", "ph", "ge", "db", "ln", "fn", "ct", "st",
                              "zp", "country", "external_id"})
RAW_USER_KEYS = frozenset({"client_ip_address", "client_user_agent", "click_id",
                           "partner_id"})
CUSTOM_KEYS = frozenset({"content_brand", "content_category", "content_ids", "content_name",
                         "contents", "currency", "external_measurement_id",
                         "external_measurement_vendor_id", "np", "num_items", "opt_out_type",
                         "order_id", "predicted_ltv", "search_string", "value"})


class PinterestError(Exception):
    """An error answered with Pinterest's ``{"code", "message"}`` body."""

    def __init__(self, http_status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message

    def response(self) -> JSONResponse:
        """The HTTP response."""
        return JSONResponse({"code": self.code, "message": self.message},
                            status_code=self.http_status)


def _invalid(path: str, problem: str) -> PinterestError:
    return PinterestError(400, CODE_INVALID, f"{path}: {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_schema(index: int, event: Any) -> None:
    """Schema rules (``additionalProperties: false``, required keys, types): a violation
    rejects the whole request with HTTP 400."""
    where = f"data[{index}]"
    if not isinstance(event, dict):
        raise _invalid(where, "must be an object")
    for key in sorted(event):
        if key not in EVENT_KEYS:
            raise _invalid(f"{where}.{key}", "unknown property")
    for key in REQUIRED_EVENT_KEYS:
        if key not in event:
            raise _invalid(f"{where}.{key}", "is required")
    for key in ("event_name", "action_source", "event_id"):
        if not isinstance(event[key], str) or not event[key]:
            raise _invalid(f"{where}.{key}", "must be a non-empty string")
    if not _is_int(event["event_time"]):
        raise _invalid(f"{where}.event_time", "must be an integer (Unix seconds)")
    user = event["user_data"]
    if not isinstance(user, dict):
        raise _invalid(f"{where}.user_data", "must be an object")
    for key in sorted(user):
        value = user[key]
        path = f"{where}.user_data.{key}"
        if key in HASHED_USER_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _invalid(path, "must be an array of strings")
        elif key in RAW_USER_KEYS:
            if not isinstance(value, str):
                raise _invalid(path, "must be a string")
        else:
            raise _invalid(path, "unknown property")
    custom = event.get("custom_data")
    if custom is not None:
        if not isinstance(custom, dict):
            raise _invalid(f"{where}.custom_data", "must be an object")
        for key in sorted(custom):
            if key not in CUSTOM_KEYS:
                raise _invalid(f"{where}.custom_data.{key}", "unknown property")
        for key in ("value", "currency", "order_id", "predicted_ltv"):
            if key in custom and custom[key] is not None and not isinstance(custom[key], str):
                raise _invalid(f"{where}.custom_data.{key}", "must be a string")


def event_problem(event: dict[str, Any], now: float, max_future: int) -> str | None:
    """Processing rules: a violation fails that event only (``status: failed``)."""
    if event["event_name"] not in EVENT_NAMES:
        return f"event_name {event['event_name']!r} is not a supported event type"
    if event["action_source"] not in ACTION_SOURCES:
        return f"action_source {event['action_source']!r} is not one of app_android, app_ios, "\
               "web, offline"
    event_time = event["event_time"]
    if event_time > 10**11:
        return "event_time must be a Unix timestamp in seconds, not milliseconds"
    if event_time - now > max_future:
        return "event_time is in the future"
    user = event["user_data"]
    for key in sorted(HASHED_USER_KEYS & set(user)):
        for item in user[key]:
            if not SHA256_RE.match(item):
                return f"user_data.{key} must be SHA-256 hashes (64 lowercase hex characters)"
    for key in ("client_ip_address", "client_user_agent", "click_id"):
        if key in user and ANY_CASE_SHA256_RE.match(user[key]):
            return f"user_data.{key} must be sent raw, not hashed"
    if "client_ip_address" in user:
        try:
            ipaddress.ip_address(user["client_ip_address"])
        except ValueError:
            return "user_data.client_ip_address is not an IPv4 or IPv6 address"
    if not (user.get("em") or user.get("hashed_maids")
            or (user.get("client_ip_address") and user.get("client_user_agent"))):
        return ("user_data requires at least one of em, hashed_maids, or client_ip_address "
                "with client_user_agent")
    custom = event.get("custom_data") or {}
    if custom.get("value") is not None:
        if not DECIMAL_RE.match(custom["value"]) or not math.isfinite(float(custom["value"])):
            return "custom_data.value must be a decimal number as a string"
    if custom.get("currency") is not None and not CURRENCY_RE.match(custom["currency"]):
        return "custom_data.currency must be an ISO-4217 code"
    return None


def _result(events: list[Any], failed: dict[int, str]) -> dict[str, Any]:
    return {
        "num_events_received": len(events),
        "num_events_processed": len(events) - len(failed),
        "events": [
            {"status": "failed", "error_message": failed[i], "warning_message": None}
            if i in failed else
            {"status": "processed", "error_message": None, "warning_message": None}
            for i in range(len(events))
        ],
    }


async def handle_events(state: SandboxState, request: Request, ad_account_id: str,
                        test: bool) -> Response:
    """Handles one ``POST /v5/ad_accounts/{ad_account_id}/events``."""
    store = state.store
    fault = state.take_fault(PLATFORM_NAME)
    replaced = pre_processing_response(fault)
    if replaced is None and isinstance(fault, ThrottleFault):
        replaced = PinterestError(
            fault.http_status or 429, CODE_RATE_LIMITED,
            "This request exceeded a rate limit. This can happen if the client exceeds one of "
            "the published rate limits within a short time window.").response()
    if replaced is not None:
        store.count_request(PLATFORM_NAME, "rejected", faulted=True)
        return replaced
    await pre_processing_delay(fault)
    try:
        auth = request.headers.get("authorization") or ""
        token = auth[7:] if auth[:7].lower() == "bearer " else ""
        if token not in state.config.pinterest_tokens:
            raise PinterestError(401, CODE_AUTH_FAILED, "Authentication failed.")
        if ad_account_id not in state.config.pinterest_ad_accounts:
            raise PinterestError(403, CODE_NOT_PERMITTED,
                                 "You are not permitted to access that resource.")
        try:
            body = await request.json()
        except ValueError:
            raise _invalid("body", "is not valid JSON") from None
        if not isinstance(body, dict) or set(body) != {"data"}:
            raise _invalid("body", "must be an object with only 'data'")
        events = body["data"]
        if not isinstance(events, list) or not events:
            raise _invalid("data", "must be a non-empty array")
        if len(events) > MAX_EVENTS_PER_REQUEST:
            raise _invalid("data", f"must have at most {MAX_EVENTS_PER_REQUEST} items")
        for index, event in enumerate(events):
            check_schema(index, event)
    except PinterestError as exc:
        store.count_request(PLATFORM_NAME, "rejected")
        response: Response = exc.response()
        await post_processing_delay(fault)
        return response
    now = state.now()
    failed: dict[int, str] = {}
    for index, event in enumerate(events):
        problem = event_problem(event, now, state.config.max_future_seconds)
        if problem is None and isinstance(fault, RejectEventsFault) and fault.matches(
                index, event.get("event_id")):
            problem = fault.reason or "rejected by the sandbox (fault injection)"
        if problem is not None:
            failed[index] = problem
    accepted = [e for i, e in enumerate(events) if i not in failed]
    test_code = "test" if test else None
    # Offline events cannot be deduplicated (Pinterest's words): a window of zero.
    for offline in (True, False):
        batch = [e for e in accepted if (e["action_source"] == "offline") is offline]
        if batch:
            store.record_events(
                PLATFORM_NAME, ad_account_id,
                [EventInput(e["event_name"], e["event_id"], e["event_time"], e) for e in batch],
                received_at=now,
                dedup_window_seconds=0 if offline else state.config.dedup_window_seconds,
                test_event_code=test_code,
            )
    result = _result(events, failed)
    if failed:
        store.count_request(PLATFORM_NAME, "rejected" if not accepted else "accepted")
        response = JSONResponse({"code": CODE_INVALID,
                                 "message": "Not all events were successfully processed.",
                                 "details": result}, status_code=422)
    else:
        store.count_request(PLATFORM_NAME, "accepted")
        response = JSONResponse(result)
    await post_processing_delay(fault)
    return response


def build_routers(state: SandboxState) -> list[APIRouter]:
    """The Pinterest API router and its control routes."""
    api = APIRouter(tags=["pinterest"])

    @api.post("/v5/ad_accounts/{ad_account_id}/events")
    async def events(request: Request, ad_account_id: str,
                     test: bool = Query(False)) -> Response:
        """Pinterest Conversions API: send conversion events."""
        return await handle_events(state, request, ad_account_id, test)

    control = APIRouter(prefix="/_sandbox/pinterest", tags=["sandbox control"])

    @control.get("/events")
    def list_events(
        ad_account_id: str | None = None,
        unique: bool = False,
        test: bool = Query(False, description="true: only test events; false: only live events"),
        event_name: str | None = None,
        event_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored Pinterest events in receive order (``destination`` is the ad account)."""
        return state.store.list_events(PLATFORM_NAME, destination=ad_account_id,
                                       unique=unique, test=test, event_name=event_name,
                                       event_id=event_id)

    return [api, control]


PLATFORM = PlatformSpec(
    name=PLATFORM_NAME,
    build_routers=build_routers,
    fault_kinds=frozenset({"throttle", "reject_events"}),
)

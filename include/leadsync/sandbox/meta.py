"""Meta Conversions API emulator: ``POST /{version}/{pixel_id}/events``.

Validation is strict on purpose: a payload this emulator accepts should be one Meta accepts
(``docs/platforms.md`` §1). Any invalid event rejects the WHOLE request, as Meta does, with
the Graph error envelope and HTTP 400::

    {"error": {"message", "type", "code", "error_subcode", "is_transient", "error_user_title",
               "error_user_msg", "fbtrace_id"}}

Per-event errors name the event and field at the start of ``error_user_msg`` as
``data[<index>].<field path>: <problem>`` (e.g. ``data[3].user_data.em[0]: ...``); only the first
invalid event (in index order) is reported. A client isolates bad events by matching
``data\\[(\\d+)\\]``.

Error codes. Sourced from docs/platforms.md §1: 190 (bad token), 100/33 (unknown pixel), 100/2804003
(event too old), 100/2804009 (Purchase without value/currency), throttling codes 4/17/80003.
Sandbox choices (Meta's exact subcodes for these cases are UNVERIFIED; clients should key on
``code``, ``is_transient`` and the ``data[i]`` prefix, not on these subcodes):

==========  =============================================================
subcode     case
==========  =============================================================
2804001     invalid event parameter (type, format, enum, unknown key, ...)
2804004     event_time too far in the future
2804050     not enough customer information in user_data
None        request-level problems (``data`` missing / not a list / empty /
            more than 1,000 events / undecodable body); code 100
None        malformed API version in the path; code 2500
==========  =============================================================

Throttling (fault ``throttle``): Graph reports throttling as an error *code* (4, 17, 32, 613,
80003), not as a documented HTTP 429; the emulator answers **HTTP 400** with
``is_transient: true`` by default (pass ``http_status`` in the fault, e.g. 429 or 403, to test
the client against other statuses). Meta's real HTTP status for throttling is UNVERIFIED.

Accepted body encodings: JSON (``{"data": [...], "access_token", "test_event_code"}``) and
form (``application/x-www-form-urlencoded`` or ``multipart/form-data``) where ``data`` is a JSON
string. Like the official SDK, ``data`` may be a JSON *string* and each element may itself be a
JSON string of the event object. The token is taken from the ``access_token`` query parameter,
then the body's ``access_token``, then ``Authorization: Bearer``.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import secrets
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from leadsync.sandbox.app import (
    EventInput,
    GraphErrorFault,
    PlatformSpec,
    RejectEventsFault,
    SandboxState,
    ThrottleFault,
    post_processing_delay,
    pre_processing_delay,
    pre_processing_response,
)

PLATFORM_NAME = "meta"

MAX_EVENTS_PER_REQUEST = 1000

VERSION_RE = re.compile(r"^v\d+\.\d+$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ANY_CASE_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
LEAD_ID_RE = re.compile(r"^\d{15,17}$")
FBC_RE = re.compile(r"^fb\.\d+\.\d+\..+$")
FBP_RE = re.compile(r"^fb\.\d+\.\d+\..+$")
CURRENCY_RE = re.compile(r"^[A-Za-z]{3}$")
URL_RE = re.compile(r"^https?://[^\s/]+\S*$")

SUBCODE_PIXEL = 33
SUBCODE_INVALID_PARAMETER = 2804001
SUBCODE_TOO_OLD = 2804003
SUBCODE_TOO_FAR_IN_FUTURE = 2804004
SUBCODE_MISSING_PURCHASE_VALUE = 2804009
SUBCODE_MISSING_USER_DATA = 2804050

ACTION_SOURCES = frozenset(
    {
        "email",
        "website",
        "app",
        "phone_call",
        "chat",
        "physical_store",
        "system_generated",
        "business_messaging",
        "other",
    }
)

EVENT_KEYS = frozenset(
    {
        "event_name",
        "event_time",
        "event_id",
        "action_source",
        "user_data",
        "custom_data",
        "event_source_url",
        "opt_out",
        "referrer_url",
        "app_data",
        "data_processing_options",
        "data_processing_options_country",
        "data_processing_options_state",
        "advanced_measurement_table",
        "messaging_channel",
        "original_event_data",
        "attribution_data",
    }
)

#: user_data keys Meta wants SHA-256 hashed (lowercase hex); a string or a list of strings.
HASHED_USER_KEYS = frozenset(
    {
        "em",
        "ph",
        "fn",
        "ln",
        "db",
        "ge",
        "ct",
        "st",
        "zp",
        "country",
        "external_id",
        "f5first",
        "f5last",
        "fi",
        "dobd",
        "dobm",
        "doby",
    }
)

#: user_data keys Meta wants raw (never hashed).
RAW_USER_KEYS = frozenset(
    {
        "client_ip_address",
        "client_user_agent",
        "fbc",
        "fbp",
        "subscription_id",
        "fb_login_id",
        "lead_id",
        "madid",
        "anon_id",
        "ctwa_clid",
        "page_id",
    }
)

USER_DATA_KEYS = HASHED_USER_KEYS | RAW_USER_KEYS

#: Keys that identify a person on their own; IP and user agent only count together.
_MATCH_KEYS = USER_DATA_KEYS - {"client_ip_address", "client_user_agent", "page_id"}

#: Raw keys that may be sent as JSON numbers as well as strings (numeric ids).
_NUMERIC_ID_KEYS = frozenset({"lead_id", "fb_login_id", "page_id", "subscription_id"})

_CUSTOM_STRING_KEYS = (
    "content_name",
    "content_category",
    "content_type",
    "order_id",
    "status",
    "search_string",
    "item_number",
)
_CUSTOM_NUMBER_KEYS = ("value", "net_revenue", "predicted_ltv")
_DELIVERY_CATEGORIES = frozenset({"in_store", "curbside", "home_delivery"})

#: Request-level parameters Graph knows for this edge (others are ignored, as Graph does).
REQUEST_PARAMS = frozenset(
    {
        "data",
        "access_token",
        "test_event_code",
        "namespace_id",
        "upload_id",
        "upload_tag",
        "upload_source",
        "partner_agent",
        "appsecret_proof",
    }
)

_THROTTLE_MESSAGES = {
    4: "(#4) Application request limit reached",
    17: "(#17) User request limit reached",
    32: "(#32) Page request limit reached",
    613: "(#613) Calls to this api have exceeded the rate limit.",
    80003: "(#80003) There have been too many calls to this ad-account. Wait a bit and try again.",
}

_GRAPH_ERROR_MESSAGES = {
    1: "An unknown error occurred",
    2: "An unexpected error has occurred. Please retry your request later.",
}


def new_fbtrace_id() -> str:
    """Returns a random trace id shaped like Graph's ``fbtrace_id``."""
    return "A" + secrets.token_urlsafe(16)


class GraphError(Exception):
    """A Graph API error to answer with the Graph error envelope."""

    def __init__(
        self,
        message: str,
        *,
        code: int,
        subcode: int | None = None,
        type_: str = "OAuthException",
        title: str = "",
        user_msg: str = "",
        is_transient: bool = False,
        http_status: int = 400,
    ) -> None:
        """Creates the error.

        Args:
            message: ``error.message``.
            code: ``error.code``.
            subcode: ``error.error_subcode`` (``None`` when Graph sends none).
            type_: ``error.type``.
            title: ``error.error_user_title``.
            user_msg: ``error.error_user_msg``.
            is_transient: ``error.is_transient``.
            http_status: HTTP status of the response.
        """
        super().__init__(message)
        self.message = message
        self.code = code
        self.subcode = subcode
        self.type = type_
        self.title = title
        self.user_msg = user_msg
        self.is_transient = is_transient
        self.http_status = http_status

    def envelope(self) -> dict[str, Any]:
        """Returns the Graph error envelope."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "error_subcode": self.subcode,
                "is_transient": self.is_transient,
                "error_user_title": self.title,
                "error_user_msg": self.user_msg,
                "fbtrace_id": new_fbtrace_id(),
            }
        }

    def response(self) -> JSONResponse:
        """Returns the HTTP response carrying the envelope."""
        return JSONResponse(self.envelope(), status_code=self.http_status)


class _Invalid(Exception):
    """An invalid field inside one event (wrapped into a GraphError with the event index)."""

    def __init__(
        self,
        path: str,
        problem: str,
        *,
        subcode: int = SUBCODE_INVALID_PARAMETER,
        title: str = "Invalid Parameter",
    ) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem
        self.subcode = subcode
        self.title = title


def _invalid_request(user_msg: str, title: str = "Invalid Parameter") -> GraphError:
    return GraphError("Invalid parameter", code=100, title=title, user_msg=user_msg)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_hashed(key: str, value: Any) -> None:
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise _Invalid(f"user_data.{key}", "must not be an empty list")
    for position, item in enumerate(values):
        path = f"user_data.{key}[{position}]" if isinstance(value, list) else f"user_data.{key}"
        if not isinstance(item, str):
            raise _Invalid(path, "must be a string (or a list of strings)")
        if not SHA256_RE.match(item):
            raise _Invalid(
                path,
                "must be hashed with SHA-256 (64 lowercase hexadecimal characters); "
                "normalize then hash before sending",
            )


def _check_raw(key: str, value: Any) -> None:
    path = f"user_data.{key}"
    if key in _NUMERIC_ID_KEYS and _is_int(value):
        value = str(value)
    if not isinstance(value, str):
        raise _Invalid(path, "must be a string")
    if not value.strip():
        raise _Invalid(path, "must not be empty")
    if ANY_CASE_SHA256_RE.match(value):
        raise _Invalid(path, "must be sent raw, not hashed (got a 64-character hex value)")
    if key == "lead_id" and not LEAD_ID_RE.match(value):
        raise _Invalid(path, "must be the Meta lead id: 15 to 17 digits, not hashed")
    if key == "fbc" and not FBC_RE.match(value):
        raise _Invalid(path, "must have the format fb.<subdomain index>.<creation time>.<fbclid>")
    if key == "fbp" and not FBP_RE.match(value):
        raise _Invalid(path, "must have the format fb.<subdomain index>.<creation time>.<random>")
    if key == "client_ip_address":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise _Invalid(path, "must be a valid IPv4 or IPv6 address") from None


def _check_user_data(user_data: Any) -> None:
    if not isinstance(user_data, dict):
        raise _Invalid("user_data", "must be a JSON object")
    unknown = sorted(set(user_data) - USER_DATA_KEYS)
    if unknown:
        raise _Invalid(f"user_data.{unknown[0]}", "is not a valid user_data parameter")
    present = {key for key, value in user_data.items() if value not in (None, "", [])}
    for key in sorted(user_data):
        value = user_data[key]
        if value is None:
            raise _Invalid(f"user_data.{key}", "must not be null")
        if key in HASHED_USER_KEYS:
            _check_hashed(key, value)
        else:
            _check_raw(key, value)
    has_match_key = bool(present & _MATCH_KEYS)
    has_ip_and_agent = {"client_ip_address", "client_user_agent"} <= present
    if not (has_match_key or has_ip_and_agent):
        raise _Invalid(
            "user_data",
            "not enough customer information parameters: send at least one of em, ph, "
            "external_id, lead_id, fbc, fbp, ... (client_ip_address and client_user_agent "
            "count only together)",
            subcode=SUBCODE_MISSING_USER_DATA,
            title="Missing Customer Information Parameters",
        )


def _check_custom_data(custom_data: Any, event_name: str, action_source: str) -> None:
    if not isinstance(custom_data, dict):
        raise _Invalid("custom_data", "must be a JSON object")
    for key in _CUSTOM_NUMBER_KEYS:
        if key in custom_data:
            value = custom_data[key]
            if not _is_number(value):
                raise _Invalid(f"custom_data.{key}", "must be a number")
            if key == "value" and value < 0:
                raise _Invalid("custom_data.value", "must not be negative")
    if "currency" in custom_data:
        currency = custom_data["currency"]
        if not isinstance(currency, str) or not CURRENCY_RE.match(currency):
            raise _Invalid("custom_data.currency", "must be a 3-letter ISO 4217 currency code")
    for key in _CUSTOM_STRING_KEYS:
        if key in custom_data and not isinstance(custom_data[key], str):
            raise _Invalid(f"custom_data.{key}", "must be a string")
    if "num_items" in custom_data and not (
        _is_int(custom_data["num_items"]) and custom_data["num_items"] >= 0
    ):
        raise _Invalid("custom_data.num_items", "must be a non-negative integer")
    if "content_ids" in custom_data:
        ids = custom_data["content_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, str) or _is_int(i) for i in ids):
            raise _Invalid("custom_data.content_ids", "must be a list of strings")
    if "contents" in custom_data:
        contents = custom_data["contents"]
        if not isinstance(contents, list) or not all(isinstance(c, dict) for c in contents):
            raise _Invalid("custom_data.contents", "must be a list of objects")
    if "delivery_category" in custom_data and (
        custom_data["delivery_category"] not in _DELIVERY_CATEGORIES
    ):
        raise _Invalid(
            "custom_data.delivery_category",
            f"must be one of {', '.join(sorted(_DELIVERY_CATEGORIES))}",
        )
    if custom_data.get("event_source") == "crm":
        if action_source != "system_generated":
            raise _Invalid(
                "action_source",
                "must be system_generated for CRM events (custom_data.event_source = crm)",
            )
        lead_event_source = custom_data.get("lead_event_source")
        if not isinstance(lead_event_source, str) or not lead_event_source.strip():
            raise _Invalid(
                "custom_data.lead_event_source",
                "is required for CRM events: the name of the CRM tool, e.g. HubSpot",
            )
    if event_name == "Purchase" and ("value" not in custom_data or "currency" not in custom_data):
        raise _Invalid(
            "custom_data.value",
            "Purchase events require custom_data.value and custom_data.currency",
            subcode=SUBCODE_MISSING_PURCHASE_VALUE,
            title="Missing Value for Purchase Event",
        )


def _check_optional_types(event: dict[str, Any]) -> None:
    for key in ("event_source_url", "referrer_url"):
        if key in event:
            url = event[key]
            if not isinstance(url, str) or not URL_RE.match(url):
                raise _Invalid(key, "must be an absolute http(s) URL")
    if "opt_out" in event and not isinstance(event["opt_out"], bool):
        raise _Invalid("opt_out", "must be a boolean")
    if "messaging_channel" in event and not isinstance(event["messaging_channel"], str):
        raise _Invalid("messaging_channel", "must be a string")
    for key in ("app_data", "original_event_data", "attribution_data"):
        if key in event and not isinstance(event[key], dict):
            raise _Invalid(key, "must be a JSON object")
    if "advanced_measurement_table" in event and not isinstance(
        event["advanced_measurement_table"], str
    ):
        raise _Invalid("advanced_measurement_table", "must be a string")
    if "data_processing_options" in event:
        options = event["data_processing_options"]
        if not isinstance(options, list) or any(option != "LDU" for option in options):
            raise _Invalid("data_processing_options", 'must be [] or ["LDU"]')
    for key in ("data_processing_options_country", "data_processing_options_state"):
        if key in event and not _is_int(event[key]):
            raise _Invalid(key, "must be an integer")


def validate_event(event: Any, *, now: float, max_age: int, max_future: int) -> None:
    """Validates one event object.

    Args:
        event: One element of ``data`` (decoded).
        now: Current sandbox time, Unix seconds.
        max_age: Maximum age of ``event_time`` in seconds.
        max_future: Maximum distance of ``event_time`` into the future in seconds.

    Raises:
        _Invalid: The first problem found (path relative to the event).
    """
    if not isinstance(event, dict):
        raise _Invalid("", "each event must be a JSON object")
    unknown = sorted(set(event) - EVENT_KEYS)
    if unknown:
        raise _Invalid(unknown[0], "is not a valid event parameter")

    event_name = event.get("event_name")
    if not isinstance(event_name, str) or not event_name.strip():
        raise _Invalid("event_name", "is required and must be a non-empty string")

    if "event_time" not in event:
        raise _Invalid("event_time", "is required (Unix time in seconds, an integer)")
    event_time = event["event_time"]
    if not _is_int(event_time):
        raise _Invalid("event_time", "must be an integer Unix time in seconds (not a float/string)")
    if now - event_time > max_age:
        raise _Invalid(
            "event_time",
            f"The timestamp for this event is too far in the past ({event_time}). Events must be "
            f"sent within {max_age // 86400} days of when they occurred.",
            subcode=SUBCODE_TOO_OLD,
            title="Event Timestamp Too Old",
        )
    if event_time - now > max_future:
        raise _Invalid(
            "event_time",
            f"The timestamp for this event is in the future ({event_time}); at most "
            f"{max_future} seconds ahead of the current time is allowed.",
            subcode=SUBCODE_TOO_FAR_IN_FUTURE,
            title="Event Timestamp In The Future",
        )

    if "event_id" in event:
        event_id = event["event_id"]
        if not isinstance(event_id, str) or not event_id:
            raise _Invalid("event_id", "must be a non-empty string")

    action_source = event.get("action_source")
    if action_source is None:
        raise _Invalid("action_source", "is required")
    if action_source not in ACTION_SOURCES:
        raise _Invalid("action_source", f"must be one of {', '.join(sorted(ACTION_SOURCES))}")

    _check_optional_types(event)

    if "user_data" not in event:
        raise _Invalid(
            "user_data",
            "is required",
            subcode=SUBCODE_MISSING_USER_DATA,
            title="Missing Customer Information Parameters",
        )
    user_data = event["user_data"]
    _check_user_data(user_data)

    if action_source == "website":
        if "client_user_agent" not in user_data:
            raise _Invalid("user_data.client_user_agent", "is required for website events")
        if "event_source_url" not in event:
            raise _Invalid("event_source_url", "is required for website events")
    if action_source == "app" and "app_data" not in event:
        raise _Invalid("app_data", "is required for app events")

    if "custom_data" in event:
        _check_custom_data(event["custom_data"], event_name, action_source)
    elif event_name == "Purchase":
        raise _Invalid(
            "custom_data.value",
            "Purchase events require custom_data.value and custom_data.currency",
            subcode=SUBCODE_MISSING_PURCHASE_VALUE,
            title="Missing Value for Purchase Event",
        )


def _decode_json(text: str, what: str) -> Any:
    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, parse_constant=reject_constant)
    except ValueError as exc:
        raise _invalid_request(f"{what}: not valid JSON ({exc})") from None


def decode_events(data: Any) -> list[dict[str, Any]]:
    """Turns the ``data`` parameter into the list of event objects, validating its shape.

    Args:
        data: ``data`` as received: a list, or a JSON string of a list; each element an object
            or a JSON string of an object (the official SDK's shape).

    Returns:
        The events, each as received but decoded. Elements that are not objects are returned
        as-is for :func:`validate_event` to report with their index.

    Raises:
        GraphError: ``data`` is missing, not a list, empty or too long.
    """
    if data is None:
        raise GraphError(
            "(#100) The parameter data is required",
            code=100,
            title="Missing Parameter",
            user_msg="data: the parameter data is required",
        )
    if isinstance(data, str):
        data = _decode_json(data, "data")
    if not isinstance(data, list):
        raise _invalid_request("data: must be a JSON array of event objects")
    if not data:
        raise _invalid_request("data: must contain at least one event")
    if len(data) > MAX_EVENTS_PER_REQUEST:
        raise _invalid_request(
            f"data: at most {MAX_EVENTS_PER_REQUEST} events per request (got {len(data)})",
            title="Too Many Events",
        )
    events: list[Any] = []
    for index, item in enumerate(data):
        if isinstance(item, str):
            item = _decode_json(item, f"data[{index}]")
        events.append(item)
    return events


def validate_events(events: list[Any], *, now: float, max_age: int, max_future: int) -> None:
    """Validates every event; the first invalid one rejects the whole request.

    Args:
        events: Decoded events.
        now: Current sandbox time.
        max_age: Maximum event age in seconds.
        max_future: Maximum future skew in seconds.

    Raises:
        GraphError: Code 100 with ``error_user_msg`` = ``data[i].<field>: <problem>``.
    """
    for index, event in enumerate(events):
        try:
            validate_event(event, now=now, max_age=max_age, max_future=max_future)
        except _Invalid as exc:
            where = f"data[{index}].{exc.path}" if exc.path else f"data[{index}]"
            raise GraphError(
                "Invalid parameter",
                code=100,
                subcode=exc.subcode,
                title=exc.title,
                user_msg=f"{where}: {exc.problem}",
            ) from None


# --------------------------------------------------------------------------------------------
# Request handling
# --------------------------------------------------------------------------------------------


async def _read_params(request: Request) -> dict[str, Any]:
    """Reads the request parameters from the body (JSON or form)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        async with request.form() as form:  # closes uploaded parts (none are used)
            return {key: value for key, value in form.items() if isinstance(value, str)}
    if not body.strip():
        return {}
    if content_type == "application/json" or content_type.endswith("+json") or not content_type:
        params = _decode_json(body.decode("utf-8", errors="replace"), "request body")
        if not isinstance(params, dict):
            raise _invalid_request("request body: must be a JSON object")
        return params
    raise _invalid_request(
        f"request body: unsupported content type {content_type!r}; send JSON or form fields"
    )


def _token(request: Request, params: dict[str, Any]) -> str | None:
    token = request.query_params.get("access_token") or params.get("access_token")
    if token:
        return str(token)
    auth = request.headers.get("authorization", "")
    scheme, _, credentials = auth.partition(" ")
    if scheme.lower() in ("bearer", "oauth") and credentials.strip():
        return credentials.strip()
    return None


def _fault_error(fault: Any) -> GraphError | None:
    if isinstance(fault, GraphErrorFault):
        status = fault.http_status or (500 if fault.is_transient else 400)
        message = fault.message or _GRAPH_ERROR_MESSAGES.get(fault.code, "Sandbox injected error")
        return GraphError(
            message,
            code=fault.code,
            subcode=fault.subcode,
            type_=fault.type,
            title=fault.error_user_title or "",
            user_msg=fault.error_user_msg or "",
            is_transient=fault.is_transient,
            http_status=status,
        )
    if isinstance(fault, ThrottleFault):
        return GraphError(
            _THROTTLE_MESSAGES.get(fault.code, f"(#{fault.code}) Rate limit reached"),
            code=fault.code,
            title="Too Many Requests",
            user_msg="Too many calls. Wait a bit and try again.",
            is_transient=True,
            http_status=fault.http_status or 400,
        )
    return None


async def handle_events(
    state: SandboxState, version: str, pixel_id: str, request: Request
) -> Response:
    """Handles one ``POST /{version}/{pixel_id}/events`` request.

    Args:
        state: The sandbox state.
        version: Graph API version from the path, e.g. ``v25.0``.
        pixel_id: Pixel / dataset id from the path.
        request: The incoming request.

    Returns:
        The Graph success or error response.
    """
    store = state.store
    fault = state.take_fault(PLATFORM_NAME)
    replaced = pre_processing_response(fault)
    error = _fault_error(fault)
    if replaced is not None:
        store.count_request(PLATFORM_NAME, "rejected", faulted=True)
        return replaced
    if error is not None:
        store.count_request(PLATFORM_NAME, "rejected", faulted=True)
        return error.response()
    await pre_processing_delay(fault)

    config = state.config
    try:
        if not VERSION_RE.match(version):
            raise GraphError(
                f"Unknown path components: invalid API version {version!r} (expected v<N>.<N>)",
                code=2500,
                title="Invalid API Version",
                user_msg=f"version: {version!r} does not match v<major>.<minor>",
            )
        params = await _read_params(request)
        token = _token(request, params)
        if token is None or token not in config.meta_tokens:
            raise GraphError(
                "Invalid OAuth access token.",
                code=190,
                title="Invalid OAuth access token",
                user_msg="access_token: missing or not valid",
            )
        if pixel_id not in config.meta_pixels:
            raise GraphError(
                f"Unsupported post request. Object with ID '{pixel_id}' does not exist, cannot be "
                "loaded due to missing permissions, or does not support this operation.",
                code=100,
                subcode=SUBCODE_PIXEL,
                type_="GraphMethodException",
                title="Invalid Pixel",
                user_msg=f"pixel_id: {pixel_id!r} does not exist or the token cannot use it",
            )
        data = params.get("data", request.query_params.get("data"))
        test_event_code = params.get("test_event_code", request.query_params.get("test_event_code"))
        if test_event_code is not None and (
            not isinstance(test_event_code, str) or not test_event_code.strip()
        ):
            raise _invalid_request("test_event_code: must be a non-empty string")
        events = decode_events(data)
        now = state.now()
        validate_events(
            events,
            now=now,
            max_age=config.max_age_seconds,
            max_future=config.max_future_seconds,
        )
        if isinstance(fault, RejectEventsFault):
            # A "poison" event: Meta rejects the whole request for one invalid event.
            for index, event in enumerate(events):
                if fault.matches(index, event.get("event_id")):
                    raise GraphError(
                        "Invalid parameter",
                        code=100,
                        subcode=SUBCODE_INVALID_PARAMETER,
                        title="Invalid Parameter",
                        user_msg=f"data[{index}]: {fault.reason or 'rejected by the sandbox'}",
                    )
    except GraphError as exc:
        store.count_request(PLATFORM_NAME, "rejected")
        response: Response = exc.response()
    else:
        store.record_events(
            PLATFORM_NAME,
            pixel_id,
            [
                EventInput(
                    event_name=event["event_name"],
                    event_id=event.get("event_id"),
                    event_time=event["event_time"],
                    payload=event,
                )
                for event in events
            ],
            received_at=now,
            dedup_window_seconds=config.dedup_window_seconds,
            test_event_code=test_event_code,
        )
        store.count_request(PLATFORM_NAME, "accepted")
        response = JSONResponse(
            {"events_received": len(events), "messages": [], "fbtrace_id": new_fbtrace_id()}
        )
    await post_processing_delay(fault)
    return response


def build_routers(state: SandboxState) -> list[APIRouter]:
    """Builds the Meta API router and its control routes.

    Args:
        state: The sandbox state.

    Returns:
        ``[api_router, control_router]``.
    """
    api = APIRouter(tags=["meta"])

    @api.post("/{version}/{pixel_id}/events")
    async def post_events(version: str, pixel_id: str, request: Request) -> Response:
        """Meta Conversions API: send events to a pixel / dataset."""
        return await handle_events(state, version, pixel_id, request)

    control = APIRouter(prefix="/_sandbox/meta", tags=["sandbox control"])

    @control.get("/events")
    def list_events(
        pixel_id: str | None = None,
        unique: bool = False,
        test: bool = Query(False, description="true: only test events; false: only live events"),
        event_name: str | None = None,
        event_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored Meta events in receive order (``destination`` is the pixel id)."""
        events = state.store.list_events(
            PLATFORM_NAME,
            destination=pixel_id,
            unique=unique,
            test=test,
            event_name=event_name,
            event_id=event_id,
        )
        for event in events:
            event["pixel_id"] = event["destination"]
        return events

    return [api, control]


PLATFORM = PlatformSpec(
    name=PLATFORM_NAME,
    build_routers=build_routers,
    fault_kinds=frozenset({"graph_error", "throttle", "reject_events"}),
)

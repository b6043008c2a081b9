"""LinkedIn Conversions API emulator: ``POST /rest/conversionEvents`` (Rest.li BATCH_CREATE).

Strict like the other emulators: a payload it accepts should be one LinkedIn accepts (sources in
:mod:`leadsync.destinations.linkedin`). Headers: ``Authorization: Bearer <token>``,
``LinkedIn-Version: YYYYMM`` (a version older than ``linkedin_min_version`` gets 426),
``X-Restli-Protocol-Version: 2.0.0`` and ``X-RestLi-Method: BATCH_CREATE``.

======  =======================================================================================
status  case
======  =======================================================================================
200     accepted: ``{"elements": [{"status": 201}, ...]}``, one per element
400     body not ``{"elements": [...]}``, or a conversion rule that is not a CONVERSIONS_API
        rule of this account: ``"... indices [i] (0-indexed)"`` (RudderStack's recorded shape)
401     missing/unknown token: ``{"status": 401, "serviceErrorCode": 65600, "code":
        "INVALID_ACCESS_TOKEN", "message": "Invalid access token"}``
422     invalid elements: the WHOLE batch is rejected; the message has one
        ``Index: <i>, ERROR :: /path :: problem`` line per bad element
426     ``LinkedIn-Version`` no longer served
429     throttled (fault ``throttle``)
======  =======================================================================================

Elements: ``conversion`` = ``urn:lla:llaPartnerConversion:<rule id>``, ``conversionHappenedAt``
epoch **milliseconds** within the last 90 days, ``eventId`` (at most 64 characters),
``user.userIds`` (``SHA256_EMAIL`` 64 lowercase hex; ``LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID``,
``ACXIOM_ID``, ``ORACLE_MOAT_ID`` raw), optional ``user.userInfo`` (``firstName`` and
``lastName`` both required when present), optional ``conversionValue`` (``currencyCode``,
``amount`` as a decimal string). Dedup: same rule + ``eventId`` within
``dedup_window_seconds`` (stored flagged, still acknowledged).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, TypeGuard

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

PLATFORM_NAME = "linkedin"
MAX_ELEMENTS = 5000
MAX_AGE_SECONDS = 90 * 24 * 3600
MAX_EVENT_ID_LENGTH = 64
URN_PREFIX = "urn:lla:llaPartnerConversion:"

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ANY_CASE_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
VERSION_RE = re.compile(r"^(20\d{2})(0[1-9]|1[0-2])$")
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
ID_TYPES = frozenset({"SHA256_EMAIL", "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID", "ACXIOM_ID",
                      "ORACLE_MOAT_ID"})
ELEMENT_KEYS = frozenset({"conversion", "conversionHappenedAt", "conversionValue", "eventId",
                          "user"})
USER_INFO_KEYS = frozenset({"firstName", "lastName", "companyName", "title", "countryCode"})


class LinkedInError(Exception):
    """An error answered with LinkedIn's error body."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 service_code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.service_code = service_code

    def response(self) -> JSONResponse:
        """The HTTP response."""
        body: dict[str, Any] = {"status": self.status, "message": self.message}
        if self.code:
            body["code"] = self.code
        if self.service_code is not None:
            body["serviceErrorCode"] = self.service_code
        return JSONResponse(body, status_code=self.status)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def element_errors(element: Any, *, now_ms: int, max_future_ms: int) -> list[str]:
    """The ``/path :: problem`` errors of one element (empty when valid)."""
    if not isinstance(element, dict):
        return [":: element must be a record"]
    errors: list[str] = []
    for key in sorted(set(element) - ELEMENT_KEYS):
        errors.append(f"/{key} :: unrecognized field")
    conversion = element.get("conversion")
    if not isinstance(conversion, str) or not conversion.startswith(URN_PREFIX):
        errors.append("/conversion :: field is required and must be an "
                      "urn:lla:llaPartnerConversion URN")
    at = element.get("conversionHappenedAt")
    if not _is_int(at):
        errors.append("/conversionHappenedAt :: field is required and must be a long")
    elif at < 10**11:
        errors.append("/conversionHappenedAt :: must be epoch milliseconds")
    elif at > now_ms + max_future_ms:
        errors.append("/conversionHappenedAt :: cannot be in the future")
    elif at < now_ms - MAX_AGE_SECONDS * 1000:
        errors.append("/conversionHappenedAt :: must be within the past 90 days")
    event_id = element.get("eventId")
    if event_id is not None and not (isinstance(event_id, str) and event_id
                                     and len(event_id) <= MAX_EVENT_ID_LENGTH):
        errors.append(f"/eventId :: must be a string of 1 to {MAX_EVENT_ID_LENGTH} characters")
    value = element.get("conversionValue")
    if value is not None:
        if not isinstance(value, dict):
            errors.append("/conversionValue :: must be a record")
        else:
            if not (isinstance(value.get("currencyCode"), str)
                    and CURRENCY_RE.match(value["currencyCode"])):
                errors.append("/conversionValue/currencyCode :: field is required and must be "
                              "an ISO 4217 code")
            amount = value.get("amount")
            if not isinstance(amount, str):
                errors.append("/conversionValue/amount :: field is required but not found and "
                              "has no default value")
            else:
                try:
                    ok = Decimal(amount).is_finite() and Decimal(amount) >= 0
                except InvalidOperation:
                    ok = False
                if not ok:
                    errors.append("/conversionValue/amount :: must be a decimal string")
    errors.extend(_user_errors(element.get("user")))
    return errors


def _user_errors(user: Any) -> list[str]:
    if not isinstance(user, dict):
        return ["/user :: field is required but not found and has no default value"]
    errors: list[str] = []
    ids = user.get("userIds", [])
    info = user.get("userInfo")
    if not isinstance(ids, list):
        return ["/user/userIds :: must be an array"]
    for i, entry in enumerate(ids):
        path = f"/user/userIds/{i}"
        if not isinstance(entry, dict) or entry.get("idType") not in ID_TYPES:
            errors.append(f"{path}/idType :: must be one of {', '.join(sorted(ID_TYPES))}")
            continue
        value = entry.get("idValue")
        if not isinstance(value, str) or not value:
            errors.append(f"{path}/idValue :: field is required but not found")
        elif entry["idType"] == "SHA256_EMAIL" and not SHA256_RE.match(value):
            errors.append(f"{path}/idValue :: SHA256_EMAIL must be a SHA-256 hex digest "
                          "(64 lowercase hex characters)")
        elif entry["idType"] != "SHA256_EMAIL" and ANY_CASE_SHA256_RE.match(value):
            errors.append(f"{path}/idValue :: {entry['idType']} must be sent raw, not hashed")
    if info is not None:
        if not isinstance(info, dict):
            errors.append("/user/userInfo :: must be a record")
        else:
            for key in sorted(set(info) - USER_INFO_KEYS):
                errors.append(f"/user/userInfo/{key} :: unrecognized field")
            for key in ("firstName", "lastName"):
                if not (isinstance(info.get(key), str) and info[key].strip()):
                    errors.append(f"/user/userInfo/{key} :: field is required but not found "
                                  "and has no default value")
    if not ids and info is None:
        errors.append("/user :: at least one of userIds or userInfo is required")
    return errors


def _check_headers(state: SandboxState, request: Request) -> None:
    auth = request.headers.get("authorization", "")
    token = auth[7:] if auth.lower().startswith("bearer ") else ""
    if not token or token not in state.config.linkedin_tokens:
        raise LinkedInError(401, "Invalid access token", "INVALID_ACCESS_TOKEN", 65600)
    version = request.headers.get("linkedin-version", "")
    match = VERSION_RE.match(version)
    if not match:
        raise LinkedInError(400, "A version must be present. Please specify a version by adding "
                            "the LinkedIn-Version header.", "VERSION_MISSING")
    if version < state.config.linkedin_min_version:
        raise LinkedInError(426, f"Requested version {version} is not active",
                            "NONEXISTENT_VERSION")
    if request.headers.get("x-restli-protocol-version") != "2.0.0":
        raise LinkedInError(400, "X-Restli-Protocol-Version 2.0.0 is required")
    if request.headers.get("x-restli-method", "").upper() != "BATCH_CREATE":
        raise LinkedInError(400, "X-RestLi-Method BATCH_CREATE is required to create several "
                            "conversion events")


def validate_request(body: Any, state: SandboxState) -> list[dict[str, Any]]:
    """Validates the batch; returns its elements or raises :class:`LinkedInError`."""
    if not isinstance(body, dict) or set(body) != {"elements"} or not isinstance(
            body["elements"], list):
        raise LinkedInError(400, "Request body must be {\"elements\": [...]}")
    elements = body["elements"]
    if not elements or len(elements) > MAX_ELEMENTS:
        raise LinkedInError(400, f"elements must hold 1 to {MAX_ELEMENTS} conversion events")
    now_ms = int(state.now() * 1000)
    future_ms = state.config.max_future_seconds * 1000
    rules = state.config.linkedin_conversion_rules
    lines: list[str] = []
    for i, element in enumerate(elements):
        errors = element_errors(element, now_ms=now_ms, max_future_ms=future_ms)
        if errors:
            lines.append(f"Index: {i}, ERROR :: " + "\nERROR :: ".join(
                e.removeprefix(":: ") for e in errors))
    if lines:
        raise LinkedInError(422, "\n".join(lines) + "\n")
    unknown = [i for i, e in enumerate(elements)
               if e["conversion"].removeprefix(URN_PREFIX) not in rules]
    if unknown:
        raise LinkedInError(400, "Incorrect conversions information provided. Conversion's "
                            "method should be CONVERSIONS_API, indices "
                            f"[{', '.join(map(str, unknown))}] (0-indexed)")
    return elements


def _fault_error(fault: Any) -> LinkedInError | None:
    if isinstance(fault, ThrottleFault):
        return LinkedInError(fault.http_status or 429, "Resource level throttle APPLICATION "
                             "DAY limit for calls to this resource is reached.")
    return None


async def handle_batch_create(state: SandboxState, request: Request) -> Response:
    """Handles one ``POST /rest/conversionEvents``."""
    store = state.store
    fault = state.take_fault(PLATFORM_NAME)
    replaced = pre_processing_response(fault)
    error = _fault_error(fault)
    if replaced is not None or error is not None:
        store.count_request(PLATFORM_NAME, "rejected", faulted=True)
        return replaced if replaced is not None else error.response()  # type: ignore[union-attr]
    await pre_processing_delay(fault)
    try:
        _check_headers(state, request)
        try:
            body = await request.json()
        except ValueError:
            raise LinkedInError(400, "Request body is not valid JSON") from None
        elements = validate_request(body, state)
        if isinstance(fault, RejectEventsFault):
            bad = [i for i, e in enumerate(elements) if fault.matches(i, e.get("eventId"))]
            if bad:
                reason = fault.reason or "rejected by the sandbox (fault injection)"
                raise LinkedInError(422, "".join(f"Index: {i}, ERROR :: /eventId :: {reason}\n"
                                                 for i in bad))
    except LinkedInError as exc:
        store.count_request(PLATFORM_NAME, "rejected")
        response: Response = exc.response()
    else:
        now = state.now()
        # One destination per rule: dedup is per conversion rule + eventId.
        for rule in sorted({e["conversion"] for e in elements}):
            group = [e for e in elements if e["conversion"] == rule]
            store.record_events(
                PLATFORM_NAME,
                rule.removeprefix(URN_PREFIX),
                [EventInput(rule.removeprefix(URN_PREFIX), e.get("eventId"),
                            e["conversionHappenedAt"] // 1000, e) for e in group],
                received_at=now,
                dedup_window_seconds=state.config.dedup_window_seconds,
            )
        store.count_request(PLATFORM_NAME, "accepted")
        response = JSONResponse({"elements": [{"status": 201} for _ in elements]})
    await post_processing_delay(fault)
    return response


def build_routers(state: SandboxState) -> list[APIRouter]:
    """The LinkedIn API router and its control routes."""
    api = APIRouter(tags=["linkedin"])

    @api.post("/rest/conversionEvents")
    async def conversion_events(request: Request) -> Response:
        """LinkedIn Conversions API: stream conversion events to conversion rules."""
        return await handle_batch_create(state, request)

    control = APIRouter(prefix="/_sandbox/linkedin", tags=["sandbox control"])

    @control.get("/events")
    def list_events(
        conversion_rule: str | None = None,
        unique: bool = False,
        test: bool = Query(False, description="LinkedIn has no test mode: always empty"),
        event_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored LinkedIn events in receive order (``destination`` is the rule id)."""
        return state.store.list_events(PLATFORM_NAME, destination=conversion_rule,
                                       unique=unique, test=test, event_id=event_id)

    return [api, control]


PLATFORM = PlatformSpec(
    name=PLATFORM_NAME,
    build_routers=build_routers,
    fault_kinds=frozenset({"throttle", "reject_events"}),
)

"""Google Ads API emulator: ``POST /{version}/customers/{customer_id}:uploadClickConversions``.

Strict like the Meta emulator (``docs/platforms.md`` §3): REST JSON names of
``UploadClickConversionsRequest`` / ``ClickConversion`` (lowerCamel or snake_case), enum names,
hash format, account, version and allowlist checks.

**Partial failure.** ``partialFailure`` must be true (Google: false "is not supported and
causes the entire request to fail"). Problems of the whole request (auth, unknown JSON field,
bad enum, too many conversions, an account that is not allowlisted, quota) fail it with an
HTTP error whose ``details`` hold a ``GoogleAdsFailure``. Problems of single conversions do
not: the response is HTTP 200 with ``results`` (an empty object for each failed row) and a
``partialFailureError`` whose errors carry ``location.fieldPathElements`` =
``[{"fieldName": "conversions", "index": <row>}, ...]``.

Row errors emulated (``conversionUploadError`` unless noted): ``NO_CONVERSION_ACTION_FOUND``,
``INVALID_USER_IDENTIFIER`` (not a SHA-256 lowercase hex digest), ``UNSUPPORTED_USER_IDENTIFIER``,
``GBRAID_WBRAID_BOTH_SET``, ``UNPARSEABLE_GCLID`` / ``_GBRAID`` / ``_WBRAID``,
``EXPIRED_EVENT`` (older than ``google_max_age_seconds``), ``DUPLICATE_ORDER_ID`` (twice in one
request), ``ORDER_ID_ALREADY_IN_USE`` (an earlier request has it, per conversion action, with
no expiry), ``CLICK_CONVERSION_ALREADY_EXISTS`` (same click and time without order id),
``dateError.INVALID_STRING_DATE_TIME_SECONDS_WITH_OFFSET`` and
``dateError.LATER_THAN_MAXIMUM_DATE`` (in the future), ``fieldError.REQUIRED``.

Quota errors (fault ``throttle``) answer 429 ``RESOURCE_EXHAUSTED`` with
``quotaError.RESOURCE_TEMPORARILY_EXHAUSTED`` and ``quotaErrorDetails.retryDelay``.
``validateOnly`` requests are validated, stored as test events, and answer no results.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from leadsync.sandbox.app import (
    EventInput,
    GoogleErrorFault,
    PlatformSpec,
    RejectEventsFault,
    SandboxState,
    ThrottleFault,
    post_processing_delay,
    pre_processing_delay,
    pre_processing_response,
)
from leadsync.sandbox.google_common import (
    RpcError,
    check_token,
    new_request_id,
    read_json_object,
    unknown_field,
)

PLATFORM_NAME = "google_ads"
VERSIONS = frozenset({"v23", "v24", "v25", "v26"})
MAX_CONVERSIONS = 2000
MAX_USER_IDENTIFIERS = 5
DEDUP_WINDOW_SECONDS = 10 * 365 * 24 * 3600  # no expiry is documented

REQUEST_FIELDS = {"conversions", "partialFailure", "validateOnly", "jobId", "customerId"}
CONVERSION_FIELDS = {"gclid", "gbraid", "wbraid", "conversionAction", "conversionDateTime",
                     "conversionValue", "currencyCode", "orderId", "externalAttributionData",
                     "customVariables", "cartData", "userIdentifiers", "conversionEnvironment",
                     "consent", "customerType", "userIpAddress", "sessionAttributesEncoded",
                     "sessionAttributesKeyValuePairs"}
IDENTIFIER_FIELDS = {"userIdentifierSource", "hashedEmail", "hashedPhoneNumber", "mobileId",
                     "thirdPartyUserId", "addressInfo"}
CONSENT_FIELDS = {"adUserData", "adPersonalization"}
CONSENT_VALUES = frozenset({"UNSPECIFIED", "UNKNOWN", "GRANTED", "DENIED"})
IDENTIFIER_SOURCES = frozenset({"UNSPECIFIED", "UNKNOWN", "FIRST_PARTY", "THIRD_PARTY"})
DUPLICATE_IN_STORE = "ORDER_ID_ALREADY_IN_USE"

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CLICK_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{10,512}$")
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
DATE_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,6})?[+-]\d{2}:\d{2}$")
ACTION_RE = re.compile(r"^customers/(\d{10})/conversionActions/(\d{1,20})$")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _read(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    """Fields by lowerCamel name (snake_case accepted); unknown names fail the request."""
    if not isinstance(obj, dict):
        raise RpcError(400, f"Invalid JSON payload received. Expected an object at '{where}'.")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = _camel(key) if "_" in key else key
        if name not in allowed:
            raise unknown_field(key, where)
        out[name] = value
    return out


def ads_failure(errors: list[dict[str, Any]], request_id: str, version: str) -> dict[str, Any]:
    """A ``GoogleAdsFailure`` detail."""
    return {"@type": f"type.googleapis.com/google.ads.googleads.{version}.errors."
                     "GoogleAdsFailure", "errors": errors, "requestId": request_id}


def ads_error(kind: str, code: str, message: str, index: int | None = None,
              field: str | None = None, details: dict[str, Any] | None = None,
              trigger: str | None = None) -> dict[str, Any]:
    """One ``GoogleAdsError``."""
    error: dict[str, Any] = {"errorCode": {kind: code}, "message": message}
    if trigger is not None:
        error["trigger"] = {"stringValue": trigger}
    if index is not None:
        elements: list[dict[str, Any]] = [{"fieldName": "conversions", "index": index}]
        if field:
            elements.append({"fieldName": field})
        error["location"] = {"fieldPathElements": elements}
    if details:
        error["details"] = details
    return error


def request_error(http_status: int, kind: str, code: str, message: str, request_id: str,
                  version: str, status: str | None = None,
                  details: dict[str, Any] | None = None) -> RpcError:
    """An error of the whole request."""
    return RpcError(http_status, message if http_status != 400 else
                    "Request contains an invalid argument.", status=status, details=[
                        ads_failure([ads_error(kind, code, message, details=details)],
                                    request_id, version)])


class _RowError(Exception):
    def __init__(self, kind: str, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.message = message
        self.field = field


def _date_time(value: Any) -> float:
    if not isinstance(value, str) or not DATE_TIME_RE.match(value):
        raise _RowError("dateError", "INVALID_STRING_DATE_TIME_SECONDS_WITH_OFFSET",
                        "The date time must be 'yyyy-mm-dd hh:mm:ss+|-hh:mm'.",
                        "conversion_date_time")
    return datetime.fromisoformat(value).timestamp()


def validate_conversion(
    raw: Any, index: int, *, customer_id: str, state: SandboxState, now: float,
) -> tuple[dict[str, Any], float]:
    """Validates one conversion's shape (JSON-level problems fail the whole request) and its
    values (row errors raise :class:`_RowError`); returns its fields and time."""
    where = f"conversions[{index}]"
    conv = _read(raw, CONVERSION_FIELDS, where)
    identifiers = conv.get("userIdentifiers", [])
    if not isinstance(identifiers, list):
        raise RpcError(400, f"Invalid value at '{where}.user_identifiers'")
    parsed_ids = []
    for position, item in enumerate(identifiers):
        ident = _read(item, IDENTIFIER_FIELDS, f"{where}.user_identifiers[{position}]")
        source = ident.get("userIdentifierSource", "UNSPECIFIED")
        if source not in IDENTIFIER_SOURCES:
            raise RpcError(400, f"Invalid value at '{where}.user_identifiers[{position}]."
                           f"user_identifier_source', \"{source}\"")
        values = [k for k in ident if k != "userIdentifierSource"]
        if len(values) > 1:
            raise RpcError(400, f"Invalid JSON payload received. oneof field 'identifier' is "
                           f"already set at '{where}.user_identifiers[{position}]'.")
        parsed_ids.append((values[0] if values else None, ident))
    if "consent" in conv:
        consent = _read(conv["consent"], CONSENT_FIELDS, f"{where}.consent")
        for key, value in consent.items():
            if value not in CONSENT_VALUES:
                raise RpcError(400, f"Invalid value at '{where}.consent.{_snake(key)}' "
                               f"(type.googleapis.com/google.ads.googleads.v26.enums."
                               f"ConsentStatusEnum.ConsentStatus), \"{value}\"")
    value = conv.get("conversionValue")
    if value is not None and not (isinstance(value, int | float) and not isinstance(value, bool)
                                  and math.isfinite(value)):
        raise RpcError(400, f"Invalid value at '{where}.conversion_value' (TYPE_DOUBLE)")

    # Row-level checks: these fail the row only.
    action = conv.get("conversionAction")
    if not action:
        raise _RowError("fieldError", "REQUIRED", "The required field was not present.",
                        "conversion_action")
    match = ACTION_RE.match(str(action))
    if (not match or match.group(1) != customer_id
            or match.group(2) not in state.config.google_conversion_actions):
        raise _RowError("conversionUploadError", "NO_CONVERSION_ACTION_FOUND",
                        "The conversion action specified in the upload request cannot be "
                        "found. Make sure it's available in this account.", "conversion_action")
    if "conversionDateTime" not in conv:
        raise _RowError("fieldError", "REQUIRED", "The required field was not present.",
                        "conversion_date_time")
    moment = _date_time(conv["conversionDateTime"])
    if moment - now > state.config.max_future_seconds:
        raise _RowError("dateError", "LATER_THAN_MAXIMUM_DATE",
                        "The date is later than the maximum allowed date.",
                        "conversion_date_time")
    if now - moment > state.config.google_max_age_seconds:
        raise _RowError("conversionUploadError", "EXPIRED_EVENT",
                        "The click associated with the given identifier is too old to be "
                        "imported.", "conversion_date_time")
    if "gbraid" in conv and "wbraid" in conv:
        raise _RowError("conversionUploadError", "GBRAID_WBRAID_BOTH_SET",
                        "Only one of gbraid or wbraid can be set.", "gbraid")
    for key in ("gclid", "gbraid", "wbraid"):
        if key in conv and not (isinstance(conv[key], str) and CLICK_ID_RE.match(conv[key])):
            raise _RowError("conversionUploadError", f"UNPARSEABLE_{key.upper()}",
                            f"The {key} could not be decoded.", key)
    if len(parsed_ids) > MAX_USER_IDENTIFIERS:
        raise _RowError("collectionSizeError", "TOO_MANY",
                        f"At most {MAX_USER_IDENTIFIERS} user identifiers.", "user_identifiers")
    for name, ident in parsed_ids:
        if name not in ("hashedEmail", "hashedPhoneNumber"):
            raise _RowError("conversionUploadError", "UNSUPPORTED_USER_IDENTIFIER",
                            "Only hashed_email and hashed_phone_number are supported.",
                            "user_identifiers")
        if not (isinstance(ident[name], str) and SHA256_RE.match(ident[name])):
            raise _RowError("conversionUploadError", "INVALID_USER_IDENTIFIER",
                            "The user identifier is not a SHA-256 hash of a normalized value "
                            "(64 lowercase hexadecimal characters).", "user_identifiers")
    if not any(k in conv for k in ("gclid", "gbraid", "wbraid")) and not parsed_ids:
        raise _RowError("fieldError", "REQUIRED",
                        "A click id or user identifiers are required.", "gclid")
    currency = conv.get("currencyCode")
    if currency is not None and not (isinstance(currency, str) and CURRENCY_RE.match(currency)):
        raise _RowError("fieldError", "INVALID_VALUE", "Invalid currency code.",
                        "currency_code")
    order_id = conv.get("orderId")
    if order_id is not None and not (isinstance(order_id, str) and order_id):
        raise _RowError("fieldError", "INVALID_VALUE", "order_id must be a non-empty string.",
                        "order_id")
    return conv, moment


def _fault_error(fault: Any, request_id: str, version: str) -> RpcError | None:
    if isinstance(fault, GoogleErrorFault):
        kind, _, code = (fault.reason or "internalError.TRANSIENT_ERROR").partition(".")
        details = ({"quotaErrorDetails": {"rateScope": "ACCOUNT", "rateName": "Requests",
                                          "retryDelay": f"{fault.retry_delay_s:g}s"}}
                   if fault.retry_delay_s is not None else None)
        return request_error(fault.http_status, kind, code or "UNKNOWN",
                             fault.message or "Sandbox injected error", request_id, version,
                             status=fault.status, details=details)
    if isinstance(fault, ThrottleFault):
        return request_error(fault.http_status or 429, "quotaError",
                             "RESOURCE_TEMPORARILY_EXHAUSTED",
                             "Too many requests. Retry in 1 seconds.", request_id, version,
                             status="RESOURCE_EXHAUSTED",
                             details={"quotaErrorDetails": {
                                 "rateScope": "ACCOUNT",
                                 "rateName": "Number of operations for basic access",
                                 "retryDelay": "1s"}})
    return None


async def handle_upload(state: SandboxState, version: str, customer_id: str,
                        request: Request) -> Response:
    """Handles one ``uploadClickConversions`` request."""
    store = state.store
    request_id = new_request_id()
    if version not in VERSIONS:
        store.count_request(PLATFORM_NAME, "rejected")
        return Response(f"<html><body>404: version {version} not found</body></html>",
                        status_code=404, media_type="text/html")
    fault = state.take_fault(PLATFORM_NAME)
    replaced = pre_processing_response(fault)
    error = _fault_error(fault, request_id, version)
    if replaced is not None or error is not None:
        store.count_request(PLATFORM_NAME, "rejected", faulted=True)
        return replaced if replaced is not None else error.response()  # type: ignore[union-attr]
    await pre_processing_delay(fault)
    config = state.config
    try:
        if not check_token(request, state):
            raise request_error(401, "authenticationError", "OAUTH_TOKEN_INVALID",
                                "Oauth token is invalid.", request_id, version)
        if customer_id not in config.google_customers:
            raise request_error(403, "authorizationError", "USER_PERMISSION_DENIED",
                                "User doesn't have permission to access customer.",
                                request_id, version)
        login = request.headers.get("login-customer-id")
        if login is not None and login not in config.google_customers | config.google_managers:
            raise request_error(403, "authorizationError", "USER_PERMISSION_DENIED",
                                "The login customer cannot access this customer.",
                                request_id, version)
        allowlisted = (config.google_ads_allowlisted
                       if config.google_ads_allowlisted is not None else config.google_customers)
        if customer_id not in allowlisted:
            raise request_error(403, "notAllowlistedError",
                                "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE",
                                "New integrations for uploading click conversions should use "
                                "the Data Manager API. Usage of ConversionUploadService."
                                "UploadClickConversions is limited to existing users.",
                                request_id, version)
        body = _read(await read_json_object(request), REQUEST_FIELDS, "")
        if body.get("partialFailure") is not True:
            raise request_error(400, "partialFailureError", "PARTIAL_FAILURE_MODE_REQUIRED",
                                "partial_failure must be true for this service.",
                                request_id, version)
        validate_only = body.get("validateOnly", False)
        if not isinstance(validate_only, bool):
            raise RpcError(400, "Invalid value at 'validate_only' (TYPE_BOOL)")
        job_id = body.get("jobId")
        if job_id is not None and not (isinstance(job_id, int | str)
                                       and 0 <= int(job_id) < 2**31):
            raise request_error(400, "conversionUploadError", "INVALID_JOB_ID",
                                "job_id must be a non-negative number below 2^31.",
                                request_id, version)
        conversions = body.get("conversions")
        if not isinstance(conversions, list) or not conversions:
            raise request_error(400, "requestError", "REQUIRED_FIELD_MISSING",
                                "conversions is required.", request_id, version)
        if len(conversions) > MAX_CONVERSIONS:
            raise request_error(400, "conversionUploadError", "TOO_MANY_CONVERSIONS_IN_REQUEST",
                                f"Upload fewer than {MAX_CONVERSIONS + 1} events in a "
                                "single request.", request_id, version)
        now = state.now()
        rows: list[tuple[dict[str, Any], float] | _RowError] = []
        for index, raw in enumerate(conversions):
            try:
                rows.append(validate_conversion(raw, index, customer_id=customer_id,
                                                state=state, now=now))
            except _RowError as exc:
                rows.append(exc)
    except RpcError as exc:
        store.count_request(PLATFORM_NAME, "rejected")
        await post_processing_delay(fault)
        return exc.response()
    test_code = "validateOnly" if validate_only else None
    rows = _dedup(state, customer_id, rows, fault, test_code)
    accepted = [(i, row) for i, row in enumerate(rows) if not isinstance(row, _RowError)]
    if accepted:
        store.record_events(
            PLATFORM_NAME, customer_id,
            [EventInput(_action_id(conv), conv.get("orderId"), int(moment), conversions[i])
             for i, (conv, moment) in accepted],
            received_at=now, dedup_window_seconds=DEDUP_WINDOW_SECONDS,
            test_event_code=test_code)
    store.count_request(PLATFORM_NAME, "accepted")
    errors = [ads_error(r.kind, r.code, r.message, i, r.field) for i, r in enumerate(rows)
              if isinstance(r, _RowError)]
    payload: dict[str, Any] = {}
    if errors:
        first = errors[0]
        where = first["location"]["fieldPathElements"][0]["index"]
        payload["partialFailureError"] = {
            "code": 3,
            "message": f"{first['message']}, at conversions[{where}]",
            "details": [ads_failure(errors, request_id, version)],
        }
    if not validate_only:
        payload["results"] = [{} if isinstance(r, _RowError) else _result(r[0]) for r in rows]
        payload["jobId"] = str(int(body.get("jobId") or 2**31 + int(now) % 2**30))
    response = JSONResponse(payload)
    await post_processing_delay(fault)
    return response


def _action_id(conv: dict[str, Any]) -> str:
    match = ACTION_RE.match(conv["conversionAction"])
    assert match is not None
    return match.group(2)


def _result(conv: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {k: conv[k] for k in ("gclid", "gbraid", "wbraid") if k in conv}
    result["conversionAction"] = conv["conversionAction"]
    result["conversionDateTime"] = conv["conversionDateTime"]
    if "userIdentifiers" in conv:
        result["userIdentifiers"] = conv["userIdentifiers"]
    return result


def _dedup(state: SandboxState, customer_id: str,
           rows: list[tuple[dict[str, Any], float] | _RowError], fault: Any,
           test_code: str | None) -> list[tuple[dict[str, Any], float] | _RowError]:
    """Applies order-id / click dedup (within the request and against the store) and
    ``reject_events`` faults, turning rows into row errors."""
    seen_orders: set[tuple[str, str]] = set()
    seen_clicks: set[tuple[str, str, str]] = set()
    out: list[tuple[dict[str, Any], float] | _RowError] = []
    for index, row in enumerate(rows):
        if isinstance(row, _RowError):
            out.append(row)
            continue
        conv, _ = row
        action = _action_id(conv)
        order = conv.get("orderId")
        if isinstance(fault, RejectEventsFault) and fault.matches(index, order):
            kind, _, code = (fault.reason or "conversionUploadError.INVALID_USER_IDENTIFIER"
                             ).rpartition(".")
            out.append(_RowError(kind or "conversionUploadError", code,
                                 "rejected by the sandbox (fault injection)"))
            continue
        if order is not None:
            if (action, order) in seen_orders:
                out.append(_RowError("conversionUploadError", "DUPLICATE_ORDER_ID",
                                     "The request contains duplicate order IDs.", "order_id"))
                continue
            seen_orders.add((action, order))
            if state.store.list_events(PLATFORM_NAME, destination=customer_id, unique=True,
                                       test=test_code is not None, event_name=action,
                                       event_id=order):
                out.append(_RowError("conversionUploadError", DUPLICATE_IN_STORE,
                                     "The order ID was already used for another conversion "
                                     "of this conversion action.", "order_id"))
                continue
        else:
            click = next((conv[k] for k in ("gclid", "gbraid", "wbraid") if k in conv), None)
            if click is not None:
                key = (action, click, conv["conversionDateTime"])
                if key in seen_clicks or _click_stored(state, customer_id, action, key,
                                                      test_code):
                    out.append(_RowError("conversionUploadError",
                                         "CLICK_CONVERSION_ALREADY_EXISTS",
                                         "A conversion with the same click and time was "
                                         "already uploaded.", "gclid"))
                    continue
                seen_clicks.add(key)
        out.append(row)
    return out


def _click_stored(state: SandboxState, customer_id: str, action: str,
                  key: tuple[str, str, str], test_code: str | None) -> bool:
    for stored in state.store.list_events(PLATFORM_NAME, destination=customer_id,
                                          unique=True, test=test_code is not None,
                                          event_name=action):
        event = stored["event"]
        if "orderId" in event or "order_id" in event:
            continue
        click = next((event[k] for k in ("gclid", "gbraid", "wbraid") if k in event), None)
        time = event.get("conversionDateTime") or event.get("conversion_date_time")
        if (action, click, time) == key:
            return True
    return False


def build_routers(state: SandboxState) -> list[APIRouter]:
    """The Google Ads API router and its control routes."""
    api = APIRouter(tags=["google ads"])

    @api.post("/{version}/customers/{customer_id}:uploadClickConversions")
    async def upload(version: str, customer_id: str, request: Request) -> Response:
        """Google Ads API: ConversionUploadService.UploadClickConversions."""
        return await handle_upload(state, version, customer_id, request)

    control = APIRouter(prefix="/_sandbox/google_ads", tags=["sandbox control"])

    @control.get("/events")
    def list_events(
        customer_id: str | None = None,
        unique: bool = False,
        test: bool = Query(False, description="true: only validateOnly conversions"),
        conversion_action: str | None = None,
        order_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored conversions (``destination`` = customer id, ``event_name`` = conversion
        action id, ``event_id`` = order id)."""
        return state.store.list_events(PLATFORM_NAME, destination=customer_id, unique=unique,
                                       test=test, event_name=conversion_action,
                                       event_id=order_id)

    return [api, control]


PLATFORM = PlatformSpec(
    name=PLATFORM_NAME,
    build_routers=build_routers,
    fault_kinds=frozenset({"google_error", "throttle", "reject_events"}),
)


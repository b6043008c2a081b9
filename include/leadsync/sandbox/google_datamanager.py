"""Google Data Manager API emulator: ``POST /v1/events:ingest`` and
``GET /v1/requestStatus:retrieve``.

Strict like the Meta emulator (``docs/platforms.md`` §4): JSON field names of the
``google.ads.datamanager.v1`` protos (lowerCamel or snake_case, as Google's JSON parser takes
both), enum names, hash encoding, account and conversion action checks.

**Fast-fail.** A field Google's parser does not know, or an enum value it does not have, fails
the request with HTTP 400 ``INVALID_ARGUMENT``. Invalid values fail it too, with a
``google.rpc.BadRequest`` listing every bad event as a field violation whose ``field`` is
``events.events[<index>].<field path>`` (the shape Google documents) and whose ``reason`` is an
``ErrorReason`` (``REQUIRED_FIELD_MISSING``, ``INVALID_HEX_ENCODING``,
``INVALID_SHA256_FORMAT``, ``INVALID_CURRENCY_CODE``, ``EVENT_TIME_INVALID``,
``NO_IDENTIFIERS_PROVIDED``, ...). Nothing of a failed request is stored.

**Asynchronous processing.** An accepted request answers ``{"requestId"}``; its events are
stored at once, but ``requestStatus:retrieve`` reports ``PROCESSING`` for
``datamanager_processing_seconds``, then per destination ``SUCCESS``, ``PARTIAL_SUCCESS`` or
``FAILED`` with record counts. Records Google drops while processing are emulated for denied
``adUserData`` consent (``PROCESSING_ERROR_REASON_DENIED_CONSENT``) and click ids that cannot
be Google's (``PROCESSING_ERROR_REASON_INVALID_GCLID`` ...); those are not stored.

**Dedup.** ``transactionId`` per conversion action: a resend is an adjustment of the same
conversion (stored flagged as a duplicate, counted as ingested), never a second conversion.

``validateOnly`` requests are validated and stored as test events only; their request id has
no status (``INVALID_REQUEST_ID``, as Google documents). Request ids carry their own outcome
(compressed), so statuses survive a sandbox restart like the event store does.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import re
import zlib
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

PLATFORM_NAME = "google_datamanager"
DOMAIN = "datamanager.googleapis.com"
MAX_EVENTS = 2000
MAX_DESTINATIONS = 10
MAX_USER_IDENTIFIERS = 10
# Google documents no expiry for transaction ids: keep them for ten years.
DEDUP_WINDOW_SECONDS = 10 * 365 * 24 * 3600

EVENT_SOURCES = frozenset({"EVENT_SOURCE_UNSPECIFIED", "WEB", "APP", "IN_STORE", "PHONE",
                           "MESSAGE", "OTHER"})
CONSENT_VALUES = frozenset({"CONSENT_STATUS_UNSPECIFIED", "CONSENT_GRANTED", "CONSENT_DENIED"})
ENCODINGS = frozenset({"ENCODING_UNSPECIFIED", "HEX", "BASE64"})
ACCOUNT_TYPES = frozenset({"ACCOUNT_TYPE_UNSPECIFIED", "GOOGLE_ADS", "DISPLAY_VIDEO_PARTNER",
                           "DISPLAY_VIDEO_ADVERTISER", "DATA_PARTNER",
                           "GOOGLE_ANALYTICS_PROPERTY", "GOOGLE_AD_MANAGER_AUDIENCE_LINK",
                           "FLOODLIGHT_CONFIG", "GOOGLE_AD_MANAGER"})

REQUEST_FIELDS = ("destinations", "events", "consent", "validate_only", "encoding",
                  "encryption_info")
DESTINATION_FIELDS = ("reference", "login_account", "linked_account", "operating_account",
                      "product_destination_id", "product")
ACCOUNT_FIELDS = ("product", "account_id", "account_type")
EVENT_FIELDS = ("destination_references", "transaction_id", "event_timestamp",
                "last_updated_timestamp", "user_data", "consent", "ad_identifiers", "currency",
                "conversion_value", "conversion_count", "event_source", "event_device_info",
                "cart_data", "custom_variables", "experimental_fields", "user_properties",
                "event_name", "client_id", "user_id", "additional_event_parameters",
                "third_party_user_data", "event_location", "app_instance_id")
AD_IDENTIFIER_FIELDS = ("session_attributes", "gclid", "gbraid", "wbraid",
                        "landing_page_device_info", "mobile_device_id", "dclid",
                        "impression_id", "match_id", "ppid", "visitor_ppid")
DEVICE_FIELDS = ("user_agent", "ip_address", "category", "language_code", "screen_height",
                 "screen_width", "operating_system", "operating_system_version", "model",
                 "brand", "browser", "browser_version")
USER_DATA_FIELDS = ("user_identifiers",)
IDENTIFIER_FIELDS = ("email_address", "phone_number", "address")
ADDRESS_FIELDS = ("given_name", "family_name", "region_code", "postal_code", "address_line",
                  "city", "administrative_area")
CONSENT_FIELDS = ("ad_user_data", "ad_personalization")

HEX_RE = re.compile(r"^[0-9a-fA-F]*$")
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
ACCOUNT_ID_RE = re.compile(r"^\d{10}$")
DIGITS_RE = re.compile(r"^\d{1,20}$")
CLICK_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{10,512}$")
REGION_RE = re.compile(r"^[A-Z]{2}$")
RFC3339_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$"
)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


class _Fields:
    """Accepts the proto3 JSON names of a message (lowerCamel and snake_case)."""

    def __init__(self, fields: tuple[str, ...]) -> None:
        self.by_json = {_camel(f): f for f in fields} | {f: f for f in fields}

    def read(self, obj: Any, where: str) -> dict[str, Any]:
        """The object's fields by snake_case name; unknown names fail the request."""
        if not isinstance(obj, dict):
            raise RpcError(400, f"Invalid JSON payload received. Expected an object at "
                           f"'{where}'.")
        out: dict[str, Any] = {}
        for key, value in obj.items():
            name = self.by_json.get(key)
            if name is None:
                raise unknown_field(key, where)
            if value is not None:  # proto3 JSON: null is the field's default
                out[name] = value
        return out


REQUEST = _Fields(REQUEST_FIELDS)
DESTINATION = _Fields(DESTINATION_FIELDS)
ACCOUNT = _Fields(ACCOUNT_FIELDS)
EVENT = _Fields(EVENT_FIELDS)
AD_IDENTIFIERS = _Fields(AD_IDENTIFIER_FIELDS)
DEVICE = _Fields(DEVICE_FIELDS)
USER_DATA = _Fields(USER_DATA_FIELDS)
IDENTIFIER = _Fields(IDENTIFIER_FIELDS)
ADDRESS = _Fields(ADDRESS_FIELDS)
CONSENT = _Fields(CONSENT_FIELDS)


def _enum(value: Any, allowed: frozenset[str], where: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise RpcError(400, f"Invalid value at '{where}', {json.dumps(value)}")
    return value


class _Violation(Exception):
    def __init__(self, path: str, reason: str, description: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.description = description


def _bad_request(violations: list[tuple[str, str, str]], request_id: str) -> RpcError:
    return RpcError(400, "Request contains an invalid argument.", details=[
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": violations[0][1],
         "domain": DOMAIN, "metadata": {"requestId": request_id}},
        {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
            {"field": field, "description": description, "reason": reason}
            for field, reason, description in violations]},
        {"@type": "type.googleapis.com/google.rpc.RequestInfo", "requestId": request_id},
    ])


def _check_hashed(value: Any, path: str, encoding: str) -> None:
    if not isinstance(value, str) or not value:
        raise _Violation(path, "INVALID_FORMAT", "must be a non-empty string")
    if encoding == "BASE64":
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _Violation(path, "INVALID_BASE64_ENCODING", "not valid base64") from None
    else:
        if not HEX_RE.match(value):
            raise _Violation(path, "INVALID_HEX_ENCODING", "not hex-encoded")
        raw = bytes.fromhex(value) if len(value) % 2 == 0 else b""
    if len(raw) != 32:
        raise _Violation(path, "INVALID_SHA256_FORMAT", "must be a SHA-256 digest (32 bytes)")


def _check_user_data(data: Any, where: str, encoding: str | None) -> None:
    fields = USER_DATA.read(data, where)
    identifiers = fields.get("user_identifiers")
    if not isinstance(identifiers, list) or not identifiers:
        raise _Violation(f"{where}.user_identifiers", "REQUIRED_FIELD_MISSING",
                         "at least one user identifier is required")
    if len(identifiers) > MAX_USER_IDENTIFIERS:
        raise _Violation(f"{where}.user_identifiers", "TOO_MANY_USER_IDENTIFIERS",
                         f"at most {MAX_USER_IDENTIFIERS} user identifiers per event")
    for position, item in enumerate(identifiers):
        path = f"{where}.user_identifiers[{position}]"
        ident = IDENTIFIER.read(item, path)
        if len(ident) != 1:
            raise RpcError(400, f"Invalid JSON payload received. oneof field 'identifier' is "
                           f"already set at '{path}'." if ident else
                           f"Invalid JSON payload received. Empty identifier at '{path}'.")
        if encoding is None:
            raise _Violation("encoding", "REQUIRED_FIELD_MISSING",
                             "encoding is required when user data is sent")
        name, value = next(iter(ident.items()))
        if name == "address":
            address = ADDRESS.read(value, f"{path}.address")
            for key in ("given_name", "family_name"):
                if key in address:
                    _check_hashed(address[key], f"{path}.address.{key}", encoding)
            region = address.get("region_code")
            if region is not None and not (isinstance(region, str) and REGION_RE.match(region)):
                raise _Violation(f"{path}.address.region_code", "INVALID_COUNTRY_CODE",
                                 "must be an ISO-3166-1 alpha-2 code")
        else:
            _check_hashed(value, f"{path}.{name}", encoding)


def _check_consent(value: Any, where: str) -> dict[str, str]:
    fields = CONSENT.read(value, where)
    return {k: _enum(v, CONSENT_VALUES, f"{where}.{k}") for k, v in fields.items()}


def _timestamp(value: Any, path: str) -> float:
    if not isinstance(value, str) or not RFC3339_RE.match(value):
        raise RpcError(400, f"Invalid value at '{path}' (type.googleapis.com/"
                       f"google.protobuf.Timestamp), {json.dumps(value)}")
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def validate_event(
    raw: Any, index: int, *, references: set[str], encoding: str | None, now: float,
    max_age: int, max_future: int,
) -> dict[str, Any]:
    """Validates one event; returns its fields by snake_case name.

    Raises:
        RpcError: A JSON-level problem (unknown field, bad enum): the whole request fails.
        _Violation: An invalid value (path relative to the event).
    """
    where = f"events[{index}]"
    event = EVENT.read(raw, where)
    if "event_source" in event:
        _enum(event["event_source"], EVENT_SOURCES, f"{where}.event_source")
    if "consent" in event:
        _check_consent(event["consent"], f"{where}.consent")
    refs = event.get("destination_references", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise RpcError(400, f"Invalid value at '{where}.destination_references'")
    ad = AD_IDENTIFIERS.read(event.get("ad_identifiers", {}), f"{where}.ad_identifiers")
    device = None
    if "landing_page_device_info" in ad:
        device = DEVICE.read(ad["landing_page_device_info"],
                             f"{where}.ad_identifiers.landing_page_device_info")
    for key in ("conversion_value", "conversion_count"):
        if key in event and not (isinstance(event[key], int | float)
                                 and not isinstance(event[key], bool)
                                 and math.isfinite(event[key])):
            raise RpcError(400, f"Invalid value at '{where}.{key}' (TYPE_DOUBLE)")
    if "event_timestamp" not in event:
        raise _Violation("event_timestamp", "REQUIRED_FIELD_MISSING", "is required")
    moment = _timestamp(event["event_timestamp"], f"{where}.event_timestamp")
    if now - moment > max_age or moment - now > max_future:
        raise _Violation("event_timestamp", "EVENT_TIME_INVALID",
                         "outside the acceptable time window")
    if event.get("event_source") in (None, "EVENT_SOURCE_UNSPECIFIED"):
        raise _Violation("event_source", "REQUIRED_FIELD_MISSING",
                         "is required for offline conversions and enhanced conversions for leads")
    for ref in refs:
        if ref not in references:
            raise _Violation("destination_references", "INVALID_DESTINATION",
                             f"no destination with reference {ref!r} in the request")
    if "transaction_id" in event and not (isinstance(event["transaction_id"], str)
                                          and 0 < len(event["transaction_id"]) <= 256):
        raise _Violation("transaction_id", "INVALID_FORMAT", "must be 1 to 256 characters")
    currency = event.get("currency")
    if currency is not None and not (isinstance(currency, str) and CURRENCY_RE.match(currency)):
        raise _Violation("currency", "INVALID_CURRENCY_CODE", "must be an ISO-4217 code")
    for key in ("gclid", "gbraid", "wbraid"):
        if key in ad and not (isinstance(ad[key], str) and ad[key]):
            raise _Violation(f"ad_identifiers.{key}", "INVALID_FORMAT",
                             "must be a non-empty string")
    if device is not None and "ip_address" in device:
        try:
            ipaddress.ip_address(device["ip_address"])
        except ValueError:
            raise _Violation("ad_identifiers.landing_page_device_info.ip_address",
                             "INVALID_FORMAT", "not an IP address") from None
    if "user_data" in event:
        _check_user_data(event["user_data"], "user_data", encoding)
    has_click = any(k in ad for k in ("gclid", "gbraid", "wbraid", "session_attributes"))
    if not has_click and "user_data" not in event:
        raise _Violation("", "NO_IDENTIFIERS_PROVIDED",
                         "an event needs ad identifiers or user data")
    event["ad_identifiers"] = ad
    event["destination_references"] = refs
    return event


def _read_destinations(fields: dict[str, Any], state: SandboxState) -> list[dict[str, Any]]:
    raw = fields.get("destinations")
    if not isinstance(raw, list) or not raw:
        raise _Violation("destinations", "REQUIRED_FIELD_MISSING", "at least one destination")
    if len(raw) > MAX_DESTINATIONS:
        raise _Violation("destinations", "TOO_MANY_DESTINATIONS",
                         f"at most {MAX_DESTINATIONS} destinations per request")
    config = state.config
    result = []
    seen: set[str] = set()
    for position, item in enumerate(raw):
        where = f"destinations[{position}]"
        dest = DESTINATION.read(item, where)
        accounts = {}
        for key in ("operating_account", "login_account", "linked_account"):
            if key in dest:
                account = ACCOUNT.read(dest[key], f"{where}.{key}")
                if "account_type" in account:
                    _enum(account["account_type"], ACCOUNT_TYPES, f"{where}.{key}.account_type")
                accounts[key] = account
        operating = accounts.get("operating_account")
        if operating is None:
            raise _Violation(f"{where}.operating_account", "REQUIRED_FIELD_MISSING",
                             "is required")
        for key, account in accounts.items():
            if account.get("account_type") != "GOOGLE_ADS":
                raise _Violation(f"{where}.{key}.account_type", "INVALID_DESTINATION",
                                 "conversions go to GOOGLE_ADS accounts")
            account_id = account.get("account_id")
            if not (isinstance(account_id, str) and ACCOUNT_ID_RE.match(account_id)):
                raise _Violation(f"{where}.{key}.account_id", "INVALID_FORMAT",
                                 "a Google Ads customer id: 10 digits, no hyphens")
        op_id = operating["account_id"]
        if op_id not in config.google_customers:
            raise RpcError(403, "The caller does not have permission", details=[{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "PERMISSION_DENIED", "domain": DOMAIN,
                "metadata": {"operatingAccount": op_id}}])
        login = accounts.get("login_account")
        if login is not None and login["account_id"] not in (
                config.google_customers | config.google_managers):
            raise RpcError(403, "The caller does not have permission", details=[{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "OPERATING_ACCOUNT_LOGIN_ACCOUNT_MISMATCH", "domain": DOMAIN}])
        product = dest.get("product_destination_id")
        if not isinstance(product, str) or not DIGITS_RE.match(product):
            raise _Violation(f"{where}.product_destination_id", "REQUIRED_FIELD_MISSING"
                             if product is None else "INVALID_CONVERSION_ACTION_ID",
                             "the numeric conversion action id")
        if product not in config.google_conversion_actions:
            raise _Violation(f"{where}.product_destination_id", "INVALID_CONVERSION_ACTION_ID",
                             f"conversion action {product} does not exist in {op_id}")
        reference = dest.get("reference")
        if reference is not None:
            if not isinstance(reference, str) or not reference:
                raise _Violation(f"{where}.reference", "INVALID_FORMAT", "must be a string")
            if reference in seen:
                raise _Violation(f"{where}.reference", "DUPLICATE_DESTINATION_REFERENCE",
                                 f"reference {reference!r} is used twice")
            seen.add(reference)
        result.append({"operating": op_id, "login": login["account_id"] if login else None,
                       "product": product, "reference": reference})
    return result


def _processing_errors(event: dict[str, Any]) -> list[str]:
    """Reasons Google drops a valid record while processing it (emulated ones)."""
    reasons = []
    consent = event.get("consent") or {}
    if (consent.get("ad_user_data") or consent.get("adUserData")) == "CONSENT_DENIED":
        reasons.append("PROCESSING_ERROR_REASON_DENIED_CONSENT")
    ad = event.get("ad_identifiers") or {}
    for key in ("gclid", "gbraid", "wbraid"):
        if key in ad and not CLICK_ID_RE.match(ad[key]):
            reasons.append(f"PROCESSING_ERROR_REASON_INVALID_{key.upper()}")
    return reasons


# -- request ids that carry their outcome -----------------------------------------------------

_TOKEN_PREFIX = "dm1."  # noqa: S105 - not a secret


def encode_request_id(payload: dict[str, Any]) -> str:
    """An opaque request id holding the request's outcome (survives sandbox restarts)."""
    raw = zlib.compress(json.dumps(payload, separators=(",", ":")).encode())
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_request_id(request_id: str) -> dict[str, Any] | None:
    """The outcome a request id holds, or None for ids this sandbox did not issue."""
    if not request_id.startswith(_TOKEN_PREFIX):
        return None
    text = request_id[len(_TOKEN_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        payload = json.loads(zlib.decompress(raw))
    except (ValueError, zlib.error, binascii.Error):
        return None
    return payload if isinstance(payload, dict) else None


# -- handlers -------------------------------------------------------------------------------


def _fault_error(fault: Any) -> RpcError | None:
    if isinstance(fault, GoogleErrorFault):
        details: list[dict[str, Any]] = []
        if fault.reason:
            details.append({"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": fault.reason, "domain": DOMAIN})
        if fault.retry_delay_s is not None:
            details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                            "retryDelay": f"{fault.retry_delay_s:g}s"})
        return RpcError(fault.http_status, fault.message or "Sandbox injected error",
                        status=fault.status, details=details)
    if isinstance(fault, ThrottleFault):
        return RpcError(fault.http_status or 429, "Quota exceeded for quota metric 'Ingestion "
                        "mutate requests' and limit 'Requests per minute'.",
                        status="RESOURCE_EXHAUSTED", details=[
                            {"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                             "reason": "RATE_LIMIT_EXCEEDED", "domain": "googleapis.com",
                             "metadata": {"quota_limit": "IngestionMutateRequestsPerMinute"}},
                            {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                             "retryDelay": "1s"}])
    return None


async def handle_ingest(state: SandboxState, request: Request) -> Response:
    """Handles one ``POST /v1/events:ingest``."""
    store = state.store
    fault = state.take_fault(PLATFORM_NAME)
    replaced = pre_processing_response(fault)
    error = _fault_error(fault)
    if replaced is not None or error is not None:
        store.count_request(PLATFORM_NAME, "rejected", faulted=True)
        return replaced if replaced is not None else error.response()  # type: ignore[union-attr]
    await pre_processing_delay(fault)
    request_id = new_request_id()
    config = state.config
    now = state.now()
    try:
        if not check_token(request, state):
            raise RpcError(401, "Request had invalid authentication credentials. Expected "
                           "OAuth 2 access token, login cookie or other valid authentication "
                           "credential.")
        fields = REQUEST.read(await read_json_object(request), "")
        if "encryption_info" in fields:
            raise RpcError(400, "encryption_info is not supported by the sandbox")
        validate_only = fields.get("validate_only", False)
        if not isinstance(validate_only, bool):
            raise RpcError(400, "Invalid value at 'validate_only' (TYPE_BOOL)")
        encoding = (_enum(fields["encoding"], ENCODINGS, "encoding")
                    if "encoding" in fields else None)
        if encoding == "ENCODING_UNSPECIFIED":
            encoding = None
        if "consent" in fields:
            _check_consent(fields["consent"], "consent")
        try:
            destinations = _read_destinations(fields, state)
        except _Violation as exc:
            raise _bad_request([(exc.path, exc.reason, exc.description)], request_id) from None
        raw_events = fields.get("events")
        if not isinstance(raw_events, list) or not raw_events:
            raise _bad_request([("events", "REQUIRED_FIELD_MISSING", "at least one event")],
                               request_id)
        if len(raw_events) > MAX_EVENTS:
            raise _bad_request([("events", "TOO_MANY_EVENTS",
                                 f"at most {MAX_EVENTS} events per request")], request_id)
        references = {d["reference"] for d in destinations if d["reference"]}
        events: list[dict[str, Any]] = []
        violations: list[tuple[str, str, str]] = []
        for index, raw in enumerate(raw_events):
            try:
                events.append(validate_event(
                    raw, index, references=references, encoding=encoding, now=now,
                    max_age=config.google_max_age_seconds,
                    max_future=config.max_future_seconds))
            except _Violation as exc:
                if exc.path == "encoding":
                    violations.append(("encoding", exc.reason, exc.description))
                else:
                    path = f"events.events[{index}]" + (f".{exc.path}" if exc.path else "")
                    violations.append((path, exc.reason, exc.description))
                events.append({})
        if isinstance(fault, RejectEventsFault):
            for index, event in enumerate(events):
                if event and fault.matches(index, event.get("transaction_id")):
                    violations.append((f"events.events[{index}]", fault.reason or
                                       "INVALID_EVENT", "rejected by the sandbox (fault "
                                       "injection)"))
        if violations:
            violations.sort(key=lambda v: (v[0] != "encoding", _index(v[0])))
            raise _bad_request(violations[:200], request_id)
    except RpcError as exc:
        store.count_request(PLATFORM_NAME, "rejected")
        response: Response = exc.response()
    else:
        outcome = _store(state, destinations, events, raw_events, now, validate_only)
        store.count_request(PLATFORM_NAME, "accepted")
        response = JSONResponse({"requestId": encode_request_id(outcome)})
    await post_processing_delay(fault)
    return response


def _index(path: str) -> int:
    match = re.search(r"events\[(\d+)\]", path)
    return int(match.group(1)) if match else -1


def _store(state: SandboxState, destinations: list[dict[str, Any]],
           events: list[dict[str, Any]], raw_events: list[Any], now: float,
           validate_only: bool) -> dict[str, Any]:
    """Stores the accepted records per destination; returns the request's outcome."""
    outcome: dict[str, Any] = {"t": now, "v": int(validate_only), "d": []}
    by_reference = {d["reference"]: d for d in destinations if d["reference"]}
    per_destination: dict[int, list[EventInput]] = {i: [] for i in range(len(destinations))}
    errors: dict[int, dict[str, int]] = {i: {} for i in range(len(destinations))}
    for event, raw in zip(events, raw_events, strict=True):
        refs = event["destination_references"]
        targets = ([destinations.index(by_reference[r]) for r in refs] if refs
                   else list(range(len(destinations))))
        reasons = _processing_errors(event)
        moment = int(_timestamp(event["event_timestamp"], "event_timestamp"))
        for target in targets:
            if reasons:
                for reason in reasons:
                    errors[target][reason] = errors[target].get(reason, 0) + 1
                continue
            per_destination[target].append(EventInput(
                destinations[target]["product"], event.get("transaction_id"), moment, raw))
    for position, dest in enumerate(destinations):
        inputs = per_destination[position]
        if inputs:
            state.store.record_events(
                PLATFORM_NAME, dest["operating"], inputs, received_at=now,
                dedup_window_seconds=DEDUP_WINDOW_SECONDS,
                test_event_code="validateOnly" if validate_only else None)
        outcome["d"].append({"o": dest["operating"], "l": dest["login"], "p": dest["product"],
                             "r": dest["reference"], "n": len(inputs), "e": errors[position]})
    return outcome


def _destination_json(entry: dict[str, Any]) -> dict[str, Any]:
    dest: dict[str, Any] = {"operatingAccount": {"accountType": "GOOGLE_ADS",
                                                 "accountId": entry["o"]}}
    if entry.get("l"):
        dest["loginAccount"] = {"accountType": "GOOGLE_ADS", "accountId": entry["l"]}
    dest["productDestinationId"] = entry["p"]
    if entry.get("r"):
        dest["reference"] = entry["r"]
    return dest


def handle_status(state: SandboxState, request: Request, request_id: str | None) -> Response:
    """Handles one ``GET /v1/requestStatus:retrieve``."""
    if not check_token(request, state):
        return RpcError(401, "Request had invalid authentication credentials.").response()
    outcome = decode_request_id(request_id or "")
    if outcome is None or outcome.get("v"):
        return RpcError(400, "Request contains an invalid argument.", details=[
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_REQUEST_ID",
             "domain": DOMAIN},
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
                {"field": "request_id", "reason": "INVALID_REQUEST_ID",
                 "description": "unknown request id, or a validate_only request"}]},
        ]).response()
    processing = state.now() < outcome["t"] + state.config.datamanager_processing_seconds
    statuses = []
    for entry in outcome["d"]:
        item: dict[str, Any] = {"destination": _destination_json(entry)}
        if processing:
            item["requestStatus"] = "PROCESSING"
        else:
            errors: dict[str, int] = entry["e"]
            failed = sum(errors.values())
            if not failed:
                item["requestStatus"] = "SUCCESS"
            elif entry["n"] == 0:
                item["requestStatus"] = "FAILED"
            else:
                item["requestStatus"] = "PARTIAL_SUCCESS"
            if failed:
                item["errorInfo"] = {"errorCounts": [
                    {"recordCount": str(count), "reason": reason}
                    for reason, count in sorted(errors.items())]}
            item["eventsIngestionStatus"] = {"recordCount": str(entry["n"])}
        statuses.append(item)
    return JSONResponse({"requestStatusPerDestination": statuses})


def build_routers(state: SandboxState) -> list[APIRouter]:
    """The Data Manager API router and its control routes."""
    api = APIRouter(tags=["google data manager"])

    @api.post("/v1/events:ingest")
    async def ingest(request: Request) -> Response:
        """Data Manager API: upload conversion events to Google Ads destinations."""
        return await handle_ingest(state, request)

    @api.get("/v1/requestStatus:retrieve")
    def retrieve(request: Request, requestId: str | None = None) -> Response:
        """Data Manager API: the processing status of an ingest request."""
        return handle_status(state, request, requestId)

    control = APIRouter(prefix="/_sandbox/google_datamanager", tags=["sandbox control"])

    @control.get("/events")
    def list_events(
        customer_id: str | None = None,
        unique: bool = False,
        test: bool = Query(False, description="true: only validateOnly events"),
        conversion_action: str | None = None,
        transaction_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored records in receive order (``destination`` = operating account,
        ``event_name`` = conversion action id, ``event_id`` = transactionId)."""
        return state.store.list_events(PLATFORM_NAME, destination=customer_id, unique=unique,
                                       test=test, event_name=conversion_action,
                                       event_id=transaction_id)

    return [api, control]


PLATFORM = PlatformSpec(
    name=PLATFORM_NAME,
    build_routers=build_routers,
    fault_kinds=frozenset({"google_error", "throttle", "reject_events"}),
)

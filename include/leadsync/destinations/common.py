"""Small pure helpers shared by the destination modules (row values, money, retry hints)."""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

_CURRENCY_RE = re.compile(r"^[A-Za-z]{3}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def raw_text(row: Mapping[str, Any], column: str) -> str | None:
    """A column's value as trimmed text, or None when absent or blank."""
    value = row.get(column)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def base_url(host: str | None, default: str) -> str:
    """The API base URL of a connection: its host (https assumed when no scheme is given, no
    trailing slash), else the platform's ``default``."""
    base = (host or default).strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        base = f"https://{base}"
    return base


def client_ip(row: Mapping[str, Any]) -> str | None:
    """The row's ``client_ip`` in canonical form, or None when absent or not an IP address."""
    text = raw_text(row, "client_ip")
    if text is None:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def is_true(value: Any) -> bool:
    """Whether a warehouse boolean is true (``True``, 1, ``"true"``, ``"t"``, ``"1"``)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "t", "1", "yes", "y")
    return value is True or (isinstance(value, int) and not isinstance(value, bool)
                             and value == 1)


def is_false(value: Any) -> bool:
    """Whether a warehouse boolean is explicitly false (NULL is neither true nor false)."""
    if isinstance(value, str):
        return value.strip().lower() in ("false", "f", "0", "no", "n")
    return value is False or (isinstance(value, int) and not isinstance(value, bool)
                              and value == 0)


def money(value: Any) -> float | None:
    """A non-negative finite amount as float, or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    if not number.is_finite() or number < 0:
        return None
    result = float(number)
    return result if math.isfinite(result) else None


def currency_code(row: Mapping[str, Any]) -> str | None:
    """The row's ISO-4217 currency, upper-case, or None when absent or malformed."""
    currency = raw_text(row, "currency")
    if currency and _CURRENCY_RE.match(currency):
        return currency.upper()
    return None


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a ``Retry-After`` header (numeric form only), or None."""
    for key, value in headers.items():
        if key.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


def duration_seconds(value: Any) -> float | None:
    """Seconds of a protobuf JSON ``Duration`` (``"30s"``, ``"1.5s"``), or None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return max(0.0, float(value))
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1))
    if isinstance(value, Mapping):  # {"seconds": "30", "nanos": 0}
        try:
            return float(value.get("seconds", 0)) + float(value.get("nanos", 0)) / 1e9
        except (TypeError, ValueError):
            return None
    return None


def load_json(body: str) -> Any:
    """The decoded body, or None when it is empty or not JSON."""
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def snippet(body: str, limit: int = 120) -> str:
    """A body squeezed to one short line for error messages."""
    return " ".join(body.split())[:limit]

"""The shape every destination module has.

A destination module (``meta.py``, later ``tiktok.py``, ``google_datamanager.py``, ...) is
pure: limits as data, eligibility, event building, request building and response parsing as
functions, and a credentials type validated from an Airflow connection's fields. HTTP lives in
:mod:`leadsync.destinations.http`, retries and batch splitting in :mod:`leadsync.delivery`.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from leadsync.config import DestinationConfig

MASK = "***"


class CredentialsError(ValueError):
    """A connection lacks a field or has a malformed one (the message names it)."""


class FatalDestinationError(RuntimeError):
    """The run cannot go on (bad token, unknown pixel, no permission): fix config first."""


@dataclass(frozen=True)
class Limits:
    """What a platform accepts in one request and for how long after the event."""

    max_batch_events: int
    max_event_age: timedelta | None  # None = no platform limit
    # Staging keeps this much margin from max_event_age so that a batch staged now is still
    # in the window when it is sent (or retried) later.
    stage_margin: timedelta = timedelta(hours=1)
    send_margin: timedelta = timedelta(minutes=1)


@dataclass(frozen=True)
class Skip:
    """A row that will not be sent, and why (a stable reason code)."""

    reason: str
    expired: bool = False


@dataclass(frozen=True)
class HttpRequest:
    """One request as the platform receives it; ``secrets`` name body/header keys to mask."""

    method: str
    url: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    secret_body_keys: tuple[str, ...] = ()
    secret_headers: tuple[str, ...] = ()

    def masked(self) -> dict[str, Any]:
        """The request with every secret replaced by ``***`` (for render and logs)."""
        body = {k: (MASK if k in self.secret_body_keys else v) for k, v in self.body.items()}
        headers = {
            k: (MASK if k in self.secret_headers else v) for k, v in self.headers.items()
        }
        return {"method": self.method, "url": self.url, "headers": headers, "body": body}


class ResultKind(enum.Enum):
    """How a response is handled."""

    OK = "ok"  # accepted; ``received`` says how many
    TRANSIENT = "transient"  # retry the same request later (same ids: the platform dedups)
    PERMANENT = "permanent"  # the request is rejected as is: isolate the bad events
    FATAL = "fatal"  # credentials/config: stop the run with a clear message


@dataclass(frozen=True)
class SendResult:
    """A platform response, classified."""

    kind: ResultKind
    message: str = ""
    received: int | None = None
    retry_after: float | None = None
    code: str | None = None
    # Index in the request → error message, when the platform names the bad events.
    event_errors: Mapping[int, str] = field(default_factory=dict)


class Destination(Protocol):
    """The functions and data a destination module provides."""

    TYPE: str
    LIMITS: Limits

    def parse_credentials(
        self, host: str | None, password: str | None, extra: Mapping[str, Any]
    ) -> Any:
        """Validates a connection's fields into the module's credentials type."""

    def check_row(self, row: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
        """Consent and match-key eligibility of one source row."""

    def build_event(
        self,
        row: Mapping[str, Any],
        dest: DestinationConfig,
        event_name: str,
        event_id: str,
        event_time: datetime,
    ) -> dict[str, Any]:
        """The platform's event object for one row, identifiers hashed."""

    def check_event(self, event: Mapping[str, Any], dest: DestinationConfig) -> Skip | None:
        """Match keys and shape rules that only the built event can tell."""

    def build_request(
        self, events: list[dict[str, Any]], creds: Any, dest: DestinationConfig
    ) -> HttpRequest:
        """The request that sends ``events``."""

    def parse_response(
        self, status: int, body: str, headers: Mapping[str, str], n_sent: int
    ) -> SendResult:
        """Classifies a response."""


def derive_event_id(lead_id: Any, stage: str) -> str:
    """The deterministic event id of a (lead, stage) when the row carries none.

    Stable across runs, retries and reprocessing, so the platforms can deduplicate; it
    reveals nothing about the lead beyond the CRM id it is derived from.
    """
    digest = hashlib.sha256(f"leadsync|{lead_id}|{stage}".encode()).hexdigest()
    return f"ls_{digest[:32]}"

"""The shape every destination module has.

A destination module (``meta.py``, ``tiktok.py``, ``google_datamanager.py``,
``google_ads.py``) is pure: limits as data, eligibility, event building, request building and
response parsing as functions, and a credentials type validated from an Airflow connection's
fields. HTTP lives in :mod:`leadsync.destinations.http`, retries and batch splitting in
:mod:`leadsync.delivery`. Adding a platform is one module of this shape, its sandbox emulator
and its tests.

Two optional attributes tell the data contract (:mod:`leadsync.quality`) what the platform
needs: ``IDENTIFIER_RULES`` (the :class:`leadsync.identity.Ruleset` its events are built with:
an email, phone or country it cannot use is dropped and counted, not quarantined) and
``MATCH_KEY_GROUPS`` (groups of source columns it can match on; a row with no group of usable
values is quarantined ``no_match_keys``, as :func:`check_event`'s ``no_match_keys`` is).

How a response is classified is the module's business; what happens next is the sender's,
the same for every platform (:class:`SendResult`):

* the whole request may be accepted (``OK``), retried (``TRANSIENT``), rejected as a whole
  (``PERMANENT``: the sender isolates the bad events and resends the rest) or fatal;
* an accepted request may still name per-event outcomes (``event_errors`` failed for good,
  ``event_duplicates`` already delivered by an earlier request, ``event_deferred`` to retry in
  a later run): Google Ads API partial failures;
* a rejected request may name its bad events (``event_errors``): TikTok's ``Batch.<i>``
  messages, Data Manager's BadRequest field violations;
* an accepted request may come with a ``receipt`` (the platform's request id) when the
  platform processes asynchronously: modules that can look the receipt up later provide the
  optional :class:`RequestStatusChecker` functions (Data Manager ``requestStatus:retrieve``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from leadsync.hashing import sha256_hex

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
    # How long the platform deduplicates a resent event id (None = no known expiry). A
    # reprocess never resends a delivered event older than this: it would be counted twice.
    dedup_window: timedelta | None = None


@dataclass(frozen=True)
class Skip:
    """A row that will not be sent, and why (a stable reason code)."""

    reason: str
    expired: bool = False


#: Returns headers (``Authorization: Bearer ...``) minted when the request is sent, so that a
#: request built once and retried later carries a fresh token. Raises
#: :class:`FatalDestinationError` when the credentials are refused, and
#: :class:`leadsync.destinations.http.TransportError` when the token endpoint is unreachable.
AuthHeaders = Callable[[], Mapping[str, str]]


@dataclass(frozen=True)
class HttpRequest:
    """One request as the platform receives it; ``secrets`` name body/header keys to mask.

    ``auth``, when set, adds headers at send time (OAuth access tokens); they are never part
    of what :meth:`masked` shows, which lists their names only.
    """

    method: str
    url: str
    body: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    secret_body_keys: tuple[str, ...] = ()
    secret_headers: tuple[str, ...] = ()
    auth: AuthHeaders | None = field(default=None, compare=False, repr=False)
    auth_header_names: tuple[str, ...] = ("Authorization",)

    def masked(self) -> dict[str, Any]:
        """The request with every secret replaced by ``***`` (for render and logs)."""
        body = (
            None
            if self.body is None
            else {k: (MASK if k in self.secret_body_keys else v) for k, v in self.body.items()}
        )
        headers = {
            k: (MASK if k in self.secret_headers else v) for k, v in self.headers.items()
        }
        if self.auth is not None:
            headers.update(dict.fromkeys(self.auth_header_names, MASK))
        return {"method": self.method, "url": self.url, "headers": headers, "body": body}


class ResultKind(enum.Enum):
    """How a response is handled."""

    OK = "ok"  # accepted; ``received`` says how many
    TRANSIENT = "transient"  # retry the same request later (same ids: the platform dedups)
    PERMANENT = "permanent"  # the request is rejected as is: isolate the bad events
    FATAL = "fatal"  # credentials/config: stop the run with a clear message


@dataclass(frozen=True)
class SendResult:
    """A platform response, classified.

    Indices are positions in the request's event list. With ``OK``, ``received`` counts the
    events accepted by *this* request (None: all not named in the per-event fields), and the
    per-event fields say what happened to the others; with ``PERMANENT``, ``event_errors``
    names the events that sank the request (the sender resends the rest).
    """

    kind: ResultKind
    message: str = ""
    received: int | None = None
    retry_after: float | None = None
    code: str | None = None
    # Index in the request → error message, when the platform names the bad events.
    event_errors: Mapping[int, str] = field(default_factory=dict)
    # Events the platform already has from an earlier request (Google Ads
    # ORDER_ID_ALREADY_IN_USE): delivered, by that earlier request.
    event_duplicates: Collection[int] = frozenset()
    # Index → message for events the platform asks to send again later (Google Ads
    # TOO_RECENT_EVENT): they stay pending in the outbox for the next run.
    event_deferred: Mapping[int, str] = field(default_factory=dict)
    # The platform's id of an accepted request whose processing finishes later (Data
    # Manager requestId); kept with each event so a later run can look its status up.
    receipt: str | None = None


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


@dataclass(frozen=True)
class RequestStatus:
    """The processing status of an accepted request, as the platform reports it later.

    Attributes:
        state: ``SUCCESS``, ``PARTIAL_SUCCESS``, ``FAILED``, ``PROCESSING`` or ``UNKNOWN``
            (the platform's word, for the request as a whole).
        done: Whether the status is final (no need to ask again).
        counts: Per-destination record counts (``{"<destination>": {"ingested": n,
            "error.<REASON>": n, "warning.<REASON>": n}}``), JSON-ready.
        failed_destinations: Destinations (event names, e.g. conversion action ids) whose
            every record failed: their events are dead letters now.
        message: A short explanation for logs.
    """

    state: str
    done: bool
    counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    failed_destinations: Collection[str] = frozenset()
    message: str = ""


class RequestStatusChecker(Protocol):
    """Optional functions of a destination whose platform processes requests asynchronously.

    A module provides both or neither; :func:`checks_request_status` tells.
    """

    def build_status_request(self, receipt: str, creds: Any) -> HttpRequest:
        """The request that asks for the status of the request with id ``receipt``."""

    def parse_status_response(
        self, status: int, body: str, headers: Mapping[str, str]
    ) -> RequestStatus | SendResult:
        """The status, or a :class:`SendResult` (``TRANSIENT``/``FATAL``) when the lookup
        itself failed."""


def checks_request_status(module: Destination | ModuleType) -> bool:
    """Whether a destination module provides the :class:`RequestStatusChecker` functions."""
    return callable(getattr(module, "build_status_request", None)) and callable(
        getattr(module, "parse_status_response", None)
    )


def derive_event_id(lead_id: Any, stage: str) -> str:
    """The deterministic event id of a (lead, stage) when the row carries none.

    Stable across runs, retries and reprocessing, so the platforms can deduplicate; it
    reveals nothing about the lead beyond the CRM id it is derived from.
    """
    digest = sha256_hex(f"leadsync|{lead_id}|{stage}")
    return f"ls_{digest[:32]}"

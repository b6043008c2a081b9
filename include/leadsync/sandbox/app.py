"""The sandbox application: shared store, fault queue, control routes and the app factory.

The sandbox is a loopback emulator of the ad platforms' conversion APIs. Each platform lives in a
sibling module (``meta.py``, ``tiktok.py``, ``google_datamanager.py``, ``google_ads.py``,
``linkedin.py``, ``snapchat.py``) that
exposes a :class:`PlatformSpec` named ``PLATFORM``; :func:`create_app` mounts every module listed in
:data:`PLATFORM_MODULES`. The pieces shared by all platforms live here:

* :class:`SandboxConfig`: tokens, ids, time limits and an injectable clock.
* :class:`EventStore`: every accepted event (SQLite, in memory or on disk), dedup and counters.
* :class:`FaultQueue`: per-platform FIFO of injected faults, one consumed per platform request.
* Control routes under ``/_sandbox/``: ``health``, ``stats``, ``reset``, ``faults``.

Platform routers follow one request protocol (see ``meta.py``): count the request, take a fault
with :meth:`SandboxState.take_fault`, answer generic faults with :func:`pre_processing_response`,
validate, store with :meth:`EventStore.record_events`, and honour ``timeout_after_processing``
with :func:`post_processing_delay`.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

#: Modules that define a platform emulator (each exposes ``PLATFORM: PlatformSpec``).
PLATFORM_MODULES: tuple[str, ...] = (
    # Snap's /v3/{pixel}/events is mounted before Meta's /{version}/{pixel}/events, which
    # would otherwise answer it with "invalid API version" (routes match in mount order).
    "leadsync.sandbox.snapchat",
    "leadsync.sandbox.meta",
    "leadsync.sandbox.tiktok",
    "leadsync.sandbox.google_datamanager",
    "leadsync.sandbox.google_ads",
    "leadsync.sandbox.linkedin",
    "leadsync.sandbox.pinterest",
    "leadsync.sandbox.reddit",
)

_ONE_DAY = 24 * 3600


@dataclass
class SandboxConfig:
    """Configuration of one sandbox instance.

    Attributes:
        meta_tokens: Access tokens the Meta emulator accepts.
        meta_pixels: Pixel (dataset) ids the Meta emulator knows.
        store_path: ``None`` keeps events in memory; a file path keeps them in a SQLite file so
            accepted events and dedup keys survive a restart.
        max_future_seconds: How far in the future an ``event_time`` may be.
        max_age_seconds: How old an ``event_time`` may be (Meta: 7 days).
        dedup_window_seconds: How long an ``event_id`` deduplicates (Meta: 48 hours).
        clock: Returns "now" as Unix seconds; tests freeze or advance it.
        tiktok_tokens: Access tokens the TikTok emulator accepts (``Access-Token`` header).
        tiktok_event_sources: Event source ids it knows (CRM event sets and pixel codes).
        google_tokens: Bearer tokens both Google emulators accept (no OAuth is emulated: the
            connection carries one of these as a static ``access_token``).
        google_customers: Google Ads accounts (10 digits) the token may operate.
        google_managers: Manager accounts that may be the login account of those.
        google_conversion_actions: Conversion action ids that exist in every customer.
        google_ads_allowlisted: Customers still allowlisted for Google Ads API click
            conversion upload (others get CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE).
        google_max_age_seconds: How old a Google conversion may be (the click-through window).
        datamanager_processing_seconds: How long a Data Manager request stays PROCESSING
            before ``requestStatus:retrieve`` reports its outcome.
        linkedin_tokens: Bearer tokens the LinkedIn emulator accepts.
        linkedin_conversion_rules: Conversion rule ids (CONVERSIONS_API) it knows.
        linkedin_min_version: The oldest ``LinkedIn-Version`` still served (older: 426).
        snapchat_tokens: Conversions API tokens the Snap emulator accepts.
        snapchat_pixels: Snap Pixel ids those tokens may send to.
        snapchat_max_age_seconds: How old a Snap ``event_time`` may be.
        pinterest_tokens: Conversion access tokens the Pinterest emulator accepts (Bearer).
        pinterest_ad_accounts: Pinterest ad account ids those tokens may send to.
        reddit_tokens: Conversion access tokens the Reddit emulator accepts (Bearer).
        reddit_pixels: Reddit pixel ids those tokens may send to.
        reddit_max_age_seconds: How old a Reddit ``event_at`` may be (7 days).
    """

    meta_tokens: set[str] = field(default_factory=lambda: {"sandbox-meta-token"})
    meta_pixels: set[str] = field(default_factory=lambda: {"1234567890123456"})
    store_path: str | None = None
    max_future_seconds: int = 60
    max_age_seconds: int = 7 * _ONE_DAY
    dedup_window_seconds: int = 2 * _ONE_DAY
    clock: Callable[[], float] = time.time
    tiktok_tokens: set[str] = field(default_factory=lambda: {"sandbox-tiktok-token"})
    tiktok_event_sources: set[str] = field(
        default_factory=lambda: {"SANDBOXCRM00000000001", "SANDBOXPIXEL000000001"}
    )
    google_tokens: set[str] = field(default_factory=lambda: {"sandbox-google-token"})
    google_customers: set[str] = field(default_factory=lambda: {"1234567890"})
    google_managers: set[str] = field(default_factory=lambda: {"9876543210"})
    google_conversion_actions: set[str] = field(
        default_factory=lambda: {"1000000001", "1000000002", "1000000003", "1000000004"}
    )
    google_ads_allowlisted: set[str] | None = None  # None: every google_customers account
    google_max_age_seconds: int = 90 * _ONE_DAY
    datamanager_processing_seconds: float = 0.0
    linkedin_tokens: set[str] = field(default_factory=lambda: {"sandbox-linkedin-token"})
    linkedin_conversion_rules: set[str] = field(
        default_factory=lambda: {"20000001", "20000002", "20000003", "20000004"}
    )
    linkedin_min_version: str = "202511"
    snapchat_tokens: set[str] = field(default_factory=lambda: {"sandbox-snapchat-token"})
    snapchat_pixels: set[str] = field(
        default_factory=lambda: {"5a9d5a9d-0000-4000-8000-000000000001"}
    )
    snapchat_max_age_seconds: int = 37 * _ONE_DAY
    pinterest_tokens: set[str] = field(default_factory=lambda: {"sandbox-pinterest-token"})
    pinterest_ad_accounts: set[str] = field(default_factory=lambda: {"549755885175"})
    reddit_tokens: set[str] = field(default_factory=lambda: {"sandbox-reddit-token"})
    reddit_pixels: set[str] = field(default_factory=lambda: {"t2_sandbox01"})
    reddit_max_age_seconds: int = 7 * _ONE_DAY


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventInput:
    """One accepted event handed to the store.

    Attributes:
        event_name: The platform's event name (part of the dedup key).
        event_id: The dedup id, or ``None`` (such events never deduplicate).
        event_time: The event's own time, Unix seconds.
        payload: The event object exactly as received (decoded JSON).
    """

    event_name: str
    event_id: str | None
    event_time: int
    payload: dict[str, Any]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    platform TEXT NOT NULL,
    destination TEXT NOT NULL,
    event_name TEXT NOT NULL,
    event_id TEXT,
    event_time INTEGER NOT NULL,
    received_at REAL NOT NULL,
    test_event_code TEXT,
    is_test INTEGER NOT NULL,
    duplicate INTEGER NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_dedup
    ON events (platform, destination, event_name, event_id, is_test, duplicate, received_at);
CREATE TABLE IF NOT EXISTS request_stats (
    platform TEXT PRIMARY KEY,
    requests INTEGER NOT NULL DEFAULT 0,
    accepted_requests INTEGER NOT NULL DEFAULT 0,
    rejected_requests INTEGER NOT NULL DEFAULT 0,
    faulted_requests INTEGER NOT NULL DEFAULT 0
);
"""

RequestOutcome = Literal["accepted", "rejected"]


class EventStore:
    """Thread-safe record of accepted events and request counters, backed by SQLite.

    One connection is shared by every thread and guarded by a lock, so uvicorn may serve from a
    background thread while tests read. ``path=None`` uses a private in-memory database.

    Dedup: an event is a duplicate when an earlier non-duplicate event with the same
    (platform, destination, event_name, event_id) and the same test/live flag was received within
    ``dedup_window_seconds`` before it. Duplicates are stored (flagged) and still count in
    ``events_received``, as the platforms do.
    """

    def __init__(self, path: str | None = None) -> None:
        """Opens (and creates if needed) the store.

        Args:
            path: SQLite file path, or ``None`` for in-memory.
        """
        self.path = path
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            path or ":memory:", check_same_thread=False, isolation_level=None
        )
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.executescript(_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        """Closes the underlying connection."""
        with self._lock:
            self._conn.close()

    def count_request(
        self, platform: str, outcome: RequestOutcome, *, faulted: bool = False
    ) -> None:
        """Counts one platform request.

        Args:
            platform: Platform name, e.g. ``"meta"``.
            outcome: Whether the request was accepted or rejected.
            faulted: Whether an injected fault answered it.
        """
        accepted = 1 if outcome == "accepted" else 0
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO request_stats (platform, requests, accepted_requests,"
                " rejected_requests, faulted_requests) VALUES (?, 1, ?, ?, ?)"
                " ON CONFLICT (platform) DO UPDATE SET requests = requests + 1,"
                " accepted_requests = accepted_requests + excluded.accepted_requests,"
                " rejected_requests = rejected_requests + excluded.rejected_requests,"
                " faulted_requests = faulted_requests + excluded.faulted_requests",
                (platform, accepted, 1 - accepted, int(faulted)),
            )

    def record_events(
        self,
        platform: str,
        destination: str,
        events: Sequence[EventInput],
        *,
        received_at: float,
        dedup_window_seconds: float,
        test_event_code: str | None = None,
    ) -> list[bool]:
        """Stores a batch of accepted events atomically and deduplicates them.

        Args:
            platform: Platform name, e.g. ``"meta"``.
            destination: The pixel / dataset / account the events were sent to.
            events: The accepted events, in request order.
            received_at: Receive time (Unix seconds, from the sandbox clock).
            dedup_window_seconds: Dedup window length.
            test_event_code: The request's test code; such events are stored flagged as test
                events and deduplicate only among themselves.

        Returns:
            One flag per event: ``True`` when it was a duplicate.
        """
        is_test = int(test_event_code is not None)
        since = received_at - dedup_window_seconds
        flags: list[bool] = []
        with self._transaction() as conn:
            for event in events:
                duplicate = False
                if event.event_id is not None:
                    row = conn.execute(
                        "SELECT 1 FROM events WHERE platform = ? AND destination = ?"
                        " AND event_name = ? AND event_id = ? AND is_test = ? AND duplicate = 0"
                        " AND received_at > ? LIMIT 1",
                        (platform, destination, event.event_name, event.event_id, is_test, since),
                    ).fetchone()
                    duplicate = row is not None
                conn.execute(
                    "INSERT INTO events (platform, destination, event_name, event_id, event_time,"
                    " received_at, test_event_code, is_test, duplicate, payload)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        platform,
                        destination,
                        event.event_name,
                        event.event_id,
                        event.event_time,
                        received_at,
                        test_event_code,
                        is_test,
                        int(duplicate),
                        json.dumps(event.payload, sort_keys=True),
                    ),
                )
                flags.append(duplicate)
        return flags

    def list_events(
        self,
        platform: str,
        *,
        destination: str | None = None,
        unique: bool = False,
        test: bool = False,
        event_name: str | None = None,
        event_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Lists stored events in receive order.

        Args:
            platform: Platform name.
            destination: Only events sent to this pixel / dataset / account.
            unique: Only events that were not duplicates.
            test: ``False`` lists live events, ``True`` lists test events only.
            event_name: Only events with this name.
            event_id: Only events with this id.

        Returns:
            One dict per event: ``seq``, ``destination``, ``event_name``, ``event_id``,
            ``event_time``, ``received_at``, ``test_event_code``, ``duplicate``, ``event``.
        """
        sql = "SELECT * FROM events WHERE platform = ? AND is_test = ?"
        params: list[Any] = [platform, int(test)]
        for column, value in (
            ("destination", destination),
            ("event_name", event_name),
            ("event_id", event_id),
        ):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        if unique:
            sql += " AND duplicate = 0"
        sql += " ORDER BY seq"
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [
            {
                "seq": row["seq"],
                "destination": row["destination"],
                "event_name": row["event_name"],
                "event_id": row["event_id"],
                "event_time": row["event_time"],
                "received_at": row["received_at"],
                "test_event_code": row["test_event_code"],
                "duplicate": bool(row["duplicate"]),
                "event": json.loads(row["payload"]),
            }
            for row in rows
        ]

    def stats(self, platforms: Sequence[str]) -> dict[str, dict[str, int]]:
        """Returns request and event counters per platform.

        ``events_received`` counts every stored event (live and test); ``unique_events`` and
        ``duplicate_events`` count live events only; ``test_events`` counts test events.

        Args:
            platforms: Platforms to report (each appears even with no traffic).

        Returns:
            ``{platform: {requests, accepted_requests, rejected_requests, faulted_requests,
            events_received, unique_events, duplicate_events, test_events}}``.
        """
        result: dict[str, dict[str, int]] = {}
        with self._lock:
            for platform in platforms:
                req = self._conn.execute(
                    "SELECT requests, accepted_requests, rejected_requests, faulted_requests"
                    " FROM request_stats WHERE platform = ?",
                    (platform,),
                ).fetchone()
                ev = self._conn.execute(
                    "SELECT COUNT(*) AS received,"
                    " COALESCE(SUM(is_test = 0 AND duplicate = 0), 0) AS uniq,"
                    " COALESCE(SUM(is_test = 0 AND duplicate = 1), 0) AS dup,"
                    " COALESCE(SUM(is_test = 1), 0) AS test"
                    " FROM events WHERE platform = ?",
                    (platform,),
                ).fetchone()
                result[platform] = {
                    "requests": req["requests"] if req else 0,
                    "accepted_requests": req["accepted_requests"] if req else 0,
                    "rejected_requests": req["rejected_requests"] if req else 0,
                    "faulted_requests": req["faulted_requests"] if req else 0,
                    "events_received": ev["received"],
                    "unique_events": ev["uniq"],
                    "duplicate_events": ev["dup"],
                    "test_events": ev["test"],
                }
        return result

    def reset(self) -> None:
        """Deletes every stored event and counter."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM events")
            conn.execute("DELETE FROM request_stats")


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


class FaultBase(BaseModel):
    """Fields shared by every fault kind."""

    model_config = ConfigDict(extra="forbid")

    times: int = Field(default=1, ge=1, description="How many matching requests it applies to.")


class GraphErrorFault(FaultBase):
    """Answer with a Meta Graph error envelope (before validation)."""

    kind: Literal["graph_error"]
    code: int
    subcode: int | None = None
    is_transient: bool = True
    message: str | None = None
    type: str = "OAuthException"
    error_user_title: str | None = None
    error_user_msg: str | None = None
    http_status: int | None = Field(
        default=None, ge=400, le=599, description="Default: 500 if transient, else 400."
    )


class HttpFault(FaultBase):
    """Answer with a raw HTTP status and a (typically non-JSON) body (before validation)."""

    kind: Literal["http"]
    status: int = Field(default=502, ge=400, le=599)
    body: str = "<html>Bad Gateway</html>"
    content_type: str = "text/html"


class SlowFault(FaultBase):
    """Sleep, then process the request normally."""

    kind: Literal["slow"]
    delay_s: float = Field(default=2.0, ge=0, le=600)


class TimeoutAfterProcessingFault(FaultBase):
    """Process (and store) the request, then sleep before answering: the lost-response case."""

    kind: Literal["timeout_after_processing"]
    delay_s: float = Field(default=5.0, ge=0, le=600)


class ThrottleFault(FaultBase):
    """Answer with the platform's throttling error (before validation)."""

    kind: Literal["throttle"]
    code: int = 17
    http_status: int | None = Field(
        default=None, ge=400, le=599, description="Platform default when omitted."
    )


class TikTokErrorFault(FaultBase):
    """Answer with a TikTok Business API envelope ``{"code", "message"}`` (before validation)."""

    kind: Literal["tiktok_error"]
    code: int = 40700
    message: str | None = None
    http_status: int = Field(default=200, ge=200, le=599, description="TikTok uses 200.")


class GoogleErrorFault(FaultBase):
    """Answer with a ``google.rpc.Status`` error (before validation), for both Google APIs.

    ``reason`` is an ``ErrorInfo`` reason for Data Manager and a ``GoogleAdsError`` code such
    as ``quotaError.RESOURCE_EXHAUSTED`` for the Google Ads API.
    """

    kind: Literal["google_error"]
    http_status: int = Field(default=503, ge=400, le=599)
    status: str = "UNAVAILABLE"
    message: str | None = None
    reason: str | None = None
    retry_delay_s: float | None = Field(default=None, ge=0)


class RejectEventsFault(FaultBase):
    """Reject some events of a request the way the platform rejects a bad event.

    Events are chosen by their dedup id (TikTok ``event_id``, Data Manager
    ``transactionId``, Google Ads ``orderId``) or by index. Meta-like platforms (TikTok, Data
    Manager) then reject the whole request naming those events; the Google Ads API fails
    those rows only (partial failure). ``reason`` is the platform's error code.
    """

    kind: Literal["reject_events"]
    event_ids: list[str] = Field(default_factory=list)
    indices: list[int] = Field(default_factory=list)
    reason: str | None = None

    def matches(self, index: int, event_id: Any) -> bool:
        """Whether the event at ``index`` with dedup id ``event_id`` is to be rejected."""
        return index in self.indices or (event_id is not None and event_id in self.event_ids)


Fault = Annotated[
    GraphErrorFault
    | HttpFault
    | SlowFault
    | TimeoutAfterProcessingFault
    | ThrottleFault
    | TikTokErrorFault
    | GoogleErrorFault
    | RejectEventsFault,
    Field(discriminator="kind"),
]

#: Fault kinds every platform supports (platforms add their own, e.g. Meta's ``graph_error``).
GENERIC_FAULT_KINDS = frozenset({"http", "slow", "timeout_after_processing"})


class FaultsRequest(BaseModel):
    """Body of ``POST /_sandbox/faults``."""

    model_config = ConfigDict(extra="forbid")

    platform: str
    faults: list[Fault]


class FaultQueue:
    """Per-platform FIFO of faults; each matching request consumes one ``times`` of the head."""

    def __init__(self) -> None:
        """Creates an empty queue."""
        self._lock = threading.Lock()
        self._queues: dict[str, deque[FaultBase]] = {}

    def add(self, platform: str, faults: Sequence[FaultBase]) -> None:
        """Appends faults to a platform's queue.

        Args:
            platform: Platform name.
            faults: Validated fault models, applied in order.
        """
        with self._lock:
            queue = self._queues.setdefault(platform, deque())
            queue.extend(fault.model_copy() for fault in faults)

    def take(self, platform: str) -> Any:
        """Consumes one application of the head fault of a platform's queue.

        Args:
            platform: Platform name.

        Returns:
            A fault model (copy, with the ``times`` it had left), or ``None`` when the queue is
            empty.
        """
        with self._lock:
            queue = self._queues.get(platform)
            if not queue:
                return None
            head = queue[0]
            taken = head.model_copy()
            head.times -= 1
            if head.times <= 0:
                queue.popleft()
            return taken

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Returns the remaining faults per platform (JSON-ready)."""
        with self._lock:
            return {
                platform: [fault.model_dump() for fault in queue]
                for platform, queue in self._queues.items()
            }

    def clear(self) -> None:
        """Drops every queued fault."""
        with self._lock:
            self._queues.clear()


def pre_processing_response(fault: Any) -> Response | None:
    """Answers the generic faults that replace processing.

    Args:
        fault: The fault taken for this request, or ``None``.

    Returns:
        The response for an ``http`` fault, else ``None`` (the caller handles its own
        platform-specific kinds).
    """
    if isinstance(fault, HttpFault):
        return Response(content=fault.body, status_code=fault.status, media_type=fault.content_type)
    return None


async def pre_processing_delay(fault: Any) -> None:
    """Sleeps for a ``slow`` fault (then the request is processed normally).

    Args:
        fault: The fault taken for this request, or ``None``.
    """
    if isinstance(fault, SlowFault):
        await asyncio.sleep(fault.delay_s)


async def post_processing_delay(fault: Any) -> None:
    """Sleeps for a ``timeout_after_processing`` fault, after the events were stored.

    Args:
        fault: The fault taken for this request, or ``None``.
    """
    if isinstance(fault, TimeoutAfterProcessingFault):
        await asyncio.sleep(fault.delay_s)


# --------------------------------------------------------------------------------------------
# State, platforms and the app
# --------------------------------------------------------------------------------------------


@dataclass
class SandboxState:
    """Everything one sandbox app shares between its routes.

    Attributes:
        config: The sandbox configuration.
        store: Accepted events and counters.
        faults: Injected faults.
        platforms: Names of the mounted platform emulators.
    """

    config: SandboxConfig
    store: EventStore
    faults: FaultQueue
    platforms: tuple[str, ...] = ()

    def now(self) -> float:
        """Returns the sandbox clock's current time (Unix seconds)."""
        return float(self.config.clock())

    def take_fault(self, platform: str) -> Any:
        """Consumes the next fault for a platform request (``None`` when none is queued)."""
        return self.faults.take(platform)

    def close(self) -> None:
        """Releases the store."""
        self.store.close()


@dataclass(frozen=True)
class PlatformSpec:
    """What a platform module contributes to the app.

    Attributes:
        name: Platform name used in control routes and fault requests, e.g. ``"meta"``.
        build_routers: Returns the platform's routers (API emulation and its control routes).
        fault_kinds: Platform-specific fault kinds it understands, besides the generic ones.
    """

    name: str
    build_routers: Callable[[SandboxState], list[APIRouter]]
    fault_kinds: frozenset[str] = frozenset()


def _load_platforms() -> list[PlatformSpec]:
    return [importlib.import_module(name).PLATFORM for name in PLATFORM_MODULES]


def _control_router(state: SandboxState, specs: dict[str, PlatformSpec]) -> APIRouter:
    router = APIRouter(prefix="/_sandbox", tags=["sandbox control"])

    @router.get("/health")
    def health() -> dict[str, Any]:
        """Liveness probe used by SandboxServer."""
        return {"status": "ok", "platforms": list(state.platforms)}

    @router.get("/stats")
    def stats() -> dict[str, dict[str, int]]:
        """Request and event counters per platform."""
        return state.store.stats(state.platforms)

    @router.post("/reset")
    def reset() -> dict[str, str]:
        """Deletes stored events, counters and queued faults."""
        state.store.reset()
        state.faults.clear()
        return {"status": "reset"}

    @router.delete("/faults")
    def clear_faults() -> dict[str, list[dict[str, Any]]]:
        """Drops every queued fault (stored events are kept)."""
        state.faults.clear()
        return state.faults.snapshot()

    @router.get("/faults")
    def list_faults() -> dict[str, list[dict[str, Any]]]:
        """The remaining fault queue per platform."""
        return state.faults.snapshot()

    @router.post("/faults")
    def add_faults(body: FaultsRequest) -> dict[str, list[dict[str, Any]]]:
        """Appends faults to a platform's FIFO queue."""
        spec = specs.get(body.platform)
        if spec is None:
            raise HTTPException(422, f"unknown platform {body.platform!r}; known: {sorted(specs)}")
        allowed = GENERIC_FAULT_KINDS | spec.fault_kinds
        for fault in body.faults:
            kind = fault.kind
            if kind not in allowed:
                raise HTTPException(
                    422, f"fault kind {kind!r} is not supported by platform {body.platform!r}"
                )
        state.faults.add(body.platform, body.faults)
        return state.faults.snapshot()

    return router


def create_app(config: SandboxConfig | None = None) -> FastAPI:
    """Builds the sandbox app with every platform emulator and the control routes.

    Args:
        config: Sandbox configuration; defaults to :class:`SandboxConfig()`.

    Returns:
        The FastAPI app. Its :class:`SandboxState` is ``app.state.sandbox``.
    """
    config = config or SandboxConfig()
    specs = {spec.name: spec for spec in _load_platforms()}
    state = SandboxState(
        config=config,
        store=EventStore(config.store_path),
        faults=FaultQueue(),
        platforms=tuple(specs),
    )
    app = FastAPI(
        title="leadsync platform sandbox",
        description="Loopback emulator of ad-platform conversion APIs (never for production).",
        docs_url="/_sandbox/docs",
        redoc_url=None,
        openapi_url="/_sandbox/openapi.json",
    )
    app.state.sandbox = state
    app.include_router(_control_router(state, specs))
    for spec in specs.values():
        for router in spec.build_routers(state):
            app.include_router(router)
    return app

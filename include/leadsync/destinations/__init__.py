"""One module per platform, all of the shape described in :mod:`leadsync.destinations.base`."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import import_module
from typing import TYPE_CHECKING, Any, cast

from leadsync.destinations.base import Destination

if TYPE_CHECKING:
    from leadsync.config import DestinationConfig

_MODULES = {
    "meta": "leadsync.destinations.meta",
    "tiktok": "leadsync.destinations.tiktok",
    "google_datamanager": "leadsync.destinations.google_datamanager",
    "google_ads": "leadsync.destinations.google_ads",
    "linkedin": "leadsync.destinations.linkedin",
    "snapchat": "leadsync.destinations.snapchat",
    "pinterest": "leadsync.destinations.pinterest",
    "reddit": "leadsync.destinations.reddit",
}


def get_destination(type_: str) -> Destination:
    """The module implementing destination type ``type_``."""
    try:
        return cast(Destination, import_module(_MODULES[type_]))
    except KeyError:
        raise ValueError(
            f"unknown destination type {type_!r} (known: {', '.join(sorted(_MODULES))})"
        ) from None


#: Types whose platform processes requests asynchronously: their module provides the
#: :class:`~leadsync.destinations.base.RequestStatusChecker` functions (a unit test keeps this
#: set and the modules in step). Declared here so that DAG files can ask without importing
#: the modules (which import phonenumbers).
ASYNC_STATUS_TYPES = frozenset({"google_datamanager"})


def has_request_status(type_: str) -> bool:
    """Whether leadsync checks the platform's processing status of accepted requests on later
    runs (the DAG then gets a ``check_requests`` task)."""
    if type_ not in _MODULES:
        raise ValueError(f"unknown destination type {type_!r}")
    return type_ in ASYNC_STATUS_TYPES


def all_types() -> tuple[str, ...]:
    """Every destination type."""
    return tuple(_MODULES)


def sample_events(dest: DestinationConfig, n: int, now: datetime | None = None,
                  seed: int = 1) -> list[dict[str, Any]]:
    """``n`` outbox envelopes (``{"event_id", "event_time", "body"}``) for destination
    ``dest``, planned from synthetic rows exactly as a run plans them (benchmarks, load tests).

    Rows the destination would not send (skipped, expired) are drawn past, so the result has
    ``n`` events unless the generator runs dry (it never does for realistic configs).
    """
    from leadsync import demo_data
    from leadsync.pipeline import Planned, Planner

    now = now or datetime.now(UTC)
    module = get_destination(dest.type)
    events: list[dict[str, Any]] = []
    seen: set[str] = set()
    planner = Planner(dest, module, now)
    for row in demo_data.generate_rows_fast(n * 4 + 100, now, seed=seed):
        plan = planner.plan(row)
        if isinstance(plan, Planned) and plan.event_id not in seen:
            seen.add(plan.event_id)
            events.append(plan.envelope)
            if len(events) >= n:
                break
    return events

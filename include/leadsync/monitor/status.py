"""What the Conversions pages and ``/leadsync/api/status`` show, read from the state store.

Only lead ids, stages, rule codes, event names and the platforms' own messages leave here:
never an identifier (hashed or raw), never a payload. Every function takes the store and is
usable without Airflow running.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from leadsync.state import (
    BATCH_PENDING,
    FAILED,
    FAILED_REASONS,
    StateStore,
    ledger,
    outbox,
    platform_requests,
    quarantine,
    runs,
)

# The run counters shown per run (the rest stay in the state store and XCom).
RUN_COUNTS = ("read", "sent", "delivered", "failed", "expired", "skipped", "quarantined")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _watermark_lag(summary: dict[str, Any], now: datetime) -> float | None:
    mark = summary.get("watermark")
    if not mark:
        return None
    ts = datetime.fromisoformat(mark["updated_at"])
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return round((now - ts).total_seconds(), 3)


def last_runs(store: StateStore, destination: str, limit: int = 30) -> list[dict[str, Any]]:
    """The destination's newest ``limit`` runs, newest first: status, times and counts."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(runs.c.run_id, runs.c.status, runs.c.started_at, runs.c.finished_at,
                   runs.c.counts)
            .where(runs.c.destination == destination)
            .order_by(runs.c.started_at.desc())
            .limit(limit)
        ).all()
    result = []
    for row in rows:
        counts = json.loads(row.counts or "{}")
        result.append({
            "run_id": row.run_id,
            "status": row.status,
            "started_at": _iso(row.started_at),
            "finished_at": _iso(row.finished_at),
            "counts": {key: int(counts.get(key, 0)) for key in RUN_COUNTS},
            "quarantined_by_rule": {k.split(".", 1)[1]: int(v) for k, v in counts.items()
                                    if k.startswith("quarantined.")},
            # Unusable identifiers left out of events that were still sent (by identifier).
            "identifiers_dropped": {k.removeprefix("identifiers_dropped."): v
                                    for k, v in sorted(counts.items())
                                    if k.startswith("identifiers_dropped.")},
        })
    return result


def status(store: StateStore, destinations: Sequence[str], now: datetime | None = None,
           runs_limit: int = 5) -> dict[str, Any]:
    """Per destination: the numbers of ``leadsync state show --json`` (same keys, same
    values), the watermark's lag behind ``now`` in seconds, the last runs and their
    match-key coverage."""
    now = now or datetime.now(UTC)
    summary = store.summary(destinations)
    result: dict[str, Any] = {}
    for name in destinations:
        entry = dict(summary[name])
        entry["watermark_lag_seconds"] = _watermark_lag(entry, now)
        entry["last_runs"] = last_runs(store, name, max(runs_limit, 1))
        # As ``state show`` reports it: what the newest run left out of its events.
        newest = entry["last_runs"][0] if entry["last_runs"] else {}
        entry["last_run_identifiers_dropped"] = newest.get("identifiers_dropped", {})
        entry["coverage"] = store.run_coverage(name, runs_limit)
        result[name] = entry
    return {"generated_at": now.isoformat(), "destinations": result}


def quarantine_by_rule(store: StateStore, destination: str,
                       run_id: str | None = None) -> list[dict[str, Any]]:
    """Open quarantine entries counted per rule (of one run when ``run_id`` is given)."""
    query = (select(quarantine.c.rule, func.count().label("n"))
             .where(quarantine.c.destination == destination, quarantine.c.resolved_at.is_(None)))
    if run_id:
        query = query.where(quarantine.c.run_id == run_id)
    with store.engine.connect() as conn:
        rows = conn.execute(query.group_by(quarantine.c.rule).order_by(quarantine.c.rule)).all()
    return [{"rule": r.rule, "rows": int(r.n)} for r in rows]


def quarantine_entries(store: StateStore, destination: str, run_id: str | None = None,
                       limit: int = 200) -> list[dict[str, Any]]:
    """Open quarantine entries, newest first: lead id, stage, rule and run (no detail)."""
    query = select(quarantine.c.lead_id, quarantine.c.stage, quarantine.c.rule,
                   quarantine.c.run_id, quarantine.c.last_seen).where(
        quarantine.c.destination == destination, quarantine.c.resolved_at.is_(None))
    if run_id:
        query = query.where(quarantine.c.run_id == run_id)
    with store.engine.connect() as conn:
        rows = conn.execute(query.order_by(quarantine.c.last_seen.desc()).limit(limit)).all()
    return [{"lead_id": r.lead_id, "stage": r.stage, "rule": r.rule, "run_id": r.run_id,
             "last_seen": _iso(r.last_seen)} for r in rows]


def dead_letters(store: StateStore, destination: str, run_id: str | None = None,
                 limit: int = 200) -> list[dict[str, Any]]:
    """Events the platform rejected, newest first, with the platform's message."""
    query = select(ledger.c.lead_id, ledger.c.stage, ledger.c.event_name, ledger.c.reason,
                   ledger.c.detail, ledger.c.run_id, ledger.c.attempts,
                   ledger.c.updated_at).where(ledger.c.destination == destination,
                                              ledger.c.status == FAILED,
                                              # the index of dead letters (Postgres)
                                              ledger.c.reason.in_(FAILED_REASONS))
    if run_id:
        query = query.where(ledger.c.run_id == run_id)
    with store.engine.connect() as conn:
        rows = conn.execute(query.order_by(ledger.c.updated_at.desc()).limit(limit)).all()
    return [{"lead_id": r.lead_id, "stage": r.stage, "event_name": r.event_name,
             "reason": r.reason, "message": r.detail, "run_id": r.run_id,
             "attempts": int(r.attempts or 0), "updated_at": _iso(r.updated_at)} for r in rows]


def pending_batches(store: StateStore, destination: str,
                    run_id: str | None = None) -> list[dict[str, Any]]:
    """Outbox batches not yet acknowledged, oldest first (no payload)."""
    query = select(outbox.c.batch_id, outbox.c.run_id, outbox.c.n_events, outbox.c.attempts,
                   outbox.c.last_error, outbox.c.created_at).where(
        outbox.c.destination == destination, outbox.c.status == BATCH_PENDING)
    if run_id:
        query = query.where(outbox.c.run_id == run_id)
    with store.engine.connect() as conn:
        rows = conn.execute(query.order_by(outbox.c.created_at)).all()
    return [{"batch_id": r.batch_id, "run_id": r.run_id, "events": int(r.n_events),
             "attempts": int(r.attempts or 0), "last_error": r.last_error,
             "created_at": _iso(r.created_at)} for r in rows]


def platform_request_status(store: StateStore, destination: str, run_id: str | None = None,
                            limit: int = 50) -> list[dict[str, Any]]:
    """The platform's processing status of asynchronous requests (Data Manager), newest
    first: status, outcome counts and message."""
    query = select(platform_requests.c.run_id, platform_requests.c.n_events,
                   platform_requests.c.sent_at, platform_requests.c.status,
                   platform_requests.c.counts, platform_requests.c.message).where(
        platform_requests.c.destination == destination)
    if run_id:
        query = query.where(platform_requests.c.run_id == run_id)
    with store.engine.connect() as conn:
        rows = conn.execute(query.order_by(platform_requests.c.sent_at.desc()).limit(limit))
        return [{"run_id": r.run_id, "events": int(r.n_events), "sent_at": _iso(r.sent_at),
                 "status": r.status, "counts": json.loads(r.counts) if r.counts else {},
                 "message": r.message} for r in rows]


def data_docs_pages(docs_dir: Path, destination: str, run_ids: Iterable[str]) -> dict[str, str]:
    """Run id → the run's Data Docs page, relative to ``docs_dir`` (runs without one absent).

    GX's layout: ``validations/<suite>/<run name>/<run time>/<batch>.html``, the suite being
    the destination's contract and the run name the run id made file-safe (as the contract
    check writes them).
    """
    from leadsync.quality import _safe_name

    suite = docs_dir / "validations" / f"leadsync_{destination}_contract"
    if not suite.is_dir():
        return {}
    wanted = {_safe_name(run_id): run_id for run_id in run_ids}
    found: dict[str, str] = {}
    for page in suite.glob("*/*/*.html"):
        run_id = wanted.get(page.parent.parent.name)
        if run_id is not None:
            found[run_id] = page.relative_to(docs_dir).as_posix()
    return found


def data_docs_link(docs_dir: Path, destination: str, run_id: str,
                   base_url: str | None = None) -> str | None:
    """Where the Conversions app serves the run's Data Docs page (for the task log), or None
    when the run has none. Relative to the Airflow UI's root without ``base_url``."""
    from urllib.parse import quote

    page = data_docs_pages(docs_dir, destination, [run_id]).get(run_id)
    if page is None:
        return None
    return f"{(base_url or '').rstrip('/')}/leadsync/data-docs/{quote(page)}"

"""Runs and watermarks: a run's window and counts, and the watermark it may advance (G3)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.engine import Connection

from leadsync.state.model import (
    BATCH_PENDING,
    DELIVERED,
    EXPIRED,
    FAILED,
    PENDING,
    SKIPPED,
    Cursor,
    StorePart,
    _cursor_from_json,
    _cursor_json,
    _cursor_key,
    json_lead_id,
    utcnow,
)
from leadsync.state.schema import ledger, outbox, quarantine, runs, watermarks


class RunPart(StorePart):
    """Runs, the watermark, and the per-destination summary."""

    def get_watermark(self, destination: str) -> Cursor | None:
        """The destination's watermark, or None before its first successful run."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(watermarks).where(watermarks.c.destination == destination)
            ).first()
        if row is None:
            return None
        return Cursor(row.cursor_ts, json.loads(row.cursor_lead_id), row.cursor_stage)

    def _advance_watermark(
        self, conn: Connection, destination: str, cursor: Cursor, run_id: str
    ) -> Cursor:
        row = conn.execute(
            select(watermarks).where(watermarks.c.destination == destination)
        ).first()
        values = {
            "cursor_ts": cursor.ts,
            "cursor_lead_id": json.dumps(json_lead_id(cursor.lead_id)),
            "cursor_stage": cursor.stage,
            "run_id": run_id,
            "moved_at": utcnow(),
        }
        if row is None:
            conn.execute(insert(watermarks).values(destination=destination, **values))
            return cursor
        current = Cursor(row.cursor_ts, json.loads(row.cursor_lead_id), row.cursor_stage)
        if _cursor_key(cursor) <= _cursor_key(current):
            return current  # G3: never backward
        conn.execute(
            update(watermarks).where(watermarks.c.destination == destination).values(**values)
        )
        return cursor

    def start_run(
        self,
        run_id: str,
        destination: str,
        window_lo: datetime | None,
        window_hi: datetime,
        watermark: Cursor | None,
    ) -> None:
        """Records the start of a run (a rerun of the same run id starts it afresh)."""
        with self.engine.begin() as conn:
            conn.execute(
                delete(runs).where(runs.c.run_id == run_id, runs.c.destination == destination)
            )
            conn.execute(
                insert(runs).values(
                    run_id=run_id,
                    destination=destination,
                    status="running",
                    started_at=utcnow(),
                    window_lo=window_lo,
                    window_hi=window_hi,
                    watermark_before=_cursor_json(watermark),
                    counts="{}",
                )
            )

    def get_run(self, run_id: str, destination: str) -> dict[str, Any] | None:
        """The run's row with counts and cursors decoded."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(runs).where(runs.c.run_id == run_id, runs.c.destination == destination)
            ).first()
        if row is None:
            return None
        data = dict(row._mapping)
        data["counts"] = json.loads(data["counts"] or "{}")
        for key in ("window_max", "watermark_before", "watermark_after"):
            data[key] = _cursor_from_json(data[key])
        return data

    def set_run_counts(
        self,
        run_id: str,
        destination: str,
        counts: Mapping[str, int],
        replace_prefixes: Sequence[str] = (),
    ) -> None:
        """Sets (rather than adds) the run's counters ``counts``, first dropping every counter
        whose name starts with one of ``replace_prefixes``: a step that is retried recomputes
        its counts from scratch and must not count twice."""
        with self.engine.begin() as conn:
            row = conn.execute(
                select(runs.c.counts).where(
                    runs.c.run_id == run_id, runs.c.destination == destination
                )
            ).first()
            if row is None:
                return
            merged = {
                k: v
                for k, v in json.loads(row.counts or "{}").items()
                if not any(k.startswith(p) for p in replace_prefixes)
            }
            merged.update({k: int(v) for k, v in counts.items()})
            conn.execute(
                update(runs)
                .where(runs.c.run_id == run_id, runs.c.destination == destination)
                .values(counts=json.dumps(merged, sort_keys=True))
            )

    def update_run(
        self,
        run_id: str,
        destination: str,
        *,
        counts: Mapping[str, int] | None = None,
        window_max: Cursor | None = None,
        status: str | None = None,
    ) -> None:
        """Adds ``counts`` to the run's counters and records its progress."""
        with self.engine.begin() as conn:
            _update_run(conn, run_id, destination, counts, window_max, status)
    def commit_run(
        self, run_id: str, destination: str, status: str, counts: Mapping[str, int] | None = None
    ) -> tuple[Cursor | None, Cursor | None]:
        """Advances the watermark past terminal rows only, and closes the run.

        The new watermark is the last row read by this run, held back to just before the
        first event of any batch still pending (of any run). Returns (before, after).
        """
        with self.engine.begin() as conn:
            run = conn.execute(
                select(runs.c.window_max).where(
                    runs.c.run_id == run_id, runs.c.destination == destination
                )
            ).first()
            before_row = conn.execute(
                select(watermarks).where(watermarks.c.destination == destination)
            ).first()
            before = (
                Cursor(
                    before_row.cursor_ts,
                    json.loads(before_row.cursor_lead_id),
                    before_row.cursor_stage,
                )
                if before_row
                else None
            )
            candidate = _cursor_from_json(run.window_max) if run else None
            blocked = False
            for text in conn.execute(
                select(outbox.c.prev_cursor).where(
                    outbox.c.destination == destination, outbox.c.status == BATCH_PENDING
                )
            ).scalars():
                prev = _cursor_from_json(text)
                if prev is None:
                    blocked = True  # the very first row read is still pending
                    candidate = None
                    break
                if candidate is None or _cursor_key(prev) < _cursor_key(candidate):
                    candidate = prev
            after = before
            if candidate is not None and not blocked:
                after = self._advance_watermark(conn, destination, candidate, run_id)
            _update_run(
                conn, run_id, destination, counts, status=status, watermark_after=after
            )
            return before, after

    def summary(self, destinations: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Per destination: watermark and ledger/quarantine counts (for ``state show``)."""
        result: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for dest in destinations:
                counts = dict.fromkeys((DELIVERED, PENDING, FAILED, EXPIRED, SKIPPED), 0)
                for status, n in conn.execute(
                    select(ledger.c.status, func.count())
                    .where(ledger.c.destination == dest)
                    .group_by(ledger.c.status)
                ):
                    counts[status] = int(n)
                quarantined = conn.execute(
                    select(func.count()).where(
                        and_(quarantine.c.destination == dest, quarantine.c.resolved_at.is_(None))
                    )
                ).scalar()
                wm_row = conn.execute(
                    select(watermarks).where(watermarks.c.destination == dest)
                ).first()
                result[dest] = {
                    "watermark": (
                        Cursor(
                            wm_row.cursor_ts, json.loads(wm_row.cursor_lead_id), wm_row.cursor_stage
                        ).as_dict()
                        if wm_row
                        else None
                    ),
                    **counts,
                    "quarantined": int(quarantined or 0),
                }
        return result


def _update_run(
    conn: Connection,
    run_id: str,
    destination: str,
    counts: Mapping[str, int] | None,
    window_max: Cursor | None = None,
    status: str | None = None,
    watermark_after: Cursor | None = None,
) -> None:
    # Locked (Postgres): push lanes add their counts to one run row at the same time, and a
    # read-modify-write without the lock would lose some.
    row = conn.execute(
        select(runs.c.counts, runs.c.window_max).where(
            runs.c.run_id == run_id, runs.c.destination == destination
        ).with_for_update()
    ).first()
    if row is None:
        return
    values: dict[str, Any] = {}
    if counts:
        merged = json.loads(row.counts or "{}")
        for key, value in counts.items():
            merged[key] = merged.get(key, 0) + int(value)
        values["counts"] = json.dumps(merged, sort_keys=True)
    if window_max is not None:
        old = _cursor_from_json(row.window_max)
        if old is None or _cursor_key(window_max) > _cursor_key(old):
            values["window_max"] = _cursor_json(window_max)
    if status is not None:
        values["status"] = status
        if status != "running":
            values["finished_at"] = utcnow()
    if watermark_after is not None:
        values["watermark_after"] = _cursor_json(watermark_after)
    if values:
        conn.execute(
            update(runs)
            .where(runs.c.run_id == run_id, runs.c.destination == destination)
            .values(**values)
        )

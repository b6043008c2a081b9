"""Requests a platform accepted for asynchronous processing, and their later status."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, or_, select, update

from leadsync.state.model import DELIVERED, FAILED, REQUEST_FAILED, StorePart, utcnow
from leadsync.state.schema import REQUEST_SENT, ledger, outbox, platform_requests


class RequestPart(StorePart):
    """Data Manager style request ids: registered from the ledger, checked on later runs."""

    def collect_receipts(
        self, destination: str, reason: str, margin: timedelta = timedelta(hours=1)
    ) -> int:
        """Registers the requests that delivered events name (ledger ``reason`` = ``reason``,
        ``detail`` = request id) and that are not known yet; returns how many were new.

        Only ledger rows changed since the newest known request (less ``margin``, for
        transactions that committed late) are read: those of the outbox batches whose
        outcomes were recorded since then, through the ledger's index by batch (the outbox has
        one row per request, the ledger one per event).
        """
        now = utcnow()
        with self.engine.begin() as conn:
            newest = conn.execute(
                select(func.max(platform_requests.c.sent_at)).where(
                    platform_requests.c.destination == destination
                )
            ).scalar()
            query = select(
                ledger.c.detail,
                ledger.c.batch_id,
                func.max(ledger.c.run_id).label("run_id"),
                func.count().label("n"),
                func.max(ledger.c.updated_at).label("sent_at"),
            ).where(
                ledger.c.destination == destination,
                ledger.c.reason == reason,
                ledger.c.status == DELIVERED,
                ledger.c.detail.is_not(None),
            )
            query = query.group_by(ledger.c.detail, ledger.c.batch_id)
            if newest is None:
                found = list(conn.execute(query))
            else:
                since = newest - margin
                # The batch ids first, then their rows: given as values, the planner reads
                # the rows through the index by batch rather than every receipt.
                recent = list(conn.execute(select(outbox.c.batch_id).where(
                    outbox.c.destination == destination, outbox.c.updated_at >= since
                )).scalars())
                found = []
                for start in range(0, len(recent), 900):
                    found.extend(conn.execute(query.where(
                        ledger.c.batch_id.in_(recent[start : start + 900]),
                        ledger.c.updated_at >= since)))
            ids = list({row.detail for row in found})
            known: set[str] = set()
            for start in range(0, len(ids), 900):
                known.update(
                    conn.execute(
                        select(platform_requests.c.request_id).where(
                            platform_requests.c.destination == destination,
                            platform_requests.c.request_id.in_(ids[start : start + 900]),
                        )
                    ).scalars()
                )
            fresh = {}
            for row in found:
                if row.detail in known or row.detail in fresh:
                    continue
                sent_at = row.sent_at or now
                fresh[row.detail] = {
                    "destination": destination,
                    "request_id": row.detail,
                    "batch_id": row.batch_id,
                    "run_id": row.run_id,
                    "n_events": int(row.n),
                    "sent_at": sent_at,
                    "status": REQUEST_SENT,
                    "done": 0,
                    "checks": 0,
                    "next_check_at": sent_at,
                }
            if fresh:
                conn.execute(insert(platform_requests), list(fresh.values()))
        return len(fresh)

    def due_requests(
        self, destination: str, now: datetime, exclude_run_id: str | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        """Requests whose status is not final and due for a look, oldest first."""
        query = select(platform_requests).where(
            platform_requests.c.destination == destination,
            platform_requests.c.done == 0,
            platform_requests.c.next_check_at <= now,
        )
        if exclude_run_id is not None:
            query = query.where(or_(platform_requests.c.run_id.is_(None),
                                    platform_requests.c.run_id != exclude_run_id))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(platform_requests.c.sent_at).limit(limit))
            return [dict(r._mapping) for r in rows]

    def record_request_status(
        self,
        destination: str,
        request_id: str,
        *,
        status: str,
        done: bool,
        next_check_at: datetime,
        counts: Mapping[str, Any] | None = None,
        message: str | None = None,
        failed_event_names: Sequence[str] = (),
        receipt_reason: str | None = None,
    ) -> int:
        """Records a status lookup; returns how many ledger events became dead letters.

        When the platform reports that every record of some of its destinations failed
        (``failed_event_names``: the events' names, e.g. conversion action ids), those events
        move from delivered to failed in the same transaction (G1: dead-lettered with the
        platform's error, and the reprocess DAG can send them again).
        """
        now = utcnow()
        failed = 0
        with self.engine.begin() as conn:
            conn.execute(
                update(platform_requests)
                .where(platform_requests.c.destination == destination,
                       platform_requests.c.request_id == request_id)
                .values(status=status, done=int(done), checks=platform_requests.c.checks + 1,
                        checked_at=now, next_check_at=next_check_at,
                        counts=json.dumps(counts, sort_keys=True) if counts else None,
                        message=message)
            )
            if failed_event_names and receipt_reason:
                detail = f"request {request_id} {status}: {message or ''}".strip()[:1000]
                failed = conn.execute(
                    update(ledger)
                    .where(ledger.c.destination == destination,
                           ledger.c.status == DELIVERED,
                           ledger.c.reason == receipt_reason,
                           ledger.c.detail == request_id,
                           ledger.c.event_name.in_(list(failed_event_names)))
                    .values(status=FAILED, reason=REQUEST_FAILED, detail=detail,
                            updated_at=now)
                ).rowcount
        return int(failed or 0)

    def request_rows(self, destination: str) -> list[dict[str, Any]]:
        """Every known platform request of a destination, counts decoded (tests, CLI)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(platform_requests)
                .where(platform_requests.c.destination == destination)
                .order_by(platform_requests.c.sent_at)
            )
            result = []
            for r in rows:
                data = dict(r._mapping)
                data["counts"] = json.loads(data["counts"]) if data["counts"] else {}
                result.append(data)
            return result

"""What monitoring keeps: match-key coverage per run and the last alert state per condition."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, insert, select

from leadsync.state.model import StorePart, utcnow
from leadsync.state.schema import alert_states, run_coverage


class MonitorPart(StorePart):
    """Coverage counts (identifier names and counts only) and alert states."""

    def set_coverage(self, destination: str, run_id: str, events: int,
                     keys: Mapping[str, int]) -> None:
        """Records (replaces) the run's coverage: a retried check stages the run again from
        scratch, so its counts replace the earlier attempt's; no events, no row."""
        with self.engine.begin() as conn:
            conn.execute(delete(run_coverage).where(run_coverage.c.destination == destination,
                                                    run_coverage.c.run_id == run_id))
            if events > 0:
                conn.execute(insert(run_coverage).values(
                    destination=destination, run_id=run_id, events=int(events),
                    key_counts=json.dumps({k: int(n) for k, n in keys.items()},
                                          sort_keys=True),
                    recorded_at=utcnow()))

    def run_coverage(self, destination: str, limit: int = 10) -> list[dict[str, Any]]:
        """The newest runs' coverage: ``{"run_id", "events", "keys", "shares"}``."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(run_coverage).where(run_coverage.c.destination == destination)
                .order_by(run_coverage.c.recorded_at.desc()).limit(limit)
            ).all()
        result = []
        for row in rows:
            keys = {k: int(v) for k, v in json.loads(row.key_counts).items()}
            result.append({"run_id": row.run_id, "events": int(row.events), "keys": keys,
                           "shares": {k: v / row.events for k, v in keys.items()}})
        return result

    def alert_state(self, destination: str) -> dict[str, str]:
        """Condition kind → ``firing`` or ``ok`` (absent: never alerted, i.e. ok)."""
        with self.engine.connect() as conn:
            return {r.kind: r.status for r in conn.execute(
                select(alert_states.c.kind, alert_states.c.status).where(
                    alert_states.c.destination == destination))}

    def set_alert_state(self, destination: str, kind: str, status: str, run_id: str | None,
                        message: str) -> None:
        """Records that an alert (``firing``) or its recovery (``ok``) went out."""
        with self.engine.begin() as conn:
            conn.execute(delete(alert_states).where(alert_states.c.destination == destination,
                                                    alert_states.c.kind == kind))
            conn.execute(insert(alert_states).values(
                destination=destination, kind=kind, status=status, changed_at=utcnow(),
                run_id=run_id, message=message))

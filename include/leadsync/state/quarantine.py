"""Quarantine: source rows that broke the data contract, keyed by lead_id and stage."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import and_, insert, select, update

from leadsync.state.model import QuarantineRecord, StorePart, utcnow
from leadsync.state.schema import quarantine


class QuarantinePart(StorePart):
    """Rows turned away by the contract, until their fixed version passes it."""

    def quarantine_rows(
        self, destination: str, run_id: str, records: Sequence[QuarantineRecord]
    ) -> None:
        """Upserts quarantine entries (re-opening resolved ones that broke again)."""
        if not records:
            return
        now = utcnow()
        with self.engine.begin() as conn:
            for r in records:
                key = and_(
                    quarantine.c.destination == destination,
                    quarantine.c.lead_id == r.lead_id,
                    quarantine.c.stage == r.stage,
                )
                res = conn.execute(
                    update(quarantine)
                    .where(key)
                    .values(rule=r.rule, detail=r.detail, source_ts=r.source_ts, run_id=run_id,
                            last_seen=now, resolved_at=None)
                )
                if not res.rowcount:
                    conn.execute(
                        insert(quarantine).values(
                            destination=destination, lead_id=r.lead_id, stage=r.stage, rule=r.rule,
                            detail=r.detail, source_ts=r.source_ts, run_id=run_id, first_seen=now,
                            last_seen=now,
                        )
                    )


    def quarantine_keys_for_run(self, destination: str, run_id: str) -> set[tuple[str, str]]:
        """(lead_id, stage) of open entries that ``run_id`` (re)quarantined: the rows its
        contract check turned away (few by nature; the breaker caps them)."""
        with self.engine.connect() as conn:
            return {
                (r.lead_id, r.stage)
                for r in conn.execute(
                    select(quarantine.c.lead_id, quarantine.c.stage).where(
                        quarantine.c.destination == destination,
                        quarantine.c.run_id == run_id,
                        quarantine.c.resolved_at.is_(None),
                    )
                )
            }

    def open_quarantine_keys(self, destination: str) -> set[tuple[str, str]]:
        """(lead_id, stage) of unresolved quarantine entries (small by nature)."""
        with self.engine.connect() as conn:
            return {
                (r.lead_id, r.stage)
                for r in conn.execute(
                    select(quarantine.c.lead_id, quarantine.c.stage).where(
                        quarantine.c.destination == destination, quarantine.c.resolved_at.is_(None)
                    )
                )
            }


    def resolve_quarantine(
        self, destination: str, keys: Iterable[tuple[str, str]]
    ) -> int:
        """Marks entries resolved once their row passes the contract; returns how many."""
        now = utcnow()
        n = 0
        with self.engine.begin() as conn:
            for lead_id, stage in keys:
                n += conn.execute(
                    update(quarantine)
                    .where(
                        quarantine.c.destination == destination,
                        quarantine.c.lead_id == lead_id,
                        quarantine.c.stage == stage,
                        quarantine.c.resolved_at.is_(None),
                    )
                    .values(resolved_at=now)
                ).rowcount
        return n

"""What recording a delivered batch costs in a large Postgres ledger: now against before
migration 9.

Run it (Postgres; two scratch databases are created and dropped)::

    .venv/bin/python bench/ledger_update.py                       # 1M-row ledger, 300 batches
    .venv/bin/python bench/ledger_update.py --rows 200000 --batches 100
    .venv/bin/python bench/ledger_update.py --admin-url postgresql://postgres@127.0.0.1/postgres

or call :func:`ledger_update` with two empty databases.

Each database gets the state store's schema and a ledger of ``rows`` pending events in batches
of 1,000 (random event ids, as ``derive_event_id`` makes them), written with ``COPY`` as stage
writes them, then ``ANALYZE`` and a ``CHECKPOINT``:

- **now**: the schema as migrated (a half-filled ledger, no index on a column a delivery
  changes); a batch is recorded as delivered by the store's own statement (through the index
  by batch, a HOT update).
- **before**: the schema as migration 8 left it (ledger pages filled, the status index of the
  events not delivered, the reason index with ``updated_at``); a batch is recorded by the
  statement of that version (``UPDATE … WHERE destination = d AND event_id = ANY(ids)``, through
  the primary key).

The two sides alternate batch by batch, each update in its own transaction (as a push lane
commits each batch's outcomes), so that a busy machine slows both. Printed: the median and the
90th percentile per batch, the share of HOT updates, and before/now.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))

from sqlalchemy import Engine, text
from sqlalchemy.engine import Connection

from leadsync.bench import _scratch_postgres
from leadsync.db import make_engine
from leadsync.state import DELIVERED, EventOutcome, StateStore
from leadsync.state.outcomes import _write_outcomes

DEST = "meta"
BATCH = 1_000
_COLUMNS = ("destination, event_id, lead_id, stage, event_name, status, batch_id, attempts, "
            "source_ts, event_time, run_id, created_at, updated_at")
_BEFORE = (  # the ledger's indexes as migrations 7 and 8 left them
    "DROP INDEX IF EXISTS ix_ls_ledger_batch",
    "DROP INDEX IF EXISTS ix_ls_ledger_run",
    "DROP INDEX IF EXISTS ix_ls_ledger_failed",
    "DROP INDEX IF EXISTS ix_ls_ledger_receipt",
    "ALTER TABLE ls_ledger RESET (fillfactor)",
    "CREATE INDEX ix_ls_ledger_status ON ls_ledger (destination, status) "
    "WHERE status <> 'delivered'",
    "CREATE INDEX ix_ls_ledger_reason ON ls_ledger (destination, reason, updated_at) "
    "WHERE reason IS NOT NULL",
)
_BEFORE_UPDATE = text(
    "UPDATE ls_ledger SET status = 'delivered', reason = NULL, detail = NULL, "
    "updated_at = :now, attempts = attempts + 1, delivered_at = :now "
    "WHERE destination = :d AND event_id = ANY(:ids)"
)


def _load(engine: Engine, rows: int) -> list[tuple[str, list[str]]]:
    """Writes ``rows`` pending ledger rows in batches of 1,000; returns (batch id, ids)."""
    batches: list[tuple[str, list[str]]] = []
    stamp = "2026-12-01 10:00:00+00"
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for start in range(0, rows, 100_000):
            buf = io.StringIO()
            for i in range(start, min(rows, start + 100_000)):
                if i % BATCH == 0:
                    batches.append((uuid.uuid4().hex, []))
                batch_id, ids = batches[-1]
                event_id = "ls_" + hashlib.sha256(f"leadsync|{i}|won".encode()).hexdigest()[:32]
                ids.append(event_id)
                buf.write(f"{DEST}\t{event_id}\tlead-{i}\twon\tPurchase\tpending\t{batch_id}\t0\t"
                          f"{stamp}\t{stamp}\trun-1\t{stamp}\t{stamp}\n")
            buf.seek(0)
            cursor.copy_expert(f"COPY ls_ledger ({_COLUMNS}) FROM STDIN", buf)
            raw.commit()
        cursor.execute("ANALYZE ls_ledger")
        raw.commit()
        try:
            cursor.execute("CHECKPOINT")  # superuser only: otherwise both sides start unflushed
        except Exception:  # noqa: BLE001
            raw.rollback()
        raw.commit()
    finally:
        raw.close()
    return batches


def _prepare(url: str, shape: str, rows: int) -> tuple[Engine, list[tuple[str, list[str]]]]:
    engine = make_engine(url)
    StateStore(engine).migrate()
    if shape == "before":
        with engine.begin() as conn:
            for statement in _BEFORE:
                conn.exec_driver_sql(statement)
    return engine, _load(engine, rows)


def _hot_share(conn: Connection) -> float | None:
    """The share of the ledger's updates that were HOT (``conn`` made them)."""
    conn.execute(text("SELECT pg_stat_force_next_flush()"))
    conn.commit()  # the counters are flushed at the end of this transaction
    upd, hot = conn.execute(text(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'ls_ledger'"
    )).one()
    conn.commit()
    return hot / upd if upd else None


def ledger_update(url_now: str, url_before: str, rows: int = 1_000_000,
                  batches: int = 300) -> dict[str, Any]:
    """Times ``batches`` delivered batches on each side; see the module docstring."""
    now_engine, now_batches = _prepare(url_now, "now", rows)
    before_engine, before_batches = _prepare(url_before, "before", rows)
    step = max(1, len(now_batches) // batches)
    picks = list(range(0, len(now_batches), step))[:batches]
    times: dict[str, list[float]] = {"now": [], "before": []}
    delivered = EventOutcome(DELIVERED)
    # One connection per side, as a push lane keeps one.
    now_conn, before_conn = now_engine.connect(), before_engine.connect()
    try:
        for k in picks:
            stamp = datetime.now(UTC)
            batch_id, ids = now_batches[k]
            start = time.perf_counter()
            with now_conn.begin():
                _write_outcomes(now_conn, DEST, dict.fromkeys(ids, delivered), stamp, batch_id)
            times["now"].append((time.perf_counter() - start) * 1000)
            _, ids = before_batches[k]
            start = time.perf_counter()
            with before_conn.begin():
                before_conn.execute(_BEFORE_UPDATE, {"now": stamp, "d": DEST, "ids": ids})
            times["before"].append((time.perf_counter() - start) * 1000)
        result: dict[str, Any] = {"rows": rows, "batches": len(picks)}
        for side, conn in (("now", now_conn), ("before", before_conn)):
            ms = sorted(times[side])
            result[side] = {"median_ms": statistics.median(ms),
                            "p90_ms": ms[int(len(ms) * 0.9)] if ms else None,
                            "hot_share": _hot_share(conn)}
        result["before_over_now"] = result["before"]["median_ms"] / result["now"]["median_ms"]
        return result
    finally:
        now_conn.close()
        before_conn.close()
        now_engine.dispose()
        before_engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--admin-url", default="postgresql+psycopg2://postgres@127.0.0.1/postgres")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    with _scratch_postgres(args.admin_url) as url_now, \
            _scratch_postgres(args.admin_url) as url_before:
        result = ledger_update(url_now, url_before, args.rows, args.batches)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"recording a delivered 1,000-event batch, {result['rows']:,}-row Postgres ledger, "
          f"{result['batches']} batches each, alternating:")
    for side in ("before", "now"):
        r = result[side]
        hot = "n/a" if r["hot_share"] is None else f"{r['hot_share']:.0%}"
        print(f"  {side:6}: median {r['median_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms, "
              f"HOT updates {hot}")
    print(f"  before/now: {result['before_over_now']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

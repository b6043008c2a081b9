"""Stage's per-row decision (pure), settled rows, batching, and the held-batch protocol."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from leadsync.config import DestinationConfig
from leadsync.destinations import meta
from leadsync.pipeline import (
    DROP,
    QUARANTINE,
    STAGE,
    TERMINAL,
    Planned,
    Rejected,
    batch_size,
    decide,
    settled,
)
from leadsync.state import (
    BATCH_HELD,
    DELIVERED,
    EXPIRED,
    FAILED,
    PENDING,
    SKIPPED,
    Cursor,
    LedgerEntry,
    LedgerRecord,
    StateStore,
)

NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
TS = NOW - timedelta(hours=1)
PLANNED = Planned("ev-1", "Lead", NOW - timedelta(hours=2), {"event_name": "Lead"})
SKIP = Rejected("opted_out", SKIPPED, "", "ev-1", "Lead", NOW - timedelta(hours=2))
OLD = Rejected("event_too_old", EXPIRED, "", "ev-1", "Lead", NOW - timedelta(days=30))
UNMAPPED = Rejected("stage_not_mapped", SKIPPED)
GUARD = Rejected("future_event_time", "quarantined", "event_time is in the future")


def entry(status: str, ts: datetime = TS) -> LedgerEntry:
    return LedgerEntry(status, ts)


@pytest.mark.parametrize(("plan", "known", "in_batch", "action", "counts"), [
    (PLANNED, None, False, STAGE, ("staged",)),
    (PLANNED, None, True, DROP, ("in_flight",)),
    (PLANNED, entry(PENDING), False, DROP, ("in_flight",)),
    (PLANNED, entry(DELIVERED), False, DROP, ("already_delivered",)),
    # A delivered event is never staged again, even when its row changed (G2).
    (PLANNED, entry(DELIVERED, TS - timedelta(hours=1)), False, DROP, ("already_delivered",)),
    (PLANNED, entry(FAILED), False, DROP, ("already_failed",)),
    (PLANNED, entry(SKIPPED), False, DROP, ("unchanged",)),
    # A skipped event whose row changed since is planned again: now it is sent.
    (PLANNED, entry(SKIPPED, TS - timedelta(minutes=1)), False, STAGE, ("staged",)),
    (SKIP, None, False, TERMINAL, ("skipped", "skipped.opted_out")),
    (SKIP, entry(SKIPPED), False, DROP, ("unchanged",)),
    (OLD, None, False, TERMINAL, ("expired", "expired.event_too_old")),
    (UNMAPPED, None, False, DROP, ("skipped", "skipped.stage_not_mapped")),
    (GUARD, None, False, QUARANTINE, ("quarantined", "quarantined.future_event_time")),
    (GUARD, entry(DELIVERED), False, QUARANTINE, ("quarantined",
                                                  "quarantined.future_event_time")),
])
def test_decide(plan: Planned | Rejected, known: LedgerEntry | None, in_batch: bool,
                action: str, counts: tuple[str, ...]) -> None:
    decision = decide(plan, known, TS, in_batch)
    assert (decision.action, decision.counts) == (action, counts)


@pytest.mark.parametrize(("known", "ts", "expected"), [
    (None, TS, None),
    (entry(DELIVERED), TS, "already_delivered"),
    (entry(FAILED), TS - timedelta(seconds=1), "already_failed"),
    (entry(SKIPPED), TS, "unchanged"),
    (entry(EXPIRED), TS, "unchanged"),
    (entry(PENDING), TS, None),  # in flight: validated and decided like any row
    (entry(DELIVERED), TS + timedelta(seconds=1), None),  # the row changed: checked again
    (entry(SKIPPED), TS + timedelta(seconds=1), None),
])
def test_settled_rows_cost_a_key_lookup(known: LedgerEntry | None, ts: datetime,
                                        expected: str | None) -> None:
    assert settled(known, ts) == expected


def test_batch_size_is_the_destinations_capped_by_the_platform() -> None:
    limit = meta.LIMITS.max_batch_events

    def dest(size: int | None) -> DestinationConfig:
        return DestinationConfig(name="m", type="meta", crm_name="HubSpot",
                                 stages={"won": "Purchase"}, batch_size=size)

    assert batch_size(dest(None), meta) == limit
    assert batch_size(dest(7), meta) == 7
    assert batch_size(dest(limit * 5), meta) == limit


def _record(event_id: str, status: str = PENDING, batch_id: str | None = None) -> LedgerRecord:
    return LedgerRecord(event_id, "L1", "won", "Purchase", status, TS, TS, batch_id=batch_id)


def test_held_batches_are_invisible_until_released(tmp_path: Path) -> None:
    store = StateStore(create_engine(f"sqlite:///{tmp_path / 'state.db'}"))
    store.migrate()
    store.start_run("r1", "meta", None, NOW, None)
    store.stage_batch("meta", "r1", "b1", 1, [{"event_id": "e1", "event_time": 1, "body": {}}],
                      [_record("e1", batch_id="b1")], None, status=BATCH_HELD)
    assert store.pending_batch_ids("meta") == []
    assert store.release_held("meta", "r1", window_max=Cursor(TS, "L1", "won"),
                              counts={"staged": 1}) == 1
    assert store.pending_batch_ids("meta") == ["b1"]
    run = store.get_run("r1", "meta")
    assert run is not None and run["status"] == "running" and run["counts"]["staged"] == 1


def test_discarding_held_batches_forgets_what_the_run_wrote_but_sent_events(
    tmp_path: Path,
) -> None:
    store = StateStore(create_engine(f"sqlite:///{tmp_path / 'state.db'}"))
    store.migrate()
    store.start_run("r0", "meta", None, NOW, None)
    store.record_terminal("meta", "r0", [_record("kept", SKIPPED)])
    store.start_run("r1", "meta", None, NOW, None)
    store.stage_batch("meta", "r1", "b1", 1, [{"event_id": "e1", "event_time": 1, "body": {}}],
                      [_record("e1", batch_id="b1")], None, status=BATCH_HELD)
    store.record_terminal("meta", "r1", [_record("s1", SKIPPED), _record("d1", DELIVERED)])
    assert store.discard_held("meta", "r1", status="contract_failed") == 1
    assert {r["event_id"] for r in store.ledger_rows("meta")} == {"kept", "d1"}
    run = store.get_run("r1", "meta")
    assert run is not None and run["status"] == "contract_failed"
    assert store.release_held("meta", "r1") == 0 and store.pending_batch_ids("meta") == []


def test_a_run_with_nothing_new_does_not_import_great_expectations(tmp_path: Path) -> None:
    """Settled rows are skipped by key: GX (seconds to import) stays out of a no-op run."""
    import subprocess

    script = tmp_path / "noop.py"
    script.write_text(_NOOP_SCRIPT)
    seen = []
    for run_id in ("r1", "r2"):  # each run in a fresh process, as Airflow runs a task
        done = subprocess.run([sys.executable, str(script), str(tmp_path), run_id],
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        seen.append(" ".join(done.stdout.split()[-2:]))
    # The first run validated its rows in a worker process (contract.separate_process), so
    # the task's own process never imported GX; the second needed no worker at all.
    assert seen == ["gx-not-loaded worker-used", "gx-not-loaded worker-not-used"]


_NOOP_SCRIPT = '''
import sys
from datetime import UTC, datetime
from pathlib import Path

import yaml
from sqlalchemy import create_engine

from leadsync import demo_data
from leadsync.config import DEFAULT_CONFIG_PATH, parse_config
from leadsync.pipeline import Pipeline
from leadsync.state import StateStore

tmp = Path(sys.argv[1])
run_id = sys.argv[2]
data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
data["contract"]["data_docs"] = False
config = parse_config(data)
wh = create_engine(f"sqlite:///{tmp / 'wh.db'}")
if run_id == "r1":
    demo_data.create_schema(wh)
    # Six days of rows: the lookback of the second run re-reads the last two hours.
    demo_data._load(wh, demo_data.generate_rows_fast(3000, datetime.now(UTC)), True)
state = StateStore(create_engine(f"sqlite:///{tmp / 'state.db'}"))


def run(run_id):
    pipeline = Pipeline(config, config.destination("meta"), state, wh)
    pipeline.open_run(run_id)
    report = pipeline.check(run_id)
    staged = pipeline.stage(run_id)
    # Settle what was staged without sending (stand-in for push): as delivered.
    from leadsync.state import EventOutcome
    for batch_id in staged["batch_ids"]:
        batch = state.load_batch(batch_id)
        state.record_outcomes(batch, {e["event_id"]: EventOutcome("delivered")
                                      for e in batch.events}, run_id)
    pipeline.commit(run_id)
    return report


report = run(run_id)
if run_id == "r1":
    assert report["rows"] > 2000, report
else:
    assert report["rows"] == 0 and report["passed"], report
    counts = state.get_run(run_id, "meta")["counts"]
    assert counts["read"] > 0 and counts.get("staged", 0) == 0, counts
print("gx-loaded" if "great_expectations" in sys.modules else "gx-not-loaded",
      "worker-used" if "leadsync.contract_worker" in sys.modules else "worker-not-used")
'''


def test_one_pass_counts_every_batch_and_stages_a_shared_event_id_once(tmp_path: Path) -> None:
    """The last, partial batch is counted; two rows with one event id in two batches of one
    validation group are staged once (the second is in flight), with the contract on."""
    import yaml

    from leadsync import demo_data
    from leadsync.config import DEFAULT_CONFIG_PATH, parse_config
    from leadsync.pipeline import Pipeline
    from leadsync.state import outbox

    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["contract"]["data_docs"] = False
    for dest in data["destinations"]:
        if dest["name"] == "meta":
            dest["batch_size"] = 7
    config = parse_config(data)
    wh = create_engine(f"sqlite:///{tmp_path / 'wh.db'}")
    demo_data.create_schema(wh)
    rows = list(demo_data.generate_rows_fast(40, datetime.now(UTC)))
    rows[3]["event_id"] = rows[12]["event_id"] = "shared-event-id"
    demo_data._load(wh, rows, True)
    state = StateStore(create_engine(f"sqlite:///{tmp_path / 'state.db'}"))
    pipeline = Pipeline(config, config.destination("meta"), state, wh)
    pipeline.open_run("r1")
    assert pipeline.check("r1")["rows"] == 40
    counts = pipeline.stage("r1")["counts"]
    with state.engine.connect() as conn:
        batches = conn.execute(outbox.select()).fetchall()
    assert counts["batches"] == len(batches) >= 2
    assert sum(b.n_events for b in batches) == counts["staged"]
    assert counts["in_flight"] == 1
    ledger = state.ledger_rows("meta")
    assert [r["event_id"] for r in ledger].count("shared-event-id") == 1
    assert sum(1 for r in ledger if r["status"] == PENDING) == counts["staged"]

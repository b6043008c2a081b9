"""The stage worker (state.writer_process): a large window's staging written from a process
of its own stages exactly what the task's own process would, and a crash or a dead worker
loses nothing and sends nothing twice."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select, text

from leadsync import demo_data, faults, pipeline, stage_worker
from leadsync.config import Config, parse_config
from leadsync.db import make_engine
from leadsync.state import StateStore
from leadsync.state.schema import outbox

from .test_faults import (
    Tally,
    World,
    check_invariants,
    fault_config,
    postgres_world,
    run_like_the_dag,
    run_schedule,
    run_sqlite_schedules,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _count_starts(monkeypatch: pytest.MonkeyPatch, min_rows: int) -> list[int]:
    """The pids of the stage workers started, with the worker's threshold at ``min_rows``."""
    started: list[int] = []
    real = stage_worker.RemoteStager.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        started.append(self.proc.pid)

    monkeypatch.setattr(pipeline, "WRITER_PROCESS_MIN_ROWS", min_rows)
    monkeypatch.setattr(stage_worker.RemoteStager, "__init__", counting)
    return started


@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every window uses the stage worker, however small; counts the workers started."""
    return _count_starts(monkeypatch, 0)


def _config(writer_process: bool, contract: bool = True, lookback: str = "2h") -> Config:
    return parse_config({
        "source": {"query_file": str(ROOT / "include" / "sql" / "converted_leads.sql"),
                   "chunk_size": 50, "lookback": lookback},
        "state": {"writer_process": writer_process},
        "contract": {"enabled": contract, "batch_rows": 100, "data_docs": False},
        "destinations": [{"name": "meta", "type": "meta", "crm_name": "Test CRM",
                          "batch_size": 40,
                          "stages": {"lead": "Lead", "qualified": "Marketing Qualified Lead",
                                     "sales_accepted": "Sales Qualified Lead",
                                     "won": "Converted"}}],
    })


def _checked(world: World, run_id: str) -> dict[str, Any]:
    """Opens a run and checks it; what it staged, in order, and what it counted."""
    p = world.pipeline()
    p.open_run(run_id)
    p.check(run_id)
    store = p.state
    run = store.get_run(run_id, "meta")
    assert run is not None
    with store.engine.connect() as conn:
        batches = [(r.seq, r.n_events, r.status) for r in conn.execute(
            select(outbox.c.seq, outbox.c.n_events, outbox.c.status)
            .where(outbox.c.run_id == run_id).order_by(outbox.c.seq))]
        quarantined = sorted(tuple(r) for r in conn.execute(text(
            "SELECT lead_id, stage, rule FROM ls_quarantine WHERE destination = 'meta'")))
    ledger = sorted((r["event_id"], r["status"], r["reason"]) for r in store.ledger_rows("meta"))
    counts = {k: v for k, v in run["counts"].items() if not k.startswith("seconds")}
    return {"counts": counts, "batches": batches, "ledger": ledger, "quarantine": quarantined}


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_the_stage_worker_stages_what_the_task_would(
        kind: str, tmp_path: Path, sandbox: Any, starts: list[int],
        request: pytest.FixtureRequest) -> None:
    now = datetime.now(UTC)
    seen = []
    for writer in (False, True):
        if kind == "sqlite":
            folder = tmp_path / str(writer)
            folder.mkdir()
            wh, state = f"sqlite:///{folder / 'wh.db'}", f"sqlite:///{folder / 'state.db'}"
        else:
            wh = state = request.getfixturevalue("pg_url")
            engine = make_engine(wh)
            with engine.begin() as conn:
                conn.execute(text("DROP SCHEMA public CASCADE"))
                conn.execute(text("CREATE SCHEMA public"))
            engine.dispose()
        world = World(_config(writer), wh, state, sandbox.url)
        demo_data.seed(make_engine(wh), 150, now, seed=11, broken_rows=True)
        seen.append(_checked(world, f"r{writer}"))
    assert len(starts) == 1  # the second pass ran in a stage worker, the first did not
    alone, beside = seen
    assert beside["counts"] == alone["counts"]
    assert alone["counts"]["staged"] > 100 and alone["counts"]["quarantined"] > 0
    assert beside["batches"] == alone["batches"]
    assert all(status == "pending" for _, _, status in beside["batches"])  # released
    assert beside["ledger"] == alone["ledger"]
    assert beside["quarantine"] == alone["quarantine"]


def _crash_at_second_write(world: World, run_id: str) -> int:
    """Checks with a crash armed at the second write of staged batches; returns how many
    batches that left held."""
    faults.arm("after_stage_batch", "raise", 2)
    try:
        with pytest.raises(faults.InjectedCrash, match="after_stage_batch"):
            run_like_the_dag(world, run_id)
    finally:
        faults.arm(None)
    store = world.store()
    assert not store.pending_batch_ids("meta")  # held: nothing of the crashed check is sendable
    with store.engine.connect() as conn:
        held = conn.execute(text("SELECT count(*) FROM ls_outbox WHERE status = 'held'"))
        return int(held.scalar() or 0)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_crash_after_a_batch_the_worker_staged_crashes_the_task(
        kind: str, tmp_path: Path, sandbox: Any, starts: list[int],
        monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """The crash happens right after the worker's second write, with nothing written after
    it: as many batches held as when the task stages the same window itself; the next run
    delivers everything once (the worker writing to SQLite, and to Postgres)."""
    now = datetime.now(UTC)
    if kind == "postgres":
        world = postgres_world(request.getfixturevalue("pg_url"), sandbox.url)
    else:
        world = request.getfixturevalue("world")
    demo_data.seed(make_engine(world.warehouse_url), 30, now)
    held = _crash_at_second_write(world, "crashed")
    assert starts, "the check should have staged through the stage worker"
    # The same window staged by the task's own process stops at the same point.
    (tmp_path / "alone").mkdir()
    alone = World(world.config, f"sqlite:///{tmp_path / 'alone' / 'wh.db'}",
                  f"sqlite:///{tmp_path / 'alone' / 'state.db'}", sandbox.url)
    demo_data.seed(make_engine(alone.warehouse_url), 30, now)
    monkeypatch.setattr(pipeline, "WRITER_PROCESS_MIN_ROWS", 10**9)
    assert held == _crash_at_second_write(alone, "crashed") >= 2
    monkeypatch.setattr(pipeline, "WRITER_PROCESS_MIN_ROWS", 0)
    time.sleep(0.45)  # the dead run's lease expires
    assert run_like_the_dag(world, "rerun") == "success"
    check_invariants(world, set(), 0, Tally())


def test_random_fault_schedules_with_the_stage_worker_on_postgres(
        pg_url: str, sandbox: Any, starts: list[int], request: pytest.FixtureRequest) -> None:
    tally = Tally()
    base = int(request.config.getoption("--schedule-seed")) + 300_000
    for i in range(4):
        run_schedule(base + i, postgres_world(pg_url, sandbox.url), tally)
    assert starts
    assert tally.lost == 0 and tally.double_counted == 0


def test_a_dead_worker_fails_the_check_clearly_and_loses_nothing(
        world: World, starts: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    demo_data.seed(make_engine(world.warehouse_url), 30, datetime.now(UTC))
    real_add = stage_worker.RemoteStager.add
    calls = []

    def dying(self: Any, items: list[Any]) -> None:
        calls.append(1)
        if len(calls) == 3:
            self.proc.kill()
            self.proc.wait()
        real_add(self, items)

    monkeypatch.setattr(stage_worker.RemoteStager, "add", dying)
    p = world.pipeline()
    p.open_run("dies")
    with pytest.raises(stage_worker.StageWorkerError, match="stage worker") as caught:
        p.check("dies")
    assert "Traceback" not in str(caught.value)
    p.commit("dies")
    store = world.store()
    assert not store.pending_batch_ids("meta")
    monkeypatch.setattr(stage_worker.RemoteStager, "add", real_add)
    assert run_like_the_dag(world, "after") == "success"
    check_invariants(world, set(), 0, Tally())


def test_random_fault_schedules_with_the_stage_worker(
        tmp_path: Path, sandbox: Any, starts: list[int], request: pytest.FixtureRequest) -> None:
    tally = Tally()
    base = int(request.config.getoption("--schedule-seed")) + 200_000
    run_sqlite_schedules(tmp_path, sandbox.url, base, 6, tally)
    assert starts
    assert tally.lost == 0 and tally.double_counted == 0


def test_an_in_memory_state_store_stages_in_the_task(starts: list[int]) -> None:
    assert not pipeline._shareable(StateStore(make_engine("sqlite://")))
    assert pipeline._shareable(StateStore(make_engine("sqlite:////tmp/x.db")))
    assert json.dumps(_config(True).state.writer_process) == "true"


@pytest.fixture
def world(tmp_path: Path, sandbox: Any) -> World:
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=5).raise_for_status()
    return World(fault_config(), f"sqlite:///{tmp_path / 'wh.db'}",
                 f"sqlite:///{tmp_path / 'state.db'}", sandbox.url)


def test_a_run_with_nothing_new_starts_no_stage_worker(
        tmp_path: Path, sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker starts for rows to decide and write, not for rows read: a run whose lookback
    re-reads only settled rows (each a key lookup) stages nothing and starts no process."""
    started = _count_starts(monkeypatch, 100)
    wh, state = f"sqlite:///{tmp_path / 'wh.db'}", f"sqlite:///{tmp_path / 'state.db'}"
    world = World(_config(True, lookback="3650d"), wh, state, sandbox.url)  # re-reads all
    demo_data.seed(make_engine(wh), 150, datetime.now(UTC), seed=11)
    assert run_like_the_dag(world, "r1") == "success"
    assert len(started) == 1  # 150 rows to stage: in the worker
    assert run_like_the_dag(world, "r2") == "success"
    counts = world.store().get_run("r2", "meta")["counts"]
    assert counts["read"] >= 100 and not counts.get("staged"), counts
    assert len(started) == 1  # the no-op run: none

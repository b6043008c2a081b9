"""Delivery guarantees under crashes and platform faults (G1–G4, G6), by fault injection.

``test_random_fault_schedules`` drives many seeded random schedules: crash points × platform
faults × new rows arriving between runs, each run following the DAG's task semantics (task
retries, a crash ends the process, the leaf task runs on all_done), until a clean run
succeeds; then it checks the sandbox's record against the warehouse and the ledger. CI runs
``--schedules`` (default 200); ``make soak`` runs 1,000 and prints the tally.

The other tests use real processes: a ``SIGKILL`` mid-send, and two processes racing for one
destination.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from sqlalchemy import Engine, update

from leadsync import demo_data, faults
from leadsync.config import Config, parse_config
from leadsync.db import make_engine
from leadsync.destinations import get_destination
from leadsync.destinations.base import FatalDestinationError
from leadsync.destinations.meta import parse_credentials
from leadsync.pipeline import Pipeline, Planned, plan_row
from leadsync.source import Source, Window
from leadsync.state import LeaseBusyError, StateStore
from leadsync.state.schema import leases

from .conftest import META_PIXEL, META_TOKEN

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def fault_config(batch_size: int = 7, lease_wait: str = "3s", extra_dest: bool = False) -> Config:
    dest = {
        "name": "meta", "type": "meta", "shape": "crm", "crm_name": "Test CRM",
        "batch_size": batch_size,
        "stages": {"lead": "Lead", "qualified": "Marketing Qualified Lead",
                   "sales_accepted": "Sales Qualified Lead", "won": "Converted"},
        "retry": {"attempts": 3, "backoff_base": "0s", "backoff_max": "10ms",
                  "timeout": "400ms"},
    }
    dests = [dest]
    if extra_dest:
        dests.append({**dest, "name": "meta_b", "connection_id": "leadsync_meta",
                      "stages": {"won": "Purchase Won"}})
    return parse_config({
        "source": {"lookback": "2h", "settle_lag": "2m", "chunk_size": 11, "page_size": 23},
        "state": {"lease_ttl": "400ms", "lease_wait": lease_wait},
        # The contract (and its Data Docs) is not what these schedules test, and it costs
        # ~0.5 s a run; check_contract still runs, as a no-op, in every schedule.
        "contract": {"enabled": False},
        "destinations": dests,
    })


@dataclass
class World:
    """One schedule's warehouse, state store and sandbox."""

    config: Config
    warehouse_url: str
    state_url: str
    sandbox_url: str
    watermarks: list[Any] = field(default_factory=list)
    # Engines made for the current run (fresh ones per run, as each task process has):
    # released when the run ends, so their connections do not wait for the garbage
    # collector (ten Postgres schedules reached the server's 100 connections).
    engines: list[Engine] = field(default_factory=list)

    def engine(self, url: str) -> Engine:
        engine = make_engine(url)
        self.engines.append(engine)
        return engine

    def release(self) -> None:
        while self.engines:
            self.engines.pop().dispose()

    def pipeline(self, dest: str = "meta") -> Pipeline:
        creds = parse_credentials(self.sandbox_url, META_TOKEN, {"pixel_id": META_PIXEL})
        return Pipeline(self.config, self.config.destination(dest), self.store(),
                        self.engine(self.warehouse_url), credentials=lambda: creds,
                        sleep=lambda s: None)

    def store(self) -> StateStore:
        store = StateStore(self.engine(self.state_url))
        store.migrate()
        return store

    def lease_expires(self) -> None:
        """The dead run's lease expires: its expiry is moved into the past, as ``lease_ttl``
        (400 ms) after its last renewal would have, instead of waited for (~280 crashes in
        the 200 schedules: two minutes of the suite). The next run takes the lease back as
        it takes an expired one; waiting for the expiry itself is tested by the real
        processes below and by the state store's lease tests.

        The dead run's requests still in flight (its lanes' sending threads, which a real
        crash would have killed with the process) are answered first, so that they cannot
        reach the sandbox after the schedule ended and it was reset for the next one."""
        for thread in threading.enumerate():
            if " send_" in thread.name:  # the lanes' ThreadPoolExecutor workers
                thread.join(timeout=10)
        engine = self.engine(self.state_url)
        try:
            with engine.begin() as conn:
                conn.execute(update(leases).values(
                    expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        finally:
            self.release()

    def faults(self, *items: dict[str, Any]) -> None:
        requests.post(f"{self.sandbox_url}/_sandbox/faults",
                      json={"platform": "meta", "faults": list(items)},
                      timeout=5).raise_for_status()

    def sandbox_events(self) -> list[dict[str, Any]]:
        resp = requests.get(f"{self.sandbox_url}/_sandbox/meta/events", timeout=30)
        resp.raise_for_status()
        return list(resp.json())


def _task(fn: Callable[[], T], retries: int) -> T:
    """One Airflow task: retried on ordinary errors; an InjectedCrash kills the 'process'."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except LeaseBusyError:
            raise
        except FatalDestinationError:
            raise
        except Exception:
            if attempt == retries:
                raise
    raise AssertionError("unreachable")


def run_like_the_dag(world: World, run_id: str) -> str:
    """One DAG run: open_run → check_contract (checks and stages the window, then names the
    lanes) → push_lane (mapped over those lanes, run one after the other here) →
    commit_watermark (all_done)."""
    try:
        return _run_like_the_dag(world, run_id)
    finally:
        world.release()


def _run_like_the_dag(world: World, run_id: str) -> str:
    pipeline = world.pipeline()
    try:
        pipeline.open_run(run_id)
    except LeaseBusyError:
        return "skipped"
    pushed_ok = True

    def check_contract() -> dict[str, Any]:
        pipeline.check(run_id)
        return pipeline.stage(run_id)

    try:
        staged = _task(check_contract, retries=2)
    except Exception:  # noqa: BLE001 - the task failed for good; downstream is upstream_failed
        staged = None
        pushed_ok = False
    if staged is not None:
        for lane in staged["lanes"]:  # as many as the DAG maps push_lane over
            try:
                _task(lambda n=lane: pipeline.push_lane(run_id, n), retries=1)
            except Exception:  # noqa: BLE001 - recorded; the run turns red at the leaf
                pushed_ok = False
    summary = _task(lambda: pipeline.commit(run_id), retries=2)
    world.watermarks.append(pipeline.state.get_watermark("meta"))
    return "success" if pushed_ok and not summary["pending_batches"] else "failed"


def expected_events(world: World) -> dict[str, Planned]:
    """Every event the warehouse holds that is eligible now (independent of the ledger)."""
    pipeline = world.pipeline()
    module = get_destination("meta")
    source = Source(pipeline.warehouse, world.config.source.read_query(), 500, 10_000)
    now = datetime.now(UTC)
    wanted: dict[str, Planned] = {}
    try:
        for chunk in source.stream(Window(None, now + timedelta(days=1))):
            for row in chunk:
                plan = plan_row(row, world.config.destination("meta"), module, now)
                if isinstance(plan, Planned):
                    wanted[plan.event_id] = plan
    finally:
        world.release()
    return wanted


FAULT_MENU: list[Callable[[random.Random, list[str]], dict[str, Any]]] = [
    lambda r, ids: {"kind": "graph_error", "code": r.choice([1, 2, 368]), "is_transient": True,
                    "times": r.randint(1, 3)},
    lambda r, ids: {"kind": "http", "status": r.choice([500, 502, 503]), "times": r.randint(1, 2)},
    lambda r, ids: {"kind": "throttle", "code": r.choice([4, 17, 80003]), "times": 1},
    lambda r, ids: {"kind": "timeout_after_processing", "delay_s": 0.6, "times": 1},
    lambda r, ids: {"kind": "slow", "delay_s": 0.05, "times": 1},
    lambda r, ids: {"kind": "graph_error", "code": 190, "is_transient": False, "times": 1,
                    "http_status": 400},
    lambda r, ids: {"kind": "reject_events", "event_ids": [r.choice(ids)] if ids else [],
                    "reason": "poison event", "times": 40},
]


@dataclass
class Tally:
    schedules: int = 0
    runs: int = 0
    crashes: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    delivered: int = 0
    dead_letters: int = 0
    lost: int = 0
    double_counted: int = 0
    lost_then_rejected: int = 0


def run_schedule(seed: int, world: World, tally: Tally) -> None:
    rng = random.Random(seed)
    wh = make_engine(world.warehouse_url)
    demo_data.seed(wh, rng.randint(8, 30), datetime.now(UTC), seed=seed)
    poison: set[str] = set()
    lost_response = False
    for n in range(rng.randint(2, 5)):
        if n and rng.random() < 0.6:
            lag = world.config.source.settle_lag + timedelta(seconds=1)
            demo_data.add_changes(wh, rng.randint(1, 6), datetime.now(UTC) - lag, seed=seed + n)
        if rng.random() < 0.7:
            ids = sorted(expected_events(world))
            items = [rng.choice(FAULT_MENU)(rng, ids) for _ in range(rng.randint(1, 3))]
            for item in items:
                tally.faults[item["kind"]] += 1
                if item["kind"] == "reject_events":
                    poison.update(item["event_ids"])
                lost_response |= item["kind"] == "timeout_after_processing"
            world.faults(*items)
        if rng.random() < 0.6:
            point = rng.choice(faults.POINTS)
            faults.arm(point, "raise", rng.randint(1, 2))
            lost_response |= point == "after_send_before_record"
        tally.runs += 1
        try:
            run_like_the_dag(world, f"s{seed}_r{n}")
        except faults.InjectedCrash:
            tally.crashes += 1
            world.lease_expires()
        finally:
            faults.arm(None)
    # Recovery: the platform is healthy again; run until a run succeeds.
    requests.delete(f"{world.sandbox_url}/_sandbox/faults", timeout=5).raise_for_status()
    for attempt in range(6):
        tally.runs += 1
        if run_like_the_dag(world, f"s{seed}_final{attempt}") == "success":
            break
    else:
        pytest.fail(f"schedule {seed}: no successful run after recovery")
    wh.dispose()
    try:
        check_invariants(world, poison, seed, tally, lost_response)
    finally:
        world.release()


def check_invariants(world: World, poison: set[str], seed: int, tally: Tally,
                     lost_response: bool = False) -> None:
    expected = expected_events(world)
    events = world.sandbox_events()
    unique = [e for e in events if not e.get("duplicate")]
    got = Counter(e["event_id"] for e in unique)
    store = world.store()
    ledger = {r["event_id"]: r for r in store.ledger_rows("meta")}
    delivered = {k for k, r in ledger.items() if r["status"] == "delivered"}
    failed = {k for k, r in ledger.items() if r["status"] == "failed"}

    lost = set(expected) - set(got) - failed
    doubled = {k for k, n in got.items() if n > 1}
    unexpected = set(got) - set(expected)
    tally.lost += len(lost)
    tally.double_counted += len(doubled)
    tally.delivered += len(got)
    tally.dead_letters += len(failed)
    context = f"schedule seed {seed}"
    assert not lost, f"{context}: {len(lost)} eligible events never delivered (G1)"
    assert not doubled, f"{context}: events counted twice (G2): {sorted(doubled)[:5]}"
    assert not unexpected, f"{context}: events with unexpected ids sent: {sorted(unexpected)[:5]}"
    assert failed <= poison, f"{context}: dead letters that were not poisoned: {failed - poison}"
    # G6: the ledger says delivered exactly for what the platform holds — except an event
    # whose request was processed but whose response was lost, and which the platform then
    # rejected on the resend: leadsync can only record the answer it got (a dead letter).
    platform_only = set(got) - delivered
    lost_then_rejected = {k for k in platform_only if k in failed and k in poison}
    assert platform_only == lost_then_rejected and (not platform_only or lost_response), (
        f"{context}: ledger and platform disagree (G6): platform-only "
        f"{[(k, ledger.get(k, {}).get('status')) for k in platform_only][:5]}")
    assert delivered <= set(got), f"{context}: delivered in the ledger, unknown to the platform"
    tally.lost_then_rejected += len(lost_then_rejected)
    assert not store.pending_batch_ids("meta"), f"{context}: batches left pending"
    marks = [w for w in world.watermarks if w is not None]
    keys = [(w.ts, str(w.lead_id), w.stage) for w in marks]
    assert keys == sorted(keys), f"{context}: the watermark moved backward (G3)"


@pytest.fixture
def world(tmp_path: Path, sandbox: Any) -> Iterator[World]:
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=5).raise_for_status()
    yield World(fault_config(), f"sqlite:///{tmp_path / 'wh.db'}",
                f"sqlite:///{tmp_path / 'state.db'}", sandbox.url)


def run_sqlite_schedules(tmp_path: Path, sandbox_url: str, base: int, n: int,
                         tally: Tally) -> None:
    """``n`` random schedules from seed ``base``, each in a fresh SQLite world."""
    for i in range(n):
        requests.post(f"{sandbox_url}/_sandbox/reset", timeout=5).raise_for_status()
        folder = tmp_path / f"s{i}"
        folder.mkdir()
        world = World(fault_config(), f"sqlite:///{folder / 'wh.db'}",
                      f"sqlite:///{folder / 'state.db'}", sandbox_url)
        run_schedule(base + i, world, tally)
        tally.schedules += 1


def test_random_fault_schedules(request: pytest.FixtureRequest, tmp_path: Path,
                                sandbox: Any) -> None:
    n = int(request.config.getoption("--schedules"))
    base = int(request.config.getoption("--schedule-seed"))
    tally = Tally()
    started = time.monotonic()
    run_sqlite_schedules(tmp_path, sandbox.url, base, n, tally)
    elapsed = time.monotonic() - started
    print(f"\nfault-injection tally: {tally.schedules} schedules, {tally.runs} runs, "
          f"{tally.crashes} crashes, faults {dict(tally.faults)}; delivered {tally.delivered}, "
          f"dead letters {tally.dead_letters} ({tally.lost_then_rejected} after a lost response), "
          f"lost {tally.lost}, "
          f"double-counted {tally.double_counted}; {elapsed:.0f}s")
    assert tally.lost == 0 and tally.double_counted == 0


def postgres_world(pg_url: str, sandbox_url: str) -> World:
    """A fresh world in the test's Postgres database (warehouse and state store in one, as
    in production), the sandbox reset."""
    from sqlalchemy import text

    requests.post(f"{sandbox_url}/_sandbox/reset", timeout=5).raise_for_status()
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return World(fault_config(), pg_url, pg_url, sandbox_url)


def test_random_schedules_on_postgres(request: pytest.FixtureRequest, pg_url: str,
                                      sandbox: Any) -> None:
    tally = Tally()
    base = int(request.config.getoption("--schedule-seed")) + 100_000
    for i in range(10):
        run_schedule(base + i, postgres_world(pg_url, sandbox.url), tally)
    assert tally.lost == 0 and tally.double_counted == 0


# -- real processes -----------------------------------------------------------------------

_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from integration.test_faults import World, fault_config
cfg = fault_config(lease_wait=sys.argv[4], extra_dest=True)
world = World(cfg, sys.argv[1], sys.argv[2], sys.argv[3])
from leadsync.state import LeaseBusyError
try:
    summary = world.pipeline(sys.argv[5]).run(sys.argv[6])
except LeaseBusyError as exc:
    print(json.dumps({{"busy": str(exc)}}))
    sys.exit(3)
print(json.dumps({{"status": summary["status"]}}))
"""


def _child(world: World, run_id: str, *, dest: str = "meta", lease_wait: str = "3s",
           crash: str | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop(faults.ENV_VAR, None)
    if crash:
        env[faults.ENV_VAR] = crash
    code = _CHILD.format(tests=str(ROOT / "tests"))
    return subprocess.Popen(
        [sys.executable, "-c", code, world.warehouse_url, world.state_url, world.sandbox_url,
         lease_wait, dest, run_id], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def test_sigkill_mid_send_then_rerun_delivers_everything_once(world: World) -> None:
    demo_data.seed(make_engine(world.warehouse_url), 40, datetime.now(UTC))
    # The process dies after the platform accepted the second batch but before its outcome
    # was recorded: no finally, no rollback.
    proc = _child(world, "killed", crash="after_send_before_record:kill@2")
    proc.wait(timeout=120)
    assert proc.returncode == -9, proc.stderr.read()[-2000:]
    store = world.store()
    assert store.pending_batch_ids("meta"), "the killed run should leave pending batches"
    time.sleep(1.1)  # the dead process's lease expires
    world.watermarks.clear()
    assert run_like_the_dag(world, "rerun") == "success"
    check_invariants(world, set(), 0, Tally())
    stats = requests.get(f"{world.sandbox_url}/_sandbox/stats", timeout=5).json()["meta"]
    assert stats["duplicate_events"] > 0  # the lost-outcome batch was resent, and deduplicated


def test_sigkill_at_every_point_recovers(world: World) -> None:
    demo_data.seed(make_engine(world.warehouse_url), 20, datetime.now(UTC))
    for point in faults.POINTS:
        if point == "between_batches":
            continue  # only reached by a lane with ≥ 2 batches to send: covered above
        proc = _child(world, f"kill_{point}", crash=f"{point}:kill")
        proc.wait(timeout=120)
        time.sleep(1.1)
        lag = world.config.source.settle_lag + timedelta(seconds=1)
        demo_data.add_changes(make_engine(world.warehouse_url), 3, datetime.now(UTC) - lag)
    assert run_like_the_dag(world, "final") == "success"
    check_invariants(world, set(), 1, Tally())


def test_two_processes_on_one_destination_never_interleave(world: World) -> None:
    demo_data.seed(make_engine(world.warehouse_url), 60, datetime.now(UTC))
    world.faults({"kind": "slow", "delay_s": 0.3, "times": 3})
    procs = [_child(world, f"racer{i}", lease_wait="0s") for i in range(2)]
    codes = [p.wait(timeout=120) for p in procs]
    outputs = [p.stdout.read() for p in procs]
    assert sorted(codes) == [0, 3], outputs  # one ran, the other exited cleanly: busy
    assert any("busy" in o for o in outputs)
    check_invariants(world, set(), 2, Tally())


def test_two_destinations_run_in_parallel_independently(world: World) -> None:
    demo_data.seed(make_engine(world.warehouse_url), 60, datetime.now(UTC))
    procs = [_child(world, "a", dest="meta"), _child(world, "b", dest="meta_b")]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0], [p.stderr.read()[-1500:] for p in procs]
    summary = world.store().summary(["meta", "meta_b"])
    assert summary["meta"]["delivered"] > summary["meta_b"]["delivered"] > 0
    assert summary["meta"]["watermark"] and summary["meta_b"]["watermark"]
    names = Counter(e["event_name"] for e in world.sandbox_events())
    assert names["Purchase Won"] == summary["meta_b"]["delivered"]


def test_kill_9_during_airflow_dags_test_then_rerun(tmp_path: Path, sandbox: Any,
                                                    airflow_db: None) -> None:
    """The real DAG in a real ``airflow dags test`` process, killed mid-send, then rerun."""
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=5).raise_for_status()
    wh = f"sqlite:///{tmp_path / 'wh.db'}"
    st = f"sqlite:///{tmp_path / 'st.db'}"
    demo_data.seed(make_engine(wh), 40, datetime.now(UTC))
    cfg_path = tmp_path / "leadsync.yaml"
    cfg_path.write_text(
        "source: {query_file: %s}\nstate: {lease_ttl: 2s, lease_wait: 20s}\n"
        "destinations:\n  - name: meta\n    type: meta\n    crm_name: Test CRM\n"
        "    batch_size: 10\n    stages: {lead: Lead, qualified: Qualified, won: Won}\n"
        % (ROOT / "include" / "sql" / "converted_leads.sql"))
    env = dict(os.environ)
    env.update({
        "LEADSYNC_CONFIG": str(cfg_path),
        "AIRFLOW_CONN_LEADSYNC_WAREHOUSE": json.dumps(
            {"conn_type": "generic", "extra": {"sqlalchemy_url": wh}}),
        "AIRFLOW_CONN_LEADSYNC_STATE": json.dumps(
            {"conn_type": "generic", "extra": {"sqlalchemy_url": st}}),
        "AIRFLOW_CONN_LEADSYNC_META": json.dumps({
            "conn_type": "http", "host": sandbox.url, "password": META_TOKEN,
            "extra": {"pixel_id": META_PIXEL}}),
    })
    airflow = str(Path(sys.executable).with_name("airflow"))
    killed = subprocess.run([airflow, "dags", "test", "leadsync_meta"], capture_output=True,
                            text=True, env={**env, faults.ENV_VAR:
                                            "after_send_before_record:kill@2"}, timeout=300)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    world = World(fault_config(), wh, st, sandbox.url)
    assert world.store().pending_batch_ids("meta")
    rerun = subprocess.run([airflow, "dags", "test", "leadsync_meta"], capture_output=True,
                           text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-2000:]
    store = world.store()
    assert not store.pending_batch_ids("meta")
    unique = {e["event_id"] for e in world.sandbox_events() if not e.get("duplicate")}
    delivered = {r["event_id"] for r in store.ledger_rows("meta") if r["status"] == "delivered"}
    assert unique == delivered and len(delivered) > 0

"""Benchmark (e): the real DAG under a real scheduler, as users run it.

(d) runs ``airflow dags test``: one process runs every task in turn. Here the same case (fresh
state, the same rows, the same lean loopback sink and config) runs on the local cluster of
``leadsync.cluster`` (what ``make cluster`` starts: API server, scheduler, dag-processor,
triggerer, on this machine's Postgres for Airflow's metadata), with the CeleryExecutor and two
workers (Redis as the broker) or the LocalExecutor (the scheduler runs the tasks itself, as
many at once as the two workers' slots). Each task is then a process of its own, started by a
worker, talking to the API server; the two push lanes run at the same time.

What is measured, from Airflow's own records of the run: the DAG's first scheduled run (the
scheduler creates it as soon as the DAG is parsed), from its start to its end, and how long it
was queued before; each task instance's time and worker; the time from a task becoming
runnable (its upstream tasks ended) to its start, and the time within the run when none of its
tasks ran. Beside it, in the same cluster: Airflow's fixed cost (a trivial two-task DAG,
triggered through the REST API after the run, from its start to its end) and a run with nothing
new (triggered the same way). Phases of the pass come from ``check_contract``'s task log.

Correctness as in (d): events the sink received once == ledger delivered == eligible rows
counted in SQL, nothing received twice, nothing pending or failed.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine

from leadsync.bench_dag import (
    _PASS_LINE,
    _TRIVIAL_DAG,
    ROOT,
    DagCase,
    _airflow_env,
    _config,
    _databases,
    _fmt_state,
    _Sink,
    busy_cores,
    delivery_problems,
    ledger_summary,
    load_warehouse,
    machine_busy_s,
)
from leadsync.cluster import EXECUTOR_NAMES

DAG_ID = "leadsync_meta"
EXECUTORS = EXECUTOR_NAMES
TERMINAL = ("success", "failed")
RUN_TIMEOUT_S = 1800.0  # a 1M-row run takes minutes; a stuck one fails the case, not the bench


@dataclass(frozen=True)
class Span:
    """One task instance of a run, from Airflow's metadata."""

    task_id: str
    map_index: int
    start: datetime
    end: datetime
    hostname: str
    state: str

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


@dataclass
class RunRecord:
    """One DAG run on the scheduler."""

    dag_id: str
    run_id: str
    state: str
    queued: datetime | None
    start: datetime
    end: datetime
    spans: list[Span] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return (self.end - self.start).total_seconds()

    @property
    def queued_s(self) -> float:
        return (self.start - self.queued).total_seconds() if self.queued else 0.0


@dataclass
class SchedulerCase:
    """One case of (e): a backend, a row count and an executor."""

    backend: str
    rows: int
    executor: str
    load_s: float = 0.0
    start_s: float = 0.0  # the cluster's start, until the API server answered
    first: RunRecord | None = None
    noop: RunRecord | None = None
    trivial: RunRecord | None = None
    phases: dict[str, float] = field(default_factory=dict)
    sink_requests: int = 0
    sink_events: int = 0
    sink_busy_s: float = 0.0
    expected: int = 0
    delivered: int = 0
    problems: list[str] = field(default_factory=list)
    error: str = ""  # why the case could not run (Redis or Postgres unreachable, a dead process)
    # The whole machine's cores busy on average during the first run, and during each of its
    # tasks (from the first instance's start to the last one's end): "run" for the run.
    busy: dict[str, float] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return not self.problems and not self.error


def idle_and_gaps(start: datetime, end: datetime,
                  spans: Sequence[tuple[str, datetime, datetime]],
                  upstream: Callable[[str], Sequence[str]]) -> tuple[list[float], float]:
    """Airflow's own share of a run: per task instance, the seconds from the moment it could
    run (every upstream task ended, or the run started) to its start; for the run, the seconds
    during which none of its tasks ran.

    ``spans`` are (task id, start, end); ``upstream(task_id)`` names the tasks it waits for.
    """
    ends: dict[str, datetime] = {}
    for task_id, _, stop in spans:
        ends[task_id] = max(ends.get(task_id, stop), stop)
    gaps = []
    for task_id, begin, _ in spans:
        ready = max((ends[u] for u in upstream(task_id) if u in ends), default=start)
        gaps.append((begin - ready).total_seconds())
    busy = 0.0
    current: tuple[datetime, datetime] | None = None
    for _, begin, stop in sorted(spans, key=lambda s: s[1]):
        if current is None or begin > current[1]:
            if current is not None:
                busy += (current[1] - current[0]).total_seconds()
            current = (begin, stop)
        else:
            current = (current[0], max(current[1], stop))
    if current is not None:
        busy += (current[1] - current[0]).total_seconds()
    return gaps, (end - start).total_seconds() - busy


def sync_upstream(task_ids: Sequence[str]) -> Callable[[str], Sequence[str]]:
    """The sync DAG's dependencies, for :func:`idle_and_gaps`."""
    pushes = [t for t in task_ids if t.startswith("push")]

    def upstream(task_id: str) -> Sequence[str]:
        if task_id in ("check_contract", "check_requests"):
            return ["open_run"]
        if task_id.startswith("push"):
            return ["check_contract"]
        if task_id == "commit_watermark":
            return pushes or ["check_contract"]
        return ["first"] if task_id == "second" else []  # the trivial DAG

    return upstream


def _runs(engine: Any, dag_id: str) -> list[RunRecord]:
    from sqlalchemy import text

    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT run_id, state, queued_at, start_date, end_date FROM dag_run "
            "WHERE dag_id = :d ORDER BY id"), {"d": dag_id}).all()
        runs = []
        for run_id, state, queued, start, end in rows:
            if state not in TERMINAL or start is None or end is None:
                continue
            run = RunRecord(dag_id, run_id, state, queued, start, end)
            for task_id, index, t_start, t_end, host, t_state in conn.execute(text(
                    "SELECT task_id, map_index, start_date, end_date, hostname, state "
                    "FROM task_instance WHERE dag_id = :d AND run_id = :r "
                    "AND start_date IS NOT NULL AND end_date IS NOT NULL "
                    "ORDER BY start_date"), {"d": dag_id, "r": run_id}):
                run.spans.append(Span(task_id, index, t_start, t_end, host or "", t_state))
            runs.append(run)
    return runs


def _wait_run(engine: Any, dag_id: str, seen: int, cluster: Any, timeout: float
              ) -> RunRecord:
    """Waits for the DAG's run number ``seen + 1`` to end; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _runs(engine, dag_id)
        if len(runs) > seen:
            return runs[seen]
        dead = [name for name in cluster.recorded().get("processes", {})
                if name not in cluster.alive()]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} of the cluster exited (logs in "
                               f"{cluster.log_dir})")
        time.sleep(0.5)
    raise RuntimeError(f"no run of {dag_id} ended within {timeout:.0f} s (logs in "
                       f"{cluster.log_dir})")


def _trigger(cluster: Any, dag_id: str) -> None:
    import requests

    token = cluster.token()
    deadline = time.monotonic() + 120
    while True:  # the DAG may not be parsed yet
        resp = requests.post(f"{cluster.api_url()}/api/v2/dags/{dag_id}/dagRuns",
                             json={"logical_date": None},
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)
        if resp.status_code < 300:
            return
        if resp.status_code != 404 or time.monotonic() > deadline:
            raise RuntimeError(f"triggering {dag_id}: HTTP {resp.status_code} {resp.text[:300]}")
        time.sleep(1)


def _pass_phases(airflow_home: Path, run_id: str) -> dict[str, float]:
    """The phases ``check_contract`` logged for its pass (its task log)."""
    import ast

    for log in airflow_home.glob(f"logs/dag_id={DAG_ID}/run_id={run_id}/"
                                 "task_id=check_contract/*.log"):
        found = _PASS_LINE.search(log.read_text(errors="replace"))
        if found:
            return {k: float(v) for k, v in ast.literal_eval(found.group(3)).items()}
    return {}


def run_case(backend: str, rows: int, executor: str, pg_admin_url: str, redis_url: str,
             sink: _Sink) -> SchedulerCase:
    """One case of (e): loads the rows, starts a cluster, measures its first scheduled run of
    ``leadsync_meta``, the trivial DAG and a run with nothing new; stops and drops it all."""
    from leadsync.bench import _meta_destination
    from leadsync.cluster import Cluster
    from leadsync.config import parse_config

    case = SchedulerCase(backend, rows, executor)
    work = Path(tempfile.mkdtemp(prefix="leadsync-bench-scheduler-"))
    cluster: Cluster | None = None
    try:
        _config(work)
        dags = work / "dags"
        dags.mkdir()
        (dags / "leadsync_sync.py").symlink_to(ROOT / "dags" / "leadsync_sync.py")
        (dags / "trivial.py").write_text(_TRIVIAL_DAG)
        with _databases(backend, work, pg_admin_url) as (warehouse_url, state_url):
            case.load_s, case.expected = load_warehouse(warehouse_url, rows, work)
            dest = _meta_destination(
                parse_config(yaml.safe_load((work / "leadsync.yaml").read_text())))
            env = _airflow_env(work, dags, warehouse_url, state_url, sink.url)
            extra = {k: v for k, v in env.items()
                     if k.startswith("AIRFLOW_CONN_") or k == "LEADSYNC_CONFIG"}
            extra["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)
            cluster = Cluster(work / "cluster", pg_admin_url, redis_url, extra_env=extra,
                              executor=EXECUTORS[executor])
            sink.reset_counters()
            started = time.perf_counter()
            cluster.start(timeout=300, out=io.StringIO())
            case.start_s = time.perf_counter() - started
            meta = create_engine(cluster.db_url(cluster.airflow_db))
            try:
                # The scheduler starts the DAG's first run as soon as it is parsed.
                with _BusySampler() as sampler:
                    case.first = _wait_run(meta, DAG_ID, 0, cluster, RUN_TIMEOUT_S)
                case.busy = run_busy(case.first, sampler.samples)
                case.sink_requests, case.sink_events = sink.requests, sink.events
                case.sink_busy_s = sink.busy_s
                case.phases = _pass_phases(cluster.home / "airflow", case.first.run_id)
                _trigger(cluster, "trivial")
                case.trivial = _wait_run(meta, "trivial", 0, cluster, 300)
                _trigger(cluster, DAG_ID)
                case.noop = _wait_run(meta, DAG_ID, 1, cluster, 300)
            finally:
                meta.dispose()
            for name, run in (("first run", case.first), ("no-op run", case.noop),
                              ("trivial DAG", case.trivial)):
                if run.state != "success":
                    case.problems.append(f"the {name} ended {run.state} (logs in "
                                         f"{cluster.home / 'airflow' / 'logs'})")
            summary = ledger_summary(state_url, dest.name)
            case.delivered = int(summary.get("delivered", 0))
            case.problems += delivery_problems(case.expected, case.delivered, summary, sink)
    except Exception as exc:  # noqa: BLE001 - reported with the case, the bench goes on
        case.error = f"{type(exc).__name__}: {exc}"
    finally:
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.stop(out=io.StringIO())
            keep = bool(os.environ.get("LEADSYNC_BENCH_KEEP"))
            if not keep:
                with contextlib.suppress(Exception):
                    cluster.drop_databases()
            if cluster.celery:
                with contextlib.suppress(Exception):
                    cluster.drop_broker_keys()
        if os.environ.get("LEADSYNC_BENCH_KEEP"):
            print(f"      (kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return case


class _BusySampler:
    """Samples the machine's busy CPU time (:func:`machine_busy_s`) every 0.1 s on a thread,
    while the ``with`` block runs: the scheduler's processes are not the bench's children,
    so their CPU is seen the way the machine sees it."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="busy-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            busy = machine_busy_s()
            if busy is not None:
                self.samples.append((time.time(), busy))
            if self._stop.wait(0.1):
                return

    def __enter__(self) -> _BusySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_busy(run: RunRecord, samples: list[tuple[float, float]]) -> dict[str, float]:
    """The cores busy on average during ``run`` ("run") and during each of its tasks, from
    the first instance's start to the last one's end; figures with too few samples are left
    out."""
    found: dict[str, float] = {}
    spans: dict[str, tuple[datetime, datetime]] = {}
    for s in run.spans:
        start, end = spans.get(s.task_id, (s.start, s.end))
        spans[s.task_id] = (min(start, s.start), max(end, s.end))
    for name, (start, end) in [("run", (run.start, run.end)), *spans.items()]:
        cores = busy_cores(samples, start.timestamp(), end.timestamp())
        if cores is not None:
            found[name] = cores
    return found


def _overhead(run: RunRecord) -> str:
    spans = [(s.task_id, s.start, s.end) for s in run.spans]
    gaps, idle = idle_and_gaps(run.start, run.end, spans,
                               sync_upstream([s.task_id for s in run.spans]))
    if not gaps:
        return "no task ran"
    return (f"{len(gaps)} task instances; runnable → running median "
            f"{statistics.median(gaps):.1f} s (max {max(gaps):.1f}); {idle:.1f} s of the run "
            "with none of its tasks running")


def _tasks(run: RunRecord) -> str:
    origin = run.start
    parts = []
    for s in run.spans:
        name = s.task_id if s.map_index < 0 else f"{s.task_id}[{s.map_index}]"
        host = f" on {s.hostname}" if s.hostname else ""
        parts.append(f"{name} {s.seconds:.1f} (at +{(s.start - origin).total_seconds():.1f}"
                     f"{host})")
    return ", ".join(parts)


def print_case(case: SchedulerCase, dags_test: DagCase | None = None) -> None:
    """The lines of one case of (e), with the same case's ``airflow dags test`` run of (d)
    beside it when this bench run measured it."""
    where = ("CeleryExecutor, 2 workers × 2 slots" if case.executor == "celery"
             else "LocalExecutor, 4 tasks at once")
    print(f"    {case.rows:,} rows, {case.backend} warehouse + state, {where} (loaded in "
          f"{case.load_s:.0f} s; the cluster started in {case.start_s:.0f} s):")
    trivial = case.trivial
    if trivial is not None:
        print(f"      Airflow's fixed cost (trivial two-task DAG, triggered): "
              f"{trivial.wall_s:.1f} s from its start to its end (queued "
              f"{trivial.queued_s:.1f} s before); {_overhead(trivial)}")
    first = case.first
    if first is not None:
        beside = ""
        if dags_test is not None and dags_test.first is not None:
            d = dags_test.first.wall_s
            beside = (f"; `airflow dags test` of the same case in this bench run: {d:.1f} s "
                      f"(scheduler / dags test {first.wall_s / d:.2f}x)")
        print(f"      first run (scheduled): {first.wall_s:.1f} s from its start to its end "
              f"(queued {first.queued_s:.1f} s before){beside}; {case.sink_events:,} events in "
              f"{case.sink_requests:,} requests, {case.delivered:,} delivered")
        p = case.phases
        if p:
            print(f"        phases of check_contract's pass (s): read {p.get('read', 0):.1f}, "
                  f"contract {sum(p.get(k, 0) for k in ('gx_setup', 'check', 'verdict')):.1f}, "
                  f"plan {p.get('plan', 0):.1f}, {_fmt_state(p)}; HTTP at the sink "
                  f"{case.sink_busy_s:.1f}")
        print(f"        tasks (s): {_tasks(first)}")
        print(f"        Airflow: {_overhead(first)}")
        if case.busy:
            during = ", ".join(f"{name} {cores:.2f}" for name, cores in case.busy.items())
            print(f"        the machine's cores busy on average (of {os.cpu_count()}): {during}")
    noop = case.noop
    if noop is not None:
        extra = f", {noop.wall_s - trivial.wall_s:+.1f} s over the trivial DAG" if trivial else ""
        print(f"      no-op run (nothing new, triggered): {noop.wall_s:.1f} s{extra}; "
              f"{_overhead(noop)}")
    if case.error:
        print(f"      COULD NOT RUN: {case.error}")
    for problem in case.problems:
        print(f"      CORRECTNESS: {problem}")
    sys.stdout.flush()


def parse_executors(text: str) -> list[str]:
    """``celery,local`` (or ``both``) → ["celery", "local"]."""
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if names == ["both"]:
        names = list(EXECUTORS)
    if not names:
        raise ValueError("--executors: expected celery, local or both, got nothing")
    for name in names:
        if name not in EXECUTORS:
            raise ValueError(f"--executors: expected celery, local or both, got {name!r}")
    return names


def run_all(cases: list[tuple[str, int]], executors: list[str], pg_admin_url: str,
            redis_url: str, dags_test: Sequence[DagCase] = ()) -> list[SchedulerCase]:
    """Runs and prints every case under every executor, one at a time."""
    print("(e) the real DAG under a real scheduler (`make cluster`'s processes, Postgres for "
          "Airflow's metadata), fresh state, the lean loopback Meta sink:", flush=True)
    if pg_admin_url.startswith("sqlite"):
        print("    skipped: a scheduler needs Postgres for Airflow's metadata "
              "(--postgres-url)")
        return []
    same = {(c.backend, c.rows): c for c in dags_test}
    results = []
    with _Sink() as sink:
        for backend, rows in cases:
            for executor in executors:
                sink.ids.clear()
                sink.duplicates = 0
                case = run_case(backend, rows, executor, pg_admin_url, redis_url, sink)
                print_case(case, same.get((backend, rows)))
                results.append(case)
    return results

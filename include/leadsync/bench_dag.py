"""Benchmark (d): whole runs of the real DAG, ``airflow dags test leadsync_meta``.

Each case starts from fresh state: a new work directory with its own Airflow home (SQLite
metadata), LEADSYNC_HOME and config (the Meta destination only, CRM shape), a warehouse table
loaded with ``demo_data.generate_rows_fast`` (every identifier the source contract has; six
days of ``updated_at``), and an empty state store (SQLite files, or one scratch Postgres
database holding warehouse and state). The platform is a lean loopback sink in this process
that only parses each request's JSON and counts events (not the strict sandbox, whose own
validation is not leadsync's cost). ``airflow dags test`` runs as a child process: its wall
time and peak RSS (``wait4``) are the figures.

Beside each case: Airflow's fixed cost, ``airflow dags test`` of a trivial two-task DAG in the
same Airflow home, measured in the same bench run; and the no-op run, the DAG run again with
nothing new (the lookback re-reads the last two hours of rows, which the ledger settled).

Phases: read, check, plan and state (lookups and writes) are what ``check_contract`` logs for
its one pass over the window; push is the sum of the push tasks' durations, HTTP the sink's
own time answering them; Airflow is the wall time no task accounts for.

Correctness every time: events the sink received once == ledger delivered == eligible rows
counted in SQL; no event received twice; nothing pending or failed.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PIXEL = "1234567890123456"
TOKEN = "bench-token"  # noqa: S105 - a loopback stand-in's token, not a secret
TARGETS = {("sqlite", 200_000): 30.0, ("sqlite", 1_000_000): 90.0,
           ("postgres", 1_000_000): 90.0}
RSS_TARGET_MB = 400
NOOP_TARGET_S = 3.0

_TRIVIAL_DAG = '''
"""Airflow's fixed cost: two tasks that do nothing."""
import pendulum
from airflow.sdk import DAG, task

with DAG(dag_id="trivial", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
    @task
    def first() -> int:
        return 1

    @task
    def second(x: int) -> int:
        return x

    second(first())
'''


class _Sink:
    """A lean Meta stand-in on loopback: parses each request's JSON and counts its events."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.events = 0
        self.ids: set[str] = set()
        self.duplicates = 0
        self.busy_s = 0.0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                started = time.perf_counter()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = json.loads(body).get("data") or []
                ids = [e.get("event_id") for e in data]
                with sink.lock:
                    sink.requests += 1
                    sink.events += len(data)
                    before = len(sink.ids)
                    sink.ids.update(ids)
                    sink.duplicates += len(ids) - (len(sink.ids) - before)
                answer = json.dumps({"events_received": len(data), "messages": [],
                                     "fbtrace_id": "bench"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                with sink.lock:
                    sink.busy_s += time.perf_counter() - started

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Sink:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset_counters(self) -> None:
        with self.lock:
            self.requests = self.events = self.duplicates = 0
            self.busy_s = 0.0


@dataclass
class DagRun:
    """One ``airflow dags test`` process."""

    wall_s: float
    peak_rss_mb: float  # the largest process's peak (the task process or a worker it starts)
    ok: bool
    tasks: dict[str, float] = field(default_factory=dict)  # task id → seconds (summed)
    phases: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    log: str = ""
    tree_rss_mb: float = 0.0  # the peak of all its processes' RSS together (sampled)
    worker: dict[str, float] = field(default_factory=dict)  # the contract worker's busy time
    # CPU seconds: the airflow process with every process it started and waited for (the
    # task's GX and stage workers), from wait4; the whole machine's busy time over the same
    # wall time, from /proc/stat (Postgres, the sink and anything else included); None where
    # /proc/stat cannot be read.
    cpu_s: float = 0.0
    machine_busy_s: float | None = None
    # The machine's busy CPU seconds, sampled with the RSS: (Unix time, seconds since boot).
    busy_samples: list[tuple[float, float]] = field(default_factory=list)
    # Per task: the cores busy on average while it ran (its instances' span).
    busy_cores: dict[str, float] = field(default_factory=dict)


@dataclass
class DagCase:
    """One case of (d): a backend and a row count, its runs and its checks."""

    backend: str
    rows: int
    load_s: float = 0.0
    fixed: DagRun | None = None
    first: DagRun | None = None
    noop: DagRun | None = None
    sink_requests: int = 0
    sink_events: int = 0
    sink_busy_s: float = 0.0
    # After the first run: each no-op run's wall time, and the trivial DAG's run after it.
    noop_walls: list[float] = field(default_factory=list)
    fixed_walls: list[float] = field(default_factory=list)
    expected: int = 0
    delivered: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        return not self.problems


def _airflow_env(work: Path, dags: Path, warehouse_url: str, state_url: str,
                 sink_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__", "LEADSYNC_"))}
    env.update({
        "AIRFLOW_HOME": str(work / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(work / "no-plugins"),
        "LEADSYNC_HOME": str(work / "home"),
        "LEADSYNC_CONFIG": str(work / "leadsync.yaml"),
        "AIRFLOW_CONN_LEADSYNC_WAREHOUSE": json.dumps(
            {"conn_type": "generic", "extra": {"sqlalchemy_url": warehouse_url}}),
        "AIRFLOW_CONN_LEADSYNC_STATE": json.dumps(
            {"conn_type": "generic", "extra": {"sqlalchemy_url": state_url}}),
        "AIRFLOW_CONN_LEADSYNC_META": json.dumps(
            {"conn_type": "http", "host": sink_url, "password": TOKEN,
             "extra": {"pixel_id": PIXEL, "api_version": "v25.0"}}),
    })
    return env


def _config(work: Path) -> None:
    from leadsync.config import DEFAULT_CONFIG_PATH

    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["destinations"] = [d for d in data["destinations"] if d["name"] == "meta"]
    data["destinations"][0]["enabled"] = True
    (work / "leadsync.yaml").write_text(yaml.safe_dump(data))


def _airflow(env: dict[str, str], *args: str, log: Path) -> DagRun:
    """Runs one ``airflow`` command; wall time and peak RSS from ``wait4``."""
    airflow = Path(sys.executable).with_name("airflow")
    rss_file = log.with_suffix(".maxrss")
    busy_before = machine_busy_s()
    started = time.perf_counter()
    with open(log, "wb") as out:
        # Through a small launcher: on Linux a child's ru_maxrss keeps the high-water mark of
        # the process it was forked from (the copy it ran as before exec), so airflow started
        # straight from a large parent (pytest, the bench after (a)-(c)) reports the parent's
        # size. The launcher is small when it forks airflow, so its wait4 sees airflow's own.
        proc = subprocess.run(  # noqa: S603 - our venv's interpreter and CLI
            [sys.executable, "-c", _MEASURE, str(rss_file), str(airflow), *args], env=env,
            stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    busy_after = machine_busy_s()
    text = log.read_text(errors="replace")
    lines = rss_file.read_text().splitlines() if rss_file.exists() else []
    peaks = (lines[0].split() if lines else []) or ["0", "0", "0"]
    samples = []
    for line in lines[1:]:
        at, busy = line.split()
        samples.append((float(at), float(busy)))
    return DagRun(wall, int(peaks[0]) / 1024, proc.returncode == 0, log=text,
                  tree_rss_mb=int(peaks[1]) / 1024,
                  cpu_s=float(peaks[2]) if len(peaks) > 2 else 0.0,
                  machine_busy_s=None if busy_before is None or busy_after is None
                  else busy_after - busy_before, busy_samples=samples)


def busy_cores(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """The cores busy on average from ``start`` to ``end`` (Unix times), from the samples
    nearest inside; None when fewer than two fall inside."""
    inside = [(t, busy) for t, busy in samples if start <= t <= end]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def machine_busy_s(stat: str | None = None) -> float | None:
    """The machine's CPU seconds spent busy since boot, all cores together: the first line of
    ``/proc/stat`` without its idle and iowait ticks (guest time is already in user time)."""
    try:
        if stat is None:
            with open("/proc/stat") as f:
                stat = f.readline()
        fields = stat.split()
        if fields[0] != "cpu":
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# The launcher: starts the command, samples the summed RSS of its process tree (the task
# process and any process it starts, like the contract worker) every 0.1 s, and reports
# "<largest process's peak (ru_maxrss, kB)> <peak of the tree's sum (kB)> <CPU s>", the CPU
# time of the command and of every process it waited for (wait4's, user + system), then a
# line "<Unix time> <the machine's busy CPU seconds>" per sample (see machine_busy_s).
_MEASURE = r"""
import os, sys, time
pid = os.spawnv(os.P_NOWAIT, sys.argv[2], sys.argv[2:])

def tree_kib():
    children, rss = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/statm") as f:
                rss[int(name)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, ()))
    return total

def busy():
    try:
        with open("/proc/stat") as f:
            ticks = f.readline().split()[1:9]
        return sum(int(t) for i, t in enumerate(ticks) if i not in (3, 4)) / os.sysconf(
            "SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None

peak, samples = 0, []
while True:
    done, status, usage = os.wait4(pid, os.WNOHANG)
    if done:
        break
    peak = max(peak, tree_kib())
    if (b := busy()) is not None:
        samples.append(f"{time.time()} {b}")
    time.sleep(0.1)
with open(sys.argv[1], "w") as f:
    f.write("\n".join([f"{usage.ru_maxrss} {peak} {usage.ru_utime + usage.ru_stime}",
                       *samples]))
sys.exit(os.waitstatus_to_exitcode(status))
"""


_WORKER_LINE = re.compile(r"contract worker process peaked at .*? busy time \(s\): (\{.*?\})")
_PASS_LINE = re.compile(r"read (\S+) once: (\{.*?\}); phases \(s\): (\{.*?\})")


def _unix(value: Any) -> float:
    """A time from Airflow's SQLite metadata (UTC text, or a datetime) as Unix time."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _fill(run: DagRun, airflow_db: Path, dag_id: str) -> None:
    """Task durations (from Airflow's metadata) and the pass's phases (from the log)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{airflow_db}")
    try:
        with engine.connect() as conn:
            run_id = conn.execute(text(
                "SELECT run_id FROM dag_run WHERE dag_id = :d ORDER BY id DESC LIMIT 1"),
                {"d": dag_id}).scalar()
            for task_id, seconds, start, end in conn.execute(text(
                    "SELECT task_id, SUM(duration), MIN(start_date), MAX(end_date) "
                    "FROM task_instance WHERE dag_id = :d AND run_id = :r GROUP BY task_id"),
                    {"d": dag_id, "r": run_id}):
                run.tasks[str(task_id)] = float(seconds or 0.0)
                if start and end:
                    cores = busy_cores(run.busy_samples, _unix(start), _unix(end))
                    if cores is not None:
                        run.busy_cores[str(task_id)] = cores
    finally:
        engine.dispose()
    worker = _WORKER_LINE.search(run.log)
    if worker:
        run.worker = {k: float(v) for k, v in ast.literal_eval(worker.group(1)).items()}
    found = _PASS_LINE.search(run.log)
    if found:
        run.counts = {k: int(v) for k, v in ast.literal_eval(found.group(2)).items()}
        run.phases = {k: float(v) for k, v in ast.literal_eval(found.group(3)).items()}


@contextlib.contextmanager
def _databases(backend: str, work: Path, pg_admin_url: str) -> Iterator[tuple[str, str]]:
    if backend == "sqlite":
        yield f"sqlite:///{work / 'warehouse.db'}", f"sqlite:///{work / 'state.db'}"
        return
    from leadsync.bench import _scratch_postgres

    with _scratch_postgres(pg_admin_url) as url:
        yield url, url  # the production layout: state in the warehouse database


def load_warehouse(warehouse_url: str, rows: int, work: Path) -> tuple[float, int]:
    """Loads ``rows`` synthetic rows into the warehouse table (then ``ANALYZE``, as a
    warehouse has statistics); returns the load's seconds and the eligible rows for the
    config in ``work`` (counted in SQL, not with the pipeline's code)."""
    from sqlalchemy import text

    from leadsync import demo_data
    from leadsync.bench import _expected_eligible, _meta_destination
    from leadsync.config import parse_config
    from leadsync.db import make_engine
    from leadsync.destinations import get_destination

    engine = make_engine(warehouse_url)
    try:
        demo_data.create_schema(engine)
        started = time.perf_counter()
        now = datetime.now(UTC)
        demo_data._load(engine, demo_data.generate_rows_fast(rows, now, seed=rows), True)
        with engine.begin() as conn:
            conn.execute(text(f"ANALYZE {demo_data.TABLE_NAME}"))
        load_s = time.perf_counter() - started
        dest = _meta_destination(
            parse_config(yaml.safe_load((work / "leadsync.yaml").read_text())))
        return load_s, _expected_eligible(engine, dest, get_destination(dest.type),
                                          datetime.now(UTC))
    finally:
        engine.dispose()


def run_case(backend: str, rows: int, pg_admin_url: str, sink: _Sink, *,
             noop: bool = True, noop_runs: int = 1) -> DagCase:
    """One case of (d): load, fixed cost, the first run and (optionally) ``noop_runs`` no-op
    runs, each followed by another run of the trivial DAG (see :func:`noop_extra`)."""
    from leadsync.bench import _meta_destination
    from leadsync.config import parse_config

    case = DagCase(backend, rows)
    work = Path(tempfile.mkdtemp(prefix="leadsync-bench-dag-"))
    try:
        (work / "no-plugins").mkdir()
        trivial = work / "trivial-dags"
        trivial.mkdir()
        (trivial / "trivial.py").write_text(_TRIVIAL_DAG)
        _config(work)
        with _databases(backend, work, pg_admin_url) as (warehouse_url, state_url):
            case.load_s, case.expected = load_warehouse(warehouse_url, rows, work)
            dest = _meta_destination(
                parse_config(yaml.safe_load((work / "leadsync.yaml").read_text())))

            env = _airflow_env(work, ROOT / "dags", warehouse_url, state_url, sink.url)
            prep = _airflow(env, "db", "migrate", log=work / "migrate.log")
            if not prep.ok:
                raise RuntimeError("airflow db migrate failed:\n" + prep.log[-2000:])
            _airflow(env, "pools", "set", dest.pool, "4", "bench", log=work / "pool.log")
            trivial_env = {**env, "AIRFLOW__CORE__DAGS_FOLDER": str(trivial)}
            case.fixed = _airflow(trivial_env, "dags", "test", "trivial",
                                  log=work / "trivial.log")
            _fill(case.fixed, work / "airflow" / "airflow.db", "trivial")

            sink.reset_counters()
            case.first = _airflow(env, "dags", "test", dest.dag_id, log=work / "first.log")
            _fill(case.first, work / "airflow" / "airflow.db", dest.dag_id)
            case.sink_requests, case.sink_events = sink.requests, sink.events
            case.sink_busy_s = sink.busy_s
            if noop:
                runs = []
                for n in range(max(1, noop_runs)):
                    run = _airflow(env, "dags", "test", dest.dag_id, log=work / f"noop{n}.log")
                    _fill(run, work / "airflow" / "airflow.db", dest.dag_id)
                    runs.append(run)
                    case.noop_walls.append(run.wall_s)
                    if noop_runs > 1:
                        again = _airflow(trivial_env, "dags", "test", "trivial",
                                         log=work / f"trivial{n}.log")
                        case.fixed_walls.append(again.wall_s)
                # The median run by wall time is the one reported in full.
                case.noop = sorted(runs, key=lambda r: r.wall_s)[len(runs) // 2]
            summary = ledger_summary(state_url, dest.name)
            case.delivered = int(summary.get("delivered", 0))
            _check(case, summary, sink)
    finally:
        if os.environ.get("LEADSYNC_BENCH_KEEP"):  # the logs and databases, to look into
            print(f"      (kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return case


def _check(case: DagCase, summary: dict[str, Any], sink: _Sink) -> None:
    for name, run in (("first run", case.first), ("no-op run", case.noop),
                      ("trivial DAG", case.fixed)):
        if run is not None and not run.ok:
            case.problems.append(f"the {name} failed: " + " | ".join(
                run.log.strip().splitlines()[-5:]))
    case.problems += delivery_problems(case.expected, case.delivered, summary, sink)


def ledger_summary(state_url: str, destination: str) -> dict[str, Any]:
    """The ledger's counts of one destination (delivered, pending, failed…)."""
    from leadsync.db import make_engine
    from leadsync.state import StateStore

    engine = make_engine(state_url)
    try:
        return dict(StateStore(engine).summary([destination])[destination])
    finally:
        engine.dispose()


def delivery_problems(expected: int, delivered: int, summary: dict[str, Any],
                      sink: _Sink) -> list[str]:
    """What is wrong with a case's deliveries: the sink's unique events, the ledger's
    delivered events and the eligible rows must be equal, nothing received twice, nothing
    left pending or failed."""
    problems = []
    if not expected:
        problems.append("no eligible rows were loaded")
    if not len(sink.ids) == delivered == expected:
        problems.append(f"sink unique events {len(sink.ids):,}, ledger delivered "
                        f"{delivered:,}, eligible rows {expected:,}: they must be equal")
    if sink.duplicates:
        problems.append(f"the sink received {sink.duplicates:,} events twice")
    for status in ("pending", "failed"):
        if summary.get(status):
            problems.append(f"{summary[status]:,} events {status} in the ledger")
    return problems


def _contract_s(run: DagRun) -> float:
    """The data contract's share of the pass: GX setup, validation, verdict and Data Docs."""
    return sum(run.phases.get(k, 0.0) for k in ("gx_setup", "check", "verdict"))


def _fmt_phases(run: DagRun, busy_s: float | None) -> str:
    p = run.phases
    push = sum(s for t, s in run.tasks.items() if t.startswith("push"))
    tasks = sum(run.tasks.values())
    w = run.worker
    gx = (f"; in the worker process, in parallel: GX import + suite {w.get('suite', 0):.1f}, "
          f"validation {w.get('run', 0):.1f}, Data Docs {w.get('docs', 0):.1f}") if w else ""
    parts = [f"read {p.get('read', 0):.1f}",
             f"check {_contract_s(run):.1f} (GX setup {p.get('gx_setup', 0):.1f}, "
             f"projection + validation or waiting for it {p.get('check', 0):.1f}, "
             f"verdict + Data Docs {p.get('verdict', 0):.1f}{gx})",
             f"plan {p.get('plan', 0):.1f}", _fmt_state(p), f"push {push:.1f}"]
    if busy_s is not None:
        parts.append(f"(HTTP at the sink {busy_s:.1f})")
    parts.append(f"Airflow {run.wall_s - tasks:.1f}")
    return ", ".join(parts)


def _fmt_state(p: dict[str, float]) -> str:
    if "writer.state" not in p:
        return f"state {p.get('state', 0):.1f}"
    return (f"state {p.get('state', 0):.1f} (lookups, handing rows to the stage worker and "
            f"waiting for its last write; in the stage worker, in parallel: writes "
            f"{p['writer.state']:.1f}, peak RSS {p.get('writer.peak_rss_mb', 0):.0f} MB)")


def _fmt_cpu(run: DagRun) -> str:
    """Where the run's CPU went: its own processes, the rest of the machine, how many of the
    machine's cores were busy on average (near all of them: the run waits for the CPU)."""
    own = f"{run.cpu_s:.1f} s in airflow's process and the processes it started"
    if run.machine_busy_s is None or not run.wall_s:
        return own
    cores = os.cpu_count() or 1
    rest = max(0.0, run.machine_busy_s - run.cpu_s)
    during = "".join(f", {cores_:.2f} during {task}" for task, cores_ in run.busy_cores.items())
    return (f"{own}, {rest:.1f} s elsewhere on the machine (Postgres, the sink, the rest): "
            f"{run.machine_busy_s / run.wall_s:.2f} of its {cores} cores busy on average"
            f"{during}")


def _fmt_rss(run: DagRun) -> str:
    met = "met" if run.peak_rss_mb <= RSS_TARGET_MB else "MISSED"
    return (f"peak RSS {run.peak_rss_mb:.0f} MB of the largest process (target ≤ "
            f"{RSS_TARGET_MB}: {met}), {run.tree_rss_mb:.0f} MB of all its processes together")


def print_case(case: DagCase) -> None:
    """The lines of one case of benchmark (d)."""
    label = f"{case.rows:,} rows, {case.backend} warehouse + state"
    print(f"    {label} (loaded in {case.load_s:.0f} s):")
    fixed = case.fixed
    if fixed is not None:
        print(f"      Airflow's fixed cost (trivial two-task DAG): {fixed.wall_s:.1f} s wall, "
              f"peak RSS {fixed.peak_rss_mb:.0f} MB ({fixed.tree_rss_mb:.0f} MB sampled)")
    first = case.first
    if first is not None:
        target = TARGETS.get((case.backend, case.rows))
        mark = "" if target is None else (
            f" (target ≤ {target:.0f} s: {'met' if first.wall_s <= target else 'MISSED'})")
        print(f"      first run: {first.wall_s:.1f} s wall{mark}, {_fmt_rss(first)}, "
              f"{case.sink_events:,} events in {case.sink_requests:,} requests, "
              f"{case.delivered:,} delivered")
        print(f"        phases (s): {_fmt_phases(first, case.sink_busy_s)}")
        tasks = ", ".join(f"{t} {s:.1f}" for t, s in first.tasks.items())
        print(f"        tasks (s): {tasks}")
        print(f"        CPU: {_fmt_cpu(first)}")
        if first.phases and first.wall_s:
            check = _contract_s(first)
            beside = sum(first.worker.values())
            print(f"        the contract: {check:.1f} s = {check / first.wall_s:.0%} of the run "
                  "(target ≤ 25 %)" + (f", plus {beside:.1f} s in its worker process, in "
                                      "parallel" if beside else ""))
    noop = case.noop
    if noop is not None and fixed is not None:
        extra, detail = noop_extra(case)
        print(f"      no-op run (nothing new): {noop.wall_s:.1f} s wall, {extra:+.1f} s over "
              f"the trivial DAG{detail} (target ≤ {NOOP_TARGET_S:.0f} s: "
              f"{'met' if extra <= NOOP_TARGET_S else 'MISSED'}), {_fmt_rss(noop)}; "
              f"read {noop.counts.get('read', 0):,} rows")
        print(f"        phases (s): {_fmt_phases(noop, None)}")
        tasks = ", ".join(f"{t} {s:.1f}" for t, s in noop.tasks.items())
        print(f"        tasks (s): {tasks}")
    for problem in case.problems:
        print(f"      CORRECTNESS: {problem}")
    sys.stdout.flush()


def noop_extra(case: DagCase) -> tuple[float, str]:
    """The no-op's cost over Airflow's fixed cost, and how it was measured.

    With several no-op runs, each is paired with the trivial DAG's run right after it, and the
    median of the pairs' differences is the figure (one run of either moves by ±1.5 s); with
    one, the no-op against the trivial DAG's run before the first run.
    """
    assert case.noop is not None and case.fixed is not None
    if len(case.noop_walls) > 1 and len(case.fixed_walls) == len(case.noop_walls):
        diffs = sorted(n - f for n, f in zip(case.noop_walls, case.fixed_walls, strict=True))
        pairs = ", ".join(f"{n:.1f} vs {f:.1f}"
                          for n, f in zip(case.noop_walls, case.fixed_walls, strict=True))
        return (statistics.median(diffs),
                f" (median of {len(diffs)} pairs, no-op vs trivial DAG run after it: {pairs})")
    return case.noop.wall_s - case.fixed.wall_s, ""


def parse_cases(text: str, option: str = "--dag-cases") -> list[tuple[str, int]]:
    """``sqlite:200000,postgres:1000000`` → [(backend, rows), ...]; ``option`` names the
    option the text came from in the error."""
    cases = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        backend, _, n = part.strip().partition(":")
        if backend not in ("sqlite", "postgres") or not n.replace("_", "").isdigit():
            raise ValueError(f"{option}: expected backend:rows (sqlite or postgres), got "
                             f"{part.strip()!r}")
        cases.append((backend, int(n.replace("_", ""))))
    return cases


def target_lines(results: list[DagCase]) -> list[str]:
    """Issue 9's targets for (d), one line each: the figure, the target, met or missed."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = []
    for case in results:
        first, label = case.first, f"{case.rows:,} rows {case.backend}"
        if first is None:
            continue
        target = TARGETS.get((case.backend, case.rows))
        if target is not None:
            lines.append(f"{label}: first run {first.wall_s:.1f} s (≤ {target:.0f}: "
                         f"{verdict(first.wall_s <= target)}; trivial DAG "
                         f"{case.fixed.wall_s if case.fixed else float('nan'):.1f} s)")
        lines.append(f"{label}: largest process {first.peak_rss_mb:.0f} MB (≤ {RSS_TARGET_MB}: "
                     f"{verdict(first.peak_rss_mb <= RSS_TARGET_MB)})")
        if first.phases and first.wall_s:
            share = _contract_s(first) / first.wall_s
            lines.append(f"{label}: contract {share:.0%} of the run (≤ 25 %: "
                         f"{verdict(share <= 0.25)})")
        if case.noop is not None and case.fixed is not None:
            extra, _ = noop_extra(case)
            lines.append(f"{label}: no-op {extra:+.1f} s over the trivial DAG (≤ "
                         f"{NOOP_TARGET_S:.0f}: {verdict(extra <= NOOP_TARGET_S)})")
    return lines


def run_all(cases: list[tuple[str, int]], pg_admin_url: str, *,
            noop_runs: int = 1) -> list[DagCase]:
    """Runs and prints every case, one at a time."""
    print("(d) the real DAG, `airflow dags test leadsync_meta`, fresh state, lean loopback "
          "Meta sink (parses JSON, counts):", flush=True)
    results = []
    with _Sink() as sink:
        for backend, rows in cases:
            sink.ids.clear()
            case = run_case(backend, rows, pg_admin_url, sink, noop_runs=noop_runs)
            print_case(case)
            results.append(case)
    by_rows = sorted(results, key=lambda c: c.rows)
    if len(by_rows) >= 2 and by_rows[0].first and by_rows[-1].first:
        small, large = by_rows[0], by_rows[-1]
        assert small.first is not None and large.first is not None
        print(f"    peak RSS {small.rows:,} → {large.rows:,} rows: largest process "
              f"{small.first.peak_rss_mb:.0f} → {large.first.peak_rss_mb:.0f} MB, all "
              f"processes {small.first.tree_rss_mb:.0f} → {large.first.tree_rss_mb:.0f} MB")
    return results

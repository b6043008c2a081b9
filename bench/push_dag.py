"""The push phase of a real DAG run: task instances per run and events/s, through Airflow.

Run it::

    .venv/bin/python bench/push_dag.py --leads 80000          # ~200k rows, one fresh run
    .venv/bin/python bench/push_dag.py --leads 2000 --batch-size 10 --lanes 4

What it does, in a scratch ``$LEADSYNC_HOME``: seeds a SQLite warehouse with the demo funnel,
starts a lean loopback Meta stand-in in this process (it parses each request's JSON, counts
the events and answers ``events_received``: its own cost is not ours), migrates a scratch
Airflow metadata DB (not timed), then runs ``airflow dags test leadsync_meta`` once, on fresh
SQLite state. From Airflow's own task-instance records it prints the number of task instances
of the run, each task's time, and the push phase: from the first push task's start to the last
one's end, and the events the stand-in received per second of it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "include") not in sys.path:
    sys.path.insert(0, str(ROOT / "include"))

PIXEL = "1234567890123456"
PUSH_TASKS = ("push_batch", "push_lane")


class _Sink(BaseHTTPRequestHandler):
    """A lean Meta stand-in: parses the JSON body, counts its events, acknowledges them."""

    received = 0
    requests = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length))
        n = len(body.get("data", []))
        with _Sink.lock:
            _Sink.received += n
            _Sink.requests += 1
        out = json.dumps({"events_received": n, "fbtrace_id": "bench"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, format: str, *args: Any) -> None:
        return


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(work: Path, batch_size: int | None, lanes: int | None) -> Path:
    dest: dict[str, Any] = {
        "name": "meta", "type": "meta", "shape": "crm", "crm_name": "Bench CRM",
        "stages": {"lead": "Lead", "qualified": "Marketing Qualified Lead",
                   "sales_accepted": "Sales Qualified Lead", "won": "Converted"},
    }
    if batch_size:
        dest["batch_size"] = batch_size
    if lanes:
        dest["push_lanes"] = lanes
    cfg = {"source": {"query_file": str(ROOT / "include" / "sql" / "converted_leads.sql")},
           "destinations": [dest]}
    path = work / "leadsync.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _airflow(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("airflow")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True,
                          check=False, timeout=3600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leads", type=int, default=80_000,
                        help="synthetic leads to seed (each is 1-4 rows; 80k ≈ 200k rows)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lanes", type=int, default=None,
                        help="destination push_lanes (omit for the config's default)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="leadsync-pushbench-"))
    from sqlalchemy import create_engine

    from leadsync import demo_data

    wh_url = f"sqlite:///{work / 'warehouse.db'}"
    rows = demo_data.seed(create_engine(wh_url), args.leads, datetime.now(UTC))
    port = _free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(os.environ)
    env.update({
        "LEADSYNC_HOME": str(work),
        "LEADSYNC_CONFIG": str(_config(work, args.batch_size, args.lanes)),
        "AIRFLOW_HOME": str(work / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW_CONN_LEADSYNC_WAREHOUSE": json.dumps(
            {"conn_type": "generic", "extra": {"sqlalchemy_url": wh_url}}),
        "AIRFLOW_CONN_LEADSYNC_STATE": json.dumps(
            {"conn_type": "generic", "extra": {"sqlalchemy_url": f"sqlite:///{work / 'st.db'}"}}),
        "AIRFLOW_CONN_LEADSYNC_META": json.dumps({
            "conn_type": "http", "host": f"http://127.0.0.1:{port}", "password": "bench-token",
            "extra": {"pixel_id": PIXEL}}),
    })
    for step in (["db", "migrate"], ["pools", "set", "leadsync_meta", "4", "bench"]):
        proc = _airflow(step, env)
        if proc.returncode:
            print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
            return 1
    started = time.monotonic()
    proc = _airflow(["dags", "test", "leadsync_meta"], env)
    wall = time.monotonic() - started
    server.shutdown()
    db = sqlite3.connect(work / "airflow" / "airflow.db")
    tis = db.execute("SELECT task_id, map_index, state, start_date, end_date FROM task_instance "
                     "WHERE dag_id = 'leadsync_meta'").fetchall()
    per_task: dict[str, list[float]] = defaultdict(list)
    push_start: datetime | None = None
    push_end: datetime | None = None
    states: dict[str, int] = defaultdict(int)
    for task_id, _map_index, state, start, end in tis:
        states[state] += 1
        if not (start and end):
            continue
        t0, t1 = datetime.fromisoformat(start), datetime.fromisoformat(end)
        per_task[task_id].append((t1 - t0).total_seconds())
        if task_id in PUSH_TASKS:
            push_start = t0 if push_start is None or t0 < push_start else push_start
            push_end = t1 if push_end is None or t1 > push_end else push_end
    print(f"rows {rows:,}; airflow dags test exit {proc.returncode}; wall {wall:.1f}s")
    print(f"task instances: {len(tis)} ({dict(states)})")
    for task_id, times in per_task.items():
        print(f"  {task_id:18s} x{len(times):<5d} {sum(times):8.1f}s task time")
    if push_start and push_end:
        push_s = (push_end - push_start).total_seconds()
        print(f"push phase: {push_s:.1f}s, {_Sink.requests} requests, {_Sink.received:,} events, "
              f"{_Sink.received / push_s:,.0f} events/s")
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
    if args.keep:
        print(f"scratch: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())

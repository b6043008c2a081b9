"""The sync DAG on a real cluster: API server, scheduler, dag-processor, triggerer and two Celery
workers (``leadsync.cluster``, what ``make cluster`` starts) on this machine's Postgres and Redis.

In order, on one cluster: a scheduled run succeeds with its push work on both workers; a
triggered run loses a worker (``SIGKILL`` of the whole worker, mid-push, after the platform
stored the request but before its answer came back) and ends with a truthful colour — red while
events are pending, green if a surviving push lane took over the dead lane's batch — with
nothing lost and nothing counted twice; the next run completes on the surviving worker. The
scheduling overhead per task and per run is measured on the way (printed; README figures).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import IN_CI, PG_ADMIN_URL, require_postgres

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(600)]

REDIS_URL = os.environ.get("LEADSYNC_TEST_REDIS", "redis://127.0.0.1:6379/0")
DAG = "leadsync_meta"
TERMINAL = {"success", "failed"}

# The killed push has no retries in this cluster, so its consequence shows in the same run
# (the DAG retries a push after 2+ minutes; the next run takes the same path as a retry would).
LOCAL_SETTINGS = '''
def task_policy(task):
    if task.task_id.startswith("push"):
        task.retries = 0
'''


def _require_redis() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        message = f"Redis at {REDIS_URL} is unreachable ({exc})"
        if IN_CI:
            pytest.fail(message + " — CI requires it", pytrace=False)
        pytest.skip(message)


def _parse(ts: str | None) -> datetime | None:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")) if ts else None


@dataclass
class Live:
    """The running cluster and the helpers the tests drive it with."""

    cluster: Any
    warehouse_url: str
    token: str = ""

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        if not self.token:
            self.token = self.cluster.token()
        resp = requests.request(method, f"{self.cluster.api_url()}/api/v2{path}",
                                headers={"Authorization": f"Bearer {self.token}"},
                                timeout=30, **kwargs)
        if resp.status_code == 401:  # the token expired: once more with a new one
            self.token = ""
            return self.api(method, path, **kwargs)
        resp.raise_for_status()
        return resp.json()

    def runs(self) -> list[dict[str, Any]]:
        return list(self.api("GET", f"/dags/{DAG}/dagRuns",
                             params={"order_by": "run_after", "limit": 100})["dag_runs"])

    def tasks(self, run_id: str) -> list[dict[str, Any]]:
        return list(self.api("GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances",
                             params={"limit": 1000})["task_instances"])

    def trigger(self) -> str:
        run = self.api("POST", f"/dags/{DAG}/dagRuns", json={"logical_date": None})
        return str(run["dag_run_id"])

    def wait(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(1)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                             + self.diagnostics())

    def wait_run(self, run_id: str, timeout: float = 180) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            run = self.api("GET", f"/dags/{DAG}/dagRuns/{run_id}")
            return run if run["state"] in TERMINAL else None

        return dict(self.wait(f"run {run_id}", done, timeout))

    def sandbox(self, path: str) -> Any:
        resp = requests.get(f"{self.cluster.sandbox_url()}/_sandbox/{path}", timeout=30)
        resp.raise_for_status()
        return resp.json()

    def store(self) -> Any:
        from leadsync.db import make_engine
        from leadsync.state import StateStore

        return StateStore(make_engine(self.cluster.db_url(self.cluster.state_db)))

    def diagnostics(self) -> str:
        lines = []
        try:
            for run in self.runs():
                lines.append(f"{run['dag_run_id']}: {run['state']}")
                lines += [f"   {t['task_id']}[{t['map_index']}] {t['state']} on {t['hostname']}"
                          for t in self.tasks(run["dag_run_id"])]
        except requests.RequestException as exc:
            lines.append(f"(API unavailable: {exc})")
        for log in sorted(self.cluster.log_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-8:]
            lines += [f"--- {log.name}", *tail]
        return "\n".join(lines)


def _config(path: Path) -> Path:
    """The bundled config, meta only, small batches (one run spreads over both workers)."""
    from leadsync.config import DEFAULT_CONFIG_PATH

    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    meta = next(d for d in raw["destinations"] if d["name"] == "meta")
    meta = {**meta, "batch_size": 40}
    from leadsync.config import DestinationConfig

    if "push_lanes" in DestinationConfig.model_fields:
        meta["push_lanes"] = 4  # as many push tasks as the two workers have slots
    raw["destinations"] = [meta]
    # A dead worker's lease (and batch claim) expires within half a minute, not five.
    raw["state"]["lease_ttl"] = "30s"
    raw["source"]["settle_lag"] = "5s"
    # The contract is not what this test is about and its Great Expectations import costs half
    # a minute a run on a busy machine; check_contract still runs, as a no-op.
    raw["contract"] = {"enabled": False}
    raw["source"]["query_file"] = str(DEFAULT_CONFIG_PATH.parent / raw["source"]["query_file"])
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    require_postgres()
    _require_redis()
    from leadsync import demo_data
    from leadsync.cluster import Cluster
    from leadsync.db import make_engine

    base = tmp_path_factory.mktemp("cluster")
    warehouse_url = f"sqlite:///{base / 'warehouse.db'}"
    demo_data.seed(make_engine(warehouse_url), 150, datetime.now(UTC) - timedelta(seconds=10))
    config = _config(base / "leadsync.yaml")
    airflow_config = base / "cluster" / "airflow" / "config"
    airflow_config.mkdir(parents=True)
    (airflow_config / "airflow_local_settings.py").write_text(LOCAL_SETTINGS)
    cluster = Cluster(base / "cluster", PG_ADMIN_URL, REDIS_URL, extra_env={
        "LEADSYNC_CONFIG": str(config),
        "AIRFLOW_CONN_LEADSYNC_WAREHOUSE": json.dumps(
            {"conn_type": "generic", "extra": {"sqlalchemy_url": warehouse_url}}),
        # A killed worker's task is declared dead after 20 s without a heartbeat.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    })
    try:
        cluster.start(timeout=240)
        yield Live(cluster, warehouse_url)
    finally:
        cluster.stop()
        assert not cluster.alive()
        cluster.drop_databases()
        cluster.drop_broker_keys()


def _hosts(live: Live, run_id: str) -> set[str]:
    return {t["hostname"] for t in live.tasks(run_id)
            if t["task_id"].startswith("push") and t["state"] == "success"}


def _overheads(live: Live, run: dict[str, Any]) -> tuple[list[float], float]:
    """Per task: seconds from the moment a task could start (its upstream tasks all ended, or
    the run started) to the moment it ran. Per run: seconds of the run during which none of
    its tasks was running."""
    from leadsync.bench_scheduler import idle_and_gaps, sync_upstream

    spans = []
    for t in live.tasks(run["dag_run_id"]):
        start, end = _parse(t["start_date"]), _parse(t["end_date"])
        if start and end:
            spans.append((str(t["task_id"]), start, end))
    run_start, run_end = _parse(run["start_date"]), _parse(run["end_date"])
    assert run_start and run_end
    return idle_and_gaps(run_start, run_end, spans, sync_upstream([s[0] for s in spans]))


def _report(label: str, live: Live, run: dict[str, Any]) -> None:
    gaps, idle = _overheads(live, run)
    wall = (_parse(run["end_date"]) - _parse(run["start_date"])).total_seconds()  # type: ignore[operator]
    pushes = [t["duration"] for t in live.tasks(run["dag_run_id"])
              if t["task_id"].startswith("push") and t["state"] == "success"]
    print(f"\n[cluster overhead] {label}: run {wall:.1f} s, {len(gaps)} tasks; per task: "
          f"ready-to-running median {statistics.median(gaps):.1f} s (max {max(gaps):.1f} s), "
          f"a push task (one request to the local sandbox) lasts median "
          f"{statistics.median(pushes) if pushes else float('nan'):.1f} s; "
          f"per run: {idle:.1f} s with no task running")


def test_scheduled_run_spreads_push_work_over_both_workers(live: Live) -> None:
    first = live.wait("the first scheduled run", lambda: next(
        (r for r in live.runs() if r["run_type"] == "scheduled"), None), timeout=120)
    run = live.wait_run(first["dag_run_id"])
    assert run["state"] == "success", live.diagnostics()
    _report("scheduled run", live, run)
    summary = live.store().summary(["meta"])["meta"]
    assert summary["delivered"] > 0 and summary["pending"] == 0
    assert summary["delivered"] == live.sandbox("stats")["meta"]["unique_events"]
    hosts = _hosts(live, run["dag_run_id"])
    if hosts != {"worker1", "worker2"}:  # rare: one worker took every batch; one more run
        from leadsync import demo_data
        from leadsync.db import make_engine

        demo_data.add_changes(make_engine(live.warehouse_url), 200,
                              datetime.now(UTC) - timedelta(seconds=6))
        again = live.wait_run(live.trigger())
        assert again["state"] == "success", live.diagnostics()
        hosts |= _hosts(live, again["dag_run_id"])
    assert hosts == {"worker1", "worker2"}, live.diagnostics()


def test_worker_killed_mid_push_loses_nothing_and_the_next_run_completes(live: Live) -> None:
    from leadsync import demo_data
    from leadsync.db import make_engine

    demo_data.add_changes(make_engine(live.warehouse_url), 200,
                          datetime.now(UTC) - timedelta(seconds=6))
    # The next four push requests (one per worker slot: every push running at once) are
    # stored by the platform, then their answers hang for 30 s: a worker is killed in the worst
    # place, after the send and before the outcome is recorded. Mapped push tasks or push
    # lanes alike, every push running on that worker is caught there.
    requests.post(f"{live.cluster.sandbox_url()}/_sandbox/faults", timeout=5, json={
        "platform": "meta",
        "faults": [{"kind": "timeout_after_processing", "delay_s": 30, "times": 4}],
    }).raise_for_status()
    killed_run = live.trigger()

    store = live.store()
    claimed_since: dict[int, float] = {}

    def stuck_push() -> dict[str, Any] | None:
        # The victim is a lane that holds a claim for seconds: its request hangs. (Any running
        # push will not do: with several requests in flight, one lane can take all four
        # hanging requests while another, answered at once, is about to finish green.)
        now = time.monotonic()
        holding = {int(holder.split(" lane ")[1].split()[0])
                   for holder in store.claimed_batches("meta").values()
                   if holder.startswith(f"{killed_run} lane ")}
        for lane in list(claimed_since):
            if lane not in holding:
                del claimed_since[lane]
        for lane in holding:
            claimed_since.setdefault(lane, now)
        stuck = {lane for lane, since in claimed_since.items() if now - since >= 3}
        running = [t for t in live.tasks(killed_run)
                   if t["task_id"].startswith("push") and t["state"] == "running"
                   and t["hostname"] in ("worker1", "worker2") and t["map_index"] in stuck]
        return running[0] if running else None

    victim = live.wait("a push stuck on the platform's answer", stuck_push, timeout=180)
    assert live.cluster.kill_worker(victim["hostname"])
    run = live.wait_run(killed_run)
    tasks = {(t["task_id"], t["map_index"]): t for t in live.tasks(killed_run)}
    assert tasks[(victim["task_id"], victim["map_index"])]["state"] == "failed"
    # Truthful colour: red exactly when events are left pending. With push lanes, a lane on
    # the surviving worker takes over a dead lane's batch once its claim expires (lease_ttl)
    # and the run can end green, everything delivered; with one task per batch it ends red.
    pending = live.store().summary(["meta"])["meta"]["pending"]
    assert run["state"] == ("failed" if pending else "success"), live.diagnostics()
    assert tasks[("commit_watermark", -1)]["state"] == run["state"]
    print(f"\n[cluster kill] {victim['task_id']}[{victim['map_index']}] on "
          f"{victim['hostname']} killed; its run ended {run['state']} with {pending} "
          "event(s) pending")

    # The next run, on the surviving worker, resends what is pending with the same event ids.
    survivor = ({"worker1", "worker2"} - {victim["hostname"]}).pop()
    next_run = live.wait_run(live.trigger())
    assert next_run["state"] == "success", live.diagnostics()
    _report("run after the kill", live, next_run)
    assert _hosts(live, next_run["dag_run_id"]) <= {survivor}

    store = live.store()
    summary = store.summary(["meta"])["meta"]
    assert summary["pending"] == 0 and not store.pending_batch_ids("meta")
    ledger = {r["event_id"]: r for r in store.ledger_rows("meta")}
    delivered = {k for k, r in ledger.items() if r["status"] == "delivered"}
    events = live.sandbox("meta/events?unique=false")
    events = events["events"] if isinstance(events, dict) else events
    unique = [e["event_id"] for e in events if not e.get("duplicate")]
    # Nothing counted twice: the resend was deduplicated by the platform, once per event.
    assert len(unique) == len(set(unique))
    assert any(e.get("duplicate") for e in events), "the killed batch was never resent"
    # Nothing lost: every event the platform holds is delivered in the ledger, and back.
    assert delivered == set(unique)
    # Every stage change in the warehouse is accounted for in the ledger.
    from sqlalchemy import text

    with make_engine(live.warehouse_url).connect() as conn:
        rows = {(str(r[0]), r[1]) for r in conn.execute(text(
            f"SELECT lead_id, stage FROM {demo_data.TABLE_NAME}"))}
    in_ledger = {(str(r["lead_id"]), r["stage"]) for r in ledger.values()}
    assert rows - in_ledger == set() or summary["quarantined"] >= len(rows - in_ledger)


def test_a_contract_checked_backfill_runs_its_workers_under_celery(live: Live) -> None:
    """The check's two worker processes (Great Expectations, and the stage worker a window
    of 10,000+ rows starts) run inside a Celery task as they do under ``airflow dags test``:
    the run ends green, every row is checked, and the task's log shows both at work."""
    from leadsync import demo_data
    from leadsync.db import make_engine
    from leadsync.pipeline import WRITER_PROCESS_MIN_ROWS

    path = Path(live.cluster.extra_env["LEADSYNC_CONFIG"])
    raw = yaml.safe_load(path.read_text())
    before = path.read_text()
    raw["contract"] = {"enabled": True}
    raw["destinations"][0]["batch_size"] = 1000
    path.write_text(yaml.safe_dump(raw))  # tasks read it again (by its mtime)
    try:
        n = WRITER_PROCESS_MIN_ROWS + 2000
        demo_data.add_changes(make_engine(live.warehouse_url), n,
                              datetime.now(UTC) - timedelta(seconds=6))
        run_id = live.trigger()
        run = live.wait_run(run_id, timeout=600)
        assert run["state"] == "success", live.diagnostics()
        counts = live.store().get_run(run_id, "meta")["counts"]
        assert counts["checked"] >= n, counts
        logs = list((live.cluster.home / "airflow" / "logs").rglob("*.log"))
        check_log = [p for p in logs if f"run_id={run_id}" in str(p)
                     and "task_id=check_contract" in str(p)]
        assert check_log, f"no check_contract log among {len(logs)} logs"
        text_ = "\n".join(p.read_text(errors="replace") for p in check_log)
        assert "writer.state" in text_, text_[-3000:]  # the stage worker's writes, timed
        assert "expectations evaluated" in text_, text_[-3000:]  # the contract's report
        print(f"\n[cluster contract] {n} new rows checked and staged with the GX and stage "
              f"workers inside a Celery task; run {run_id} ended {run['state']}")
    finally:
        path.write_text(before)

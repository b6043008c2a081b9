"""Push lanes: any backlog drains in a bounded number of task instances, two lanes never send
one batch, and a dead lane's claim expires."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import text

from leadsync import demo_data, faults
from leadsync.config import Config, parse_config
from leadsync.db import make_engine

from .conftest import Backend, make_backend
from .test_faults import World, expected_events

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STAGES = {"lead": "Lead", "qualified": "Marketing Qualified Lead",
          "sales_accepted": "Sales Qualified Lead", "won": "Converted"}


def lane_config(batch_size: int, lease_ttl: str, lanes: int = 2,
                in_flight: int = 4) -> dict[str, Any]:
    return {
        "source": {"query_file": str(ROOT / "include" / "sql" / "converted_leads.sql")},
        "state": {"lease_ttl": lease_ttl, "lease_wait": "0s"},
        "contract": {"enabled": False},  # not what is tested here; saves the GX import
        "destinations": [{"name": "meta", "type": "meta", "crm_name": "Test CRM",
                          "batch_size": batch_size, "push_lanes": lanes, "stages": STAGES,
                          "requests_in_flight": in_flight,
                          "retry": {"attempts": 2, "backoff_base": "0s",
                                    "backoff_max": "10ms"}}],
    }


def _stats(world: World) -> dict[str, int]:
    resp = requests.get(f"{world.sandbox_url}/_sandbox/stats", timeout=5)
    resp.raise_for_status()
    return dict(resp.json()["meta"])


def _staged(world: World, run_id: str) -> int:
    pipeline = world.pipeline()
    pipeline.open_run(run_id)
    pipeline.check(run_id)
    return len(pipeline.stage(run_id)["batch_ids"])


def test_a_backlog_past_max_map_length_drains_in_a_bounded_number_of_tasks(
        tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
        sandbox: Any, airflow_db: None, home: Path) -> None:
    from airflow.configuration import conf

    backend: Backend = make_backend("sqlite", tmp_path, request, monkeypatch, sandbox)
    path = tmp_path / "leadsync.yaml"
    path.write_text(json.dumps(lane_config(batch_size=1, lease_ttl="5m")))
    monkeypatch.setenv("LEADSYNC_CONFIG", str(path))
    backend.seed(800)

    dr = backend.run_dag()

    assert str(getattr(dr.state, "value", dr.state)) == "success"
    max_map_length = conf.getint("core", "max_map_length")
    run = backend.store().get_run(dr.run_id, "meta")
    batches = run["counts"]["batches"]
    assert batches > max_map_length  # one request per event: a backlog no mapping could take
    stats = backend.sandbox_stats()
    assert stats["requests"] == batches  # each batch sent once
    assert stats["unique_events"] == stats["events_received"] == run["counts"]["delivered"]
    assert backend.store().pending_batch_ids("meta") == []
    from sqlalchemy import create_engine

    airflow = create_engine(f"sqlite:///{home / 'airflow' / 'airflow.db'}")
    with airflow.connect() as conn:
        tis = conn.execute(text(
            "SELECT task_id, map_index, state FROM task_instance WHERE dag_id = 'leadsync_meta' "
            "AND run_id = :r"), {"r": dr.run_id}).fetchall()
    assert sorted((t, m) for t, m, _ in tis if t == "push_lane") == [("push_lane", 0),
                                                                      ("push_lane", 1)]
    assert len(tis) == 5  # open, check (and stage), two lanes, commit: whatever the backlog
    assert {s for _, _, s in tis} == {"success"}


@pytest.fixture
def pg_world(pg_empty_url: str, sandbox: Any) -> World:
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=5).raise_for_status()
    return World(parse_config(lane_config(batch_size=1, lease_ttl="10s")), pg_empty_url,
                 pg_empty_url, sandbox.url)


def test_two_lanes_on_postgres_never_send_one_batch_twice(pg_world: World) -> None:
    demo_data.seed(make_engine(pg_world.warehouse_url), 120, datetime.now(UTC))
    batches = _staged(pg_world, "race")
    assert batches > 150
    start = threading.Barrier(2)
    results: dict[int, dict[str, int]] = {}
    errors: list[BaseException] = []

    def lane(n: int) -> None:
        pipeline = pg_world.pipeline()  # its own engine: connections like another worker's
        start.wait()
        try:
            results[n] = pipeline.push_lane("race", n)
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=lane, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    stats = _stats(pg_world)
    assert stats["requests"] == batches  # counted at the platform: no batch sent twice
    assert stats["duplicate_events"] == 0
    assert stats["unique_events"] == batches
    assert results[0]["batches"] + results[1]["batches"] == batches
    assert results[0]["batches"] > 0 and results[1]["batches"] > 0  # both lanes worked
    run = pg_world.store().get_run("race", "meta")
    assert run["counts"]["delivered"] == batches  # no lane's counts lost to the other's
    assert pg_world.store().pending_batch_ids("meta") == []


_LANE_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from integration.test_faults import World
from integration.test_push_lanes import lane_config
from leadsync.config import parse_config
world = World(parse_config(lane_config(3, sys.argv[4], in_flight=1)), sys.argv[1], sys.argv[2],
              sys.argv[3])
world.pipeline().push_lane(sys.argv[5], 0)
"""


def test_the_claim_of_a_killed_lane_expires_and_another_lane_sends_the_batch(
        tmp_path: Path, sandbox: Any) -> None:
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=5).raise_for_status()
    ttl = 4.0
    # One request in flight: the killed lane holds exactly the batch it was about to send.
    world = World(parse_config(lane_config(batch_size=3, lease_ttl=f"{ttl:.0f}s",
                                           in_flight=1)),
                  f"sqlite:///{tmp_path / 'wh.db'}", f"sqlite:///{tmp_path / 'st.db'}",
                  sandbox.url)
    demo_data.seed(make_engine(world.warehouse_url), 20, datetime.now(UTC))
    batches = _staged(world, "run1")
    assert batches >= 4
    # Lane 0 runs in a process that is killed (SIGKILL) while it holds its second batch.
    env = {**os.environ, faults.ENV_VAR: "before_send:kill@2"}
    code = _LANE_CHILD.format(tests=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", code, world.warehouse_url, world.state_url,
                           world.sandbox_url, f"{ttl:.0f}s", "run1"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    killed_at = time.monotonic()
    store = world.store()
    held = store.claimed_batches("meta")
    assert len(held) == 1  # the dead lane's claim outlives it...
    (orphan,) = held

    # ...so a lane of the same run started at once sends everything else, not that batch.
    assert world.pipeline().push_lane("run1", 1)["batches"] == batches - 2
    assert time.monotonic() - killed_at < ttl, "too slow to observe the live claim"
    assert store.pending_batch_ids("meta") == [orphan]

    time.sleep(max(0.0, ttl - (time.monotonic() - killed_at)) + 0.5)
    assert store.claimed_batches("meta") == {}
    assert world.pipeline().push_lane("run1", 1)["batches"] == 1  # the claim expired
    assert store.pending_batch_ids("meta") == []
    stats = _stats(world)
    assert stats["requests"] == batches and stats["duplicate_events"] == 0
    assert stats["unique_events"] == len(expected_events(world))
    assert world.pipeline().commit("run1")["status"] == "success"


def _thirty_leads_staged(tmp_path: Path, sandbox: Any, in_flight: int) -> tuple[World, int]:
    """A fresh sandbox and SQLite world, 30 leads staged by run1 in batches of 5."""
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=5).raise_for_status()
    world = World(parse_config(lane_config(batch_size=5, lease_ttl="1m", in_flight=in_flight)),
                  f"sqlite:///{tmp_path / 'wh.db'}", f"sqlite:///{tmp_path / 'st.db'}",
                  sandbox.url)
    demo_data.seed(make_engine(world.warehouse_url), 30, datetime.now(UTC))
    return world, _staged(world, "run1")


def test_a_lane_keeps_several_requests_in_flight_and_records_each_once(
        tmp_path: Path, sandbox: Any) -> None:
    """With the platform slow to answer, a lane's requests overlap (requests_in_flight): the
    lane takes about a quarter of the one-at-a-time time, and each batch is sent and recorded
    once."""
    world, batches = _thirty_leads_staged(tmp_path, sandbox, in_flight=4)
    assert batches >= 8
    delay = 0.5
    requests.post(f"{sandbox.url}/_sandbox/faults", json={"platform": "meta", "faults": [
        {"kind": "slow", "delay_s": delay, "times": batches}]}, timeout=5).raise_for_status()
    started = time.monotonic()
    counts = world.pipeline().push_lane("run1", 0)
    took = time.monotonic() - started
    assert counts["batches"] == batches
    assert took < batches * delay / 2, f"{took:.1f} s: the requests did not overlap"
    stats = _stats(world)
    assert stats["requests"] == batches and stats["duplicate_events"] == 0
    assert stats["unique_events"] == len(expected_events(world))
    store = world.store()
    assert store.pending_batch_ids("meta") == [] and store.claimed_batches("meta") == {}
    assert world.pipeline().commit("run1")["status"] == "success"


def test_a_fatal_answer_stops_the_lane_after_recording_the_requests_in_flight(
        tmp_path: Path, sandbox: Any) -> None:
    """A fatal error on one batch: the lane claims nothing more, records what the requests
    already in flight got, frees the failed batch and raises the error."""
    from leadsync.destinations.base import FatalDestinationError

    world, batches = _thirty_leads_staged(tmp_path, sandbox, in_flight=3)
    requests.post(f"{sandbox.url}/_sandbox/faults", json={"platform": "meta", "faults": [
        {"kind": "graph_error", "code": 190, "is_transient": False, "times": 1}]},
        timeout=5).raise_for_status()
    with pytest.raises(FatalDestinationError):
        world.pipeline().push_lane("run1", 0)
    store = world.store()
    stats = _stats(world)
    # Three requests were in flight when the first answers came; whichever got the error (the
    # lane may have claimed one more batch after recording an earlier answer), every other
    # answer was recorded, the failed batch is pending and free, and nothing was claimed once
    # the error was seen.
    assert stats["requests"] in (3, 4) and stats["duplicate_events"] == 0
    assert len(store.pending_batch_ids("meta")) == batches - (stats["requests"] - 1)
    assert store.claimed_batches("meta") == {}


def test_a_later_run_takes_an_earlier_runs_claims_at_once(tmp_path: Path, sandbox: Any) -> None:
    """A claim of a run that lost its lease is void: the next run sends the batch."""
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=5).raise_for_status()
    world = World(parse_config(lane_config(batch_size=5, lease_ttl="1s")),
                  f"sqlite:///{tmp_path / 'wh.db'}", f"sqlite:///{tmp_path / 'st.db'}",
                  sandbox.url)
    demo_data.seed(make_engine(world.warehouse_url), 15, datetime.now(UTC))
    _staged(world, "old")
    store = world.store()
    from datetime import timedelta

    claimed = store.claim_batch("meta", "old", "old lane 0 dead", timedelta(hours=1))
    assert claimed is not None
    time.sleep(1.1)  # the old run's lease expires; its claim does not (1 h)
    config: Config = world.config
    assert config.state.lease_ttl.total_seconds() == 1
    pipeline = world.pipeline()
    pipeline.open_run("new")
    pipeline.check("new")
    pipeline.stage("new")
    pipeline.push_lane("new", 0)
    assert store.pending_batch_ids("meta") == []
    assert pipeline.commit("new")["status"] == "success"
    assert _stats(world)["duplicate_events"] == 0


def test_a_red_run_names_the_lanes_that_failed(
        tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
        sandbox: Any, airflow_db: None, capfd: pytest.CaptureFixture[str]) -> None:
    backend: Backend = make_backend("sqlite", tmp_path, request, monkeypatch, sandbox)
    path = tmp_path / "leadsync.yaml"
    path.write_text(json.dumps(lane_config(batch_size=50, lease_ttl="5m")))
    monkeypatch.setenv("LEADSYNC_CONFIG", str(path))
    backend.seed(40)
    backend.fault({"kind": "graph_error", "code": 190, "is_transient": False,
                   "message": "Invalid OAuth access token", "http_status": 400, "times": 10})
    capfd.readouterr()

    dr = backend.run_dag()

    assert str(getattr(dr.state, "value", dr.state)) == "failed"
    out, err = capfd.readouterr()
    assert "push_lane_0, push_lane_1 failed (see its log)" in out + err
    assert "check_contract failed" not in out + err

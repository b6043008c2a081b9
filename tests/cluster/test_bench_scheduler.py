"""Benchmark (e) works end to end at a small size: the real DAG's first scheduled run on the
local cluster with the LocalExecutor (the Celery cluster has its own tests in
test_cluster.py), the trivial DAG and a run with nothing new, triggered through the REST API,
Airflow's records of each, and the delivery checks (correctness only, never speed)."""

from __future__ import annotations

import os

import pytest

from leadsync import bench_dag, bench_scheduler
from tests.conftest import PG_ADMIN_URL, require_postgres

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(600)]


def test_scheduler_benchmark_runs_the_dag_on_a_real_scheduler(
        capsys: pytest.CaptureFixture[str]) -> None:
    require_postgres()
    with bench_dag._Sink() as sink:
        case = bench_scheduler.run_case("postgres", 2_000, "local", PG_ADMIN_URL,
                                        "redis://unused", sink)
    assert case.correct, case.problems
    assert case.expected == case.delivered == case.sink_events == 2_000
    assert case.first is not None and case.noop is not None and case.trivial is not None
    tasks = sorted(s.task_id for s in case.first.spans)
    # 2,000 events are two batches: two push lanes, each a task instance of its own.
    assert tasks == ["check_contract", "commit_watermark", "open_run", "push_lane",
                     "push_lane"], tasks
    assert {s.map_index for s in case.first.spans if s.task_id == "push_lane"} == {0, 1}
    assert all(s.state == "success" for s in case.first.spans)
    # Nothing new: no lane starts (Airflow skips the mapped task without a process).
    assert sorted(s.task_id for s in case.noop.spans) == [
        "check_contract", "commit_watermark", "open_run"]
    assert sorted(s.task_id for s in case.trivial.spans) == ["first", "second"]
    assert case.first.wall_s > 0 and case.trivial.wall_s > 0
    assert case.phases.keys() >= {"read", "plan", "check"}
    # The machine's busy cores, sampled while the first run ran: for the run, and for the
    # tasks long enough to hold two samples (each starts a process: open_run takes seconds).
    assert {"run", "open_run"} <= set(case.busy) <= {"run", *tasks}
    assert all(0 <= c <= (os.cpu_count() or 1) + 0.5 for c in case.busy.values())
    bench_scheduler.print_case(case)
    out = capsys.readouterr().out
    assert "LocalExecutor" in out and "first run (scheduled)" in out
    assert "the machine's cores busy on average" in out
    assert "CORRECTNESS" not in out

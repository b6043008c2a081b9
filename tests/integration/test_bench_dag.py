"""Benchmark (d) works end to end at a small size: the real DAG in ``airflow dags test``, the
lean sink, the no-op run and the checks (correctness only, never speed)."""

from __future__ import annotations

import os

import pytest

from leadsync import bench_dag

pytestmark = pytest.mark.integration


def test_dag_benchmark_delivers_every_eligible_row_once_and_reports_its_phases() -> None:
    with bench_dag._Sink() as sink:
        case = bench_dag.run_case("sqlite", 2_000, "unused-for-sqlite", sink, noop_runs=2)
    assert case.correct, case.problems
    assert case.expected == case.delivered == case.sink_events == 2_000
    assert case.first is not None and case.noop is not None and case.fixed is not None
    assert case.first.phases.keys() >= {"read", "check", "plan", "state", "gx_setup"}
    assert case.first.counts["staged"] == 2_000
    assert sum(s for t, s in case.first.tasks.items() if t.startswith("push")) > 0
    # Nothing new: the lookback's rows were settled by the first run and cost a key lookup.
    assert case.noop.counts["read"] > 0 and case.noop.counts.get("staged", 0) == 0
    assert case.noop.phases.get("gx_setup", 0.0) == 0.0  # GX never imported
    assert case.first.peak_rss_mb > case.fixed.peak_rss_mb > 0
    # The CPU the run's processes used (wait4 counts the workers the task waited for) and the
    # machine's busy time over the same wall time, which holds it.
    assert case.first.cpu_s > 0 and case.first.machine_busy_s is not None
    assert case.first.machine_busy_s >= 0.9 * case.first.cpu_s
    # The cores busy while each task ran, from the samples inside its span (open_run takes
    # seconds under dags test: Airflow starts its execution API for it).
    assert "open_run" in case.first.busy_cores
    assert set(case.first.busy_cores) <= set(case.first.tasks)
    assert all(0 <= c <= (os.cpu_count() or 1) + 0.5 for c in case.first.busy_cores.values())
    # GX ran in the check task's worker process: its time and memory are reported, and the
    # sampled tree holds both processes.
    assert case.first.worker.keys() >= {"suite", "run"}
    assert case.first.tree_rss_mb > case.first.peak_rss_mb
    assert not case.noop.worker  # no worker started for a window with nothing new
    # Two no-op runs, each paired with a run of the trivial DAG after it: the figure is the
    # median of the pairs' differences, and the reported run is one of the two.
    assert len(case.noop_walls) == len(case.fixed_walls) == 2
    extra, detail = bench_dag.noop_extra(case)
    diffs = [n - f for n, f in zip(case.noop_walls, case.fixed_walls, strict=True)]
    assert abs(extra - sum(diffs) / 2) < 1e-9 and "median of 2 pairs" in detail
    assert case.noop.wall_s in case.noop_walls
    # The targets' summary: no wall-time target at this size, the others each with a verdict.
    lines = bench_dag.target_lines([case])
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == [
        "largest", "contract", "no-op"], lines
    assert all(line.endswith(("met)", "MISSED)")) for line in lines), lines

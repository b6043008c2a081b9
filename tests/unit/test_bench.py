"""The benchmark code works end to end at a small size (correctness only, never speed)."""

from __future__ import annotations

import argparse
import copy
import re
from typing import Any

import pytest

from leadsync import bench
from tests.conftest import IN_CI, PG_ADMIN_URL, require_postgres


def _database_url() -> str:
    """Postgres when it is reachable (required in CI), else SQLite files."""
    if IN_CI:
        require_postgres()
        return PG_ADMIN_URL
    try:
        require_postgres()
    except pytest.skip.Exception:
        return "sqlite"
    return PG_ADMIN_URL


def test_quick_benchmark_passes_its_correctness_checks(capsys: pytest.CaptureFixture[str]) -> None:
    # (d), the real DAG, has its own test in tests/integration/test_bench_dag.py.
    args = argparse.Namespace(quick=True, events=0, e2e_rows="", skip_e2e=False,
                              skip_dag=True, postgres_url=_database_url())
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "same events: OK (2,000 events each side" in out
    assert "correctness OK: eligible 5,000, ledger delivered 5,000, sandbox unique 5,000" in out
    assert "all correctness checks passed" in out
    assert "targets (issue 9):\n    (a) build " in out


def test_end_to_end_on_sqlite_delivers_every_eligible_row_once() -> None:
    result = bench.run_e2e(3_000, "sqlite")
    assert result.correct, result.problems
    assert result.expected == result.delivered == result.sandbox_unique == 3_000
    assert result.ledger["pending"] == result.ledger["failed"] == 0
    assert result.peak_rss_kb > result.rss_start_kb > 0
    assert result.phases.keys() >= {"stage", "push", "commit"}


def test_build_benchmark_compares_the_same_events() -> None:
    result = bench.run_build(1_500, repetitions=1, profile=False)
    assert result.correct, result.problems
    assert result.ours.events == result.sdk.events == 1_500
    assert result.compared == 1_000  # the first request of each side, event by event


def _event(event_id: str, em: str) -> dict[str, Any]:
    return {"event_id": event_id, "event_name": "Lead", "event_time": 1,
            "action_source": "system_generated", "user_data": {"em": [em], "ph": ["p"]}}


def test_the_comparison_notices_differences() -> None:
    ours = [_event("a", "x"), _event("b", "y")]
    assert bench._compare(ours, copy.deepcopy(ours)) == []
    other = copy.deepcopy(ours)
    other[1]["user_data"]["em"] = ["z"]
    assert bench._compare(ours, other) == ["b: em hashes differ"]
    del other[1]["user_data"]["ph"]
    assert "user_data keys differ" in bench._compare(ours, other)[0]
    assert bench._compare(ours, ours[:1])[0].startswith("different events")


def test_hash_identifiers_as_lists_is_hash_identifiers_in_lists() -> None:
    # The speed-up meta.build_event relies on (see identity.hash_identifiers_as_lists).
    from datetime import UTC, datetime

    from leadsync.demo_data import generate_funnel
    from leadsync.identity import (
        GOOGLE_RULES,
        META_RULES,
        TIKTOK_RULES,
        hash_identifiers,
        hash_identifiers_as_lists,
    )

    rows = list(generate_funnel(2_000, datetime(2025, 6, 2, tzinfo=UTC), seed=5))
    rows += [{"email": 1.5, "phone": 16505551212, "country": ["us"], "gender": True}, {}]
    for rules in (META_RULES, TIKTOK_RULES, GOOGLE_RULES):
        for row in rows:
            flat = hash_identifiers(row, rules)
            assert hash_identifiers_as_lists(row, rules) == {k: [v] for k, v in flat.items()}
            assert list(hash_identifiers_as_lists(row, rules)) == list(flat)


def test_idle_and_gaps_measure_airflow_between_tasks() -> None:
    from datetime import UTC, datetime, timedelta

    from leadsync.bench_scheduler import idle_and_gaps, sync_upstream

    t0 = datetime(2026, 12, 1, tzinfo=UTC)

    def at(s: float) -> datetime:
        return t0 + timedelta(seconds=s)

    spans = [("open_run", at(1), at(2)), ("check_contract", at(3), at(10)),
             ("push_lane", at(11), at(15)), ("push_lane", at(12), at(14)),
             ("commit_watermark", at(17), at(18))]
    upstream = sync_upstream([s[0] for s in spans])
    gaps, idle = idle_and_gaps(t0, at(20), spans, upstream)
    # Each task from the moment it could run: the run's start, then its upstream's end (the
    # commit waits for the later push lane).
    assert gaps == [1.0, 1.0, 1.0, 2.0, 2.0]
    # Busy 1-2, 3-10, 11-15 (the lanes overlap), 17-18: 13 of the run's 20 s.
    assert idle == pytest.approx(7.0)
    assert upstream("commit_watermark") == ["push_lane", "push_lane"]
    assert sync_upstream(["open_run", "check_contract"])("commit_watermark") == [
        "check_contract"]
    assert idle_and_gaps(t0, at(5), [], upstream) == ([], 5.0)


def test_a_scheduler_case_that_cannot_start_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    from leadsync import bench_dag, bench_scheduler

    with bench_dag._Sink() as sink:
        # Nothing listens on port 1: the Celery cluster stops at its broker, before any process.
        case = bench_scheduler.run_case("sqlite", 100, "celery", "postgresql://unused",
                                        "redis://127.0.0.1:1/0", sink)
    assert not case.correct and case.first is None and not case.problems
    assert case.error.startswith("ClusterError: Redis at redis://127.0.0.1:1/0")
    bench_scheduler.print_case(case)
    out = capsys.readouterr().out
    assert "COULD NOT RUN: ClusterError: Redis at" in out and "CORRECTNESS" not in out


def test_the_machine_busy_time_leaves_out_idle_and_iowait() -> None:
    import os

    from leadsync import bench_dag

    tick = os.sysconf("SC_CLK_TCK")
    line = "cpu  700 10 200 9000 300 5 15 20 0 0"  # user nice system idle iowait irq softirq steal
    assert bench_dag.machine_busy_s(line) == pytest.approx((700 + 10 + 200 + 5 + 15 + 20) / tick)
    assert bench_dag.machine_busy_s("intr 1 2 3") is None
    assert bench_dag.machine_busy_s("cpu 1 2") is None
    now = bench_dag.machine_busy_s()
    assert now is not None and now > 0  # this machine's /proc/stat


def test_a_run_s_cpu_line_says_how_many_cores_were_busy() -> None:
    from leadsync import bench_dag

    run = bench_dag.DagRun(wall_s=10.0, peak_rss_mb=300.0, ok=True, cpu_s=12.0,
                           machine_busy_s=18.0)
    line = bench_dag._fmt_cpu(run)
    assert line.startswith("12.0 s in airflow's process and the processes it started, 6.0 s "
                           "elsewhere on the machine")
    assert "1.80 of its" in line
    unknown = bench_dag.DagRun(wall_s=10.0, peak_rss_mb=300.0, ok=True, cpu_s=12.0)
    assert bench_dag._fmt_cpu(unknown) == "12.0 s in airflow's process and the processes it started"


def test_busy_cores_between_two_times_comes_from_the_samples_inside() -> None:
    from leadsync import bench_dag

    samples = [(100.0, 50.0), (101.0, 51.0), (102.0, 53.0), (103.0, 55.0), (104.0, 55.5)]
    assert bench_dag.busy_cores(samples, 101.0, 103.0) == pytest.approx(2.0)
    assert bench_dag.busy_cores(samples, 100.0, 104.0) == pytest.approx(1.375)
    assert bench_dag.busy_cores(samples, 103.5, 104.5) is None  # one sample inside
    assert bench_dag._unix("2026-12-05 03:10:00.500000") == pytest.approx(1796440200.5)
    assert bench_dag._unix("2026-12-05 03:10:00+00:00") == pytest.approx(1796440200.0)


def test_a_scheduled_run_s_busy_cores_cover_the_run_and_each_task_s_span() -> None:
    from datetime import UTC, datetime, timedelta

    from leadsync import bench_scheduler

    t0 = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)

    def at(s: float) -> datetime:
        return t0 + timedelta(seconds=s)

    spans = [bench_scheduler.Span("check", -1, at(0), at(4), "w1", "success"),
             bench_scheduler.Span("push", 0, at(4), at(6), "w1", "success"),
             bench_scheduler.Span("push", 1, at(5), at(8), "w2", "success"),
             bench_scheduler.Span("tiny", -1, at(8.1), at(8.2), "w1", "success")]
    run = bench_scheduler.RunRecord("d", "r", "success", None, at(0), at(8), spans)
    base = t0.timestamp()
    # Two cores busy for the first four seconds, one after.
    samples = [(base + s, 2.0 * min(s, 4) + max(0.0, s - 4)) for s in range(0, 10)]
    busy = bench_scheduler.run_busy(run, samples)
    assert busy == pytest.approx({"run": 1.5, "check": 2.0, "push": 1.0})  # tiny: no samples


def _bench_args(argv: list[str]) -> argparse.Namespace:
    return bench.build_parser().parse_args(argv)


@pytest.mark.parametrize(("argv", "message"), [
    (["--executors", "bogus"], "--executors: expected celery, local or both, got 'bogus'"),
    (["--executors", ""], "--executors: expected celery, local or both, got nothing"),
    (["--dag-cases", "mysql:10"], "--dag-cases: expected backend:rows (sqlite or postgres), "
                                  "got 'mysql:10'"),
    (["--scheduler-cases", "postgres:lots"], "--scheduler-cases: expected backend:rows"),
])
def test_a_bad_option_fails_before_anything_runs(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(bench.BenchArgumentError, match="^" + re.escape(message)):
        bench.main(_bench_args(argv))
    assert capsys.readouterr().out == ""  # not even (a)'s header: nothing ran


def test_the_cli_names_a_bad_bench_option_and_quotes_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    from leadsync import cli

    assert cli.main(["bench", "--scheduler-cases", "postgres:10", "--executors", "celry"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == ("leadsync: --executors: expected celery, local or both, "
                                    "got 'celry'")


def test_the_cases_are_read_up_front() -> None:
    cases = bench.read_cases(_bench_args(["--dag-cases", "sqlite:1_000,postgres:20",
                                          "--scheduler-cases", "postgres:30",
                                          "--executors", "both"]))
    assert cases == bench.Cases([("sqlite", 1000), ("postgres", 20)], [("postgres", 30)],
                                ["celery", "local"])
    # Without (e), --executors is not read; --skip-dag and --quick leave (d)'s cases as run.
    assert bench.read_cases(_bench_args(["--skip-dag", "--scheduler-cases", "",
                                         "--executors", "x"])) == bench.Cases([], [], [])
    assert bench.read_cases(_bench_args(["--quick"])) == bench.Cases(
        [("sqlite", bench.QUICK_E2E_ROWS[0])], [], [])

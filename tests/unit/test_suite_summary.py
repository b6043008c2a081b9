"""The suite's closing section says what it left to the separate make targets."""

from __future__ import annotations

from pathlib import Path

from tests import conftest
from tests.conftest import left_out

ROOT = Path(__file__).resolve().parents[2]

SOAK = "tests/integration/test_faults.py::test_random_fault_schedules"
FUZZ = ("tests/integration/test_fuzz.py::"
        "test_hostile_rows_each_end_in_one_outcome_and_leak_nothing[sqlite-20261129]")
RENDER = ("tests/integration/test_fuzz.py::"
          "test_render_on_fuzzed_lines_exits_0_with_one_outcome_per_row")
BENCH = "tests/unit/test_bench.py::test_options_are_read_first"


def test_a_whole_run_says_its_own_scale_beside_each_target() -> None:
    lines = left_out({SOAK, FUZZ, RENDER, BENCH}, 200, (1000, 1, 1000))

    assert lines == [
        "make soak: 1,000 random crash/fault schedules on SQLite (200 here)",
        "make fuzz: 10,000 hostile rows x 2 seeds per backend and 10,000 render lines "
        "(1,000 rows x 1 seed per backend and 1,000 render lines here)",
        "make bench: the benchmarks at 200,000-1,000,000 rows, with their figures (each run "
        "here on a few thousand rows, to check that it works, without figures)",
    ]


def test_a_partial_run_says_none_for_what_it_did_not_run() -> None:
    lines = left_out({"tests/unit/test_claims.py::test_x"}, 200, None)

    assert all(line.endswith("(none here)") for line in lines), lines
    assert [line.split(":")[0] for line in lines] == ["make soak", "make fuzz", "make bench"]


def test_seeds_are_counted_in_the_plural() -> None:
    (_, fuzz, _) = left_out({FUZZ}, 5, (10_000, 2, 10_000))

    assert fuzz.endswith("(10,000 rows x 2 seeds per backend here)")


def test_render_alone_is_said_alone() -> None:
    (_, fuzz, _) = left_out({RENDER}, 5, (10_000, 2, 7_000))

    assert fuzz.endswith("(7,000 render lines here)")


def test_the_tests_it_looks_for_exist() -> None:
    """A renamed test would make the summary say "none here" for a run that had it."""
    for prefix in (conftest._SOAK_TEST, conftest._FUZZ_TEST, conftest._RENDER_TEST):
        path, name = prefix.split("::")
        assert f"def {name}" in (ROOT / path).read_text(), prefix
    for prefix in conftest._BENCH_TESTS:
        assert list(ROOT.glob(prefix + "*" if not prefix.endswith(".py") else prefix)), prefix

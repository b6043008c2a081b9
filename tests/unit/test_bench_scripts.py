"""The benchmark scripts under bench/ still run against the code (figures are not checked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_contract_cost_runs_on_a_few_rows() -> None:
    result = _load("contract_cost").contract_cost(n_rows=1500, repeat=1, e2e=True)
    assert result["rows"] == 1500
    per = result["per_100k"]
    assert per["check_s"] > 0 and per["hash_and_build_s"] > 0 and per["check_projection_s"] > 0
    assert result["e2e_sqlite"]["check_s_per_100k"] > 0
    assert result["e2e_sqlite"]["batches_staged"] >= 1


@pytest.mark.postgres
def test_ledger_update_runs_on_a_small_ledger(pg_url: str, pg_empty_url: str) -> None:
    """bench/ledger_update.py: both schemas, and only the new one's updates are HOT."""
    result = _load("ledger_update").ledger_update(pg_url, pg_empty_url, rows=5000, batches=3)
    assert result["batches"] == 3
    assert result["now"]["median_ms"] > 0 and result["before"]["median_ms"] > 0
    assert result["now"]["hot_share"] == 1.0
    assert result["before"]["hot_share"] == 0.0


def test_source_cost_reads_every_row_and_marks_the_unreadable_ones(tmp_path: Path) -> None:
    """bench/source_cost.py on SQLite: 500 rows, 5 of them with undecodable text."""
    script = _load("source_cost")
    url = script._sqlite(tmp_path / "source.db", 500, 5)
    rows, markers, wall, cpu = script.read(url, 1)
    assert (rows, markers) == (495, 5)
    assert wall > 0 and cpu > 0


@pytest.mark.postgres
def test_source_cost_reads_a_postgres_table() -> None:
    """bench/source_cost.py on Postgres: 400 rows, 4 with a year Python cannot represent."""
    from sqlalchemy import text

    from leadsync.db import make_engine
    from tests.conftest import PG_ADMIN_URL, require_postgres

    require_postgres()
    script = _load("source_cost")
    url = script._postgres(PG_ADMIN_URL, 400, 4)
    try:
        rows, markers, _, _ = script.read(url, 1)
        assert (rows, markers) == (396, 4)
    finally:
        admin = make_engine(PG_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text('DROP DATABASE IF EXISTS "leadsync_source_cost_400_4" '
                              "WITH (FORCE)"))
        admin.dispose()


def test_push_dag_runs_the_real_dag_with_bounded_task_instances(
        capsys: pytest.CaptureFixture[str]) -> None:
    """bench/push_dag.py: one `airflow dags test` run, five task instances, every event sent."""
    assert _load("push_dag").main(["--leads", "150", "--batch-size", "10", "--lanes", "2"]) == 0
    out = capsys.readouterr().out
    assert "airflow dags test exit 0" in out
    assert "task instances: 5 ({'success': 5})" in out
    assert "push_lane          x2" in out
    assert "push phase:" in out

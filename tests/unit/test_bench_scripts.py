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

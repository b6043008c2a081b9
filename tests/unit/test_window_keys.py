"""The window's duplicated keys are counted only once a row is to be validated, and a source
query that fans out still stops the check before anything is staged."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine

from leadsync import demo_data, quality
from leadsync.config import DEFAULT_CONFIG_PATH, Config, parse_config
from leadsync.pipeline import Pipeline
from leadsync.state import EventOutcome, StateStore


def _config(tmp_path: Path, query: str | None = None, **contract: Any) -> Config:
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["contract"].update({"data_docs": False, **contract})
    if query is not None:
        (tmp_path / "q.sql").write_text(query)
        data["source"]["query_file"] = str(tmp_path / "q.sql")
    return parse_config(data)


def _world(tmp_path: Path) -> tuple[Any, StateStore]:
    wh = create_engine(f"sqlite:///{tmp_path / 'wh.db'}")
    demo_data.create_schema(wh)
    demo_data._load(wh, demo_data.generate_rows_fast(400, datetime.now(UTC)), True)
    return wh, StateStore(create_engine(f"sqlite:///{tmp_path / 'state.db'}"))


def _settle(pipeline: Pipeline, run_id: str) -> None:
    pipeline.open_run(run_id)
    pipeline.check(run_id)
    state = pipeline.state
    for batch_id in pipeline.stage(run_id)["batch_ids"]:
        batch = state.load_batch(batch_id)
        state.record_outcomes(batch, {e["event_id"]: EventOutcome("delivered")
                                      for e in batch.events}, run_id)
    pipeline.commit(run_id)


def test_a_run_with_nothing_new_never_counts_the_windows_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wh, state = _world(tmp_path)
    config = _config(tmp_path)
    counted: list[int] = []
    real = quality.window_key_counts

    def spy(*args: Any) -> dict[tuple[str, str], int]:
        counted.append(1)
        return real(*args)

    monkeypatch.setattr(quality, "window_key_counts", spy)
    _settle(Pipeline(config, config.destination("meta"), state, wh), "r1")
    assert counted == [1]
    _settle(Pipeline(config, config.destination("meta"), state, wh), "r2")
    run = state.get_run("r2", "meta")
    assert run is not None and run["counts"].get("already_delivered", 0) > 0
    assert counted == [1]  # the second window held only settled rows


def test_a_source_query_that_fans_out_stops_the_check(tmp_path: Path) -> None:
    wh, state = _world(tmp_path)
    # A join that repeats every row.
    query = ("SELECT s.* FROM crm_lead_stages s "
             "CROSS JOIN (SELECT 1 AS n UNION ALL SELECT 2) twice")
    config = _config(tmp_path, query, max_quarantined_rows=5)
    pipeline = Pipeline(config, config.destination("meta"), state, wh)
    pipeline.open_run("r1")
    with pytest.raises(quality.ContractViolation, match="probably fans out"):
        pipeline.check("r1")
    assert state.ledger_rows("meta") == []
    assert state.pending_batch_ids("meta") == []
    run = state.get_run("r1", "meta")
    assert run is not None and run["status"] == "contract_failed"


def test_an_unreadable_row_is_quarantined_even_when_the_check_stops_at_it(
        tmp_path: Path) -> None:
    wh, state = _world(tmp_path)
    raw = wh.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("CREATE TEMP TABLE one AS SELECT * FROM crm_lead_stages LIMIT 1")
        cur.execute("UPDATE one SET lead_id = 'BAD-1', first_name = CAST(? AS TEXT)",
                    (b"\xff\xfe",))
        cur.execute("INSERT INTO crm_lead_stages SELECT * FROM one")
        raw.commit()
    finally:
        raw.close()
    # No failure allowed: the check stops at the unreadable row, before any verdict.
    config = _config(tmp_path, max_quarantined_rows=0)
    pipeline = Pipeline(config, config.destination("meta"), state, wh)
    pipeline.open_run("r1")
    with pytest.raises(quality.ContractViolation):
        pipeline.check("r1")
    assert ("BAD-1", "unreadable_row") in {(k[0], v) for k, v in
                                           _quarantine(state).items()}
    assert state.ledger_rows("meta") == [] and state.pending_batch_ids("meta") == []


def _quarantine(state: StateStore) -> dict[tuple[str, str], str]:
    from sqlalchemy import text

    with state.engine.connect() as conn:
        return {(r.lead_id, r.stage): r.rule for r in conn.execute(text(
            "SELECT lead_id, stage, rule FROM ls_quarantine WHERE destination = 'meta'"))}


def test_a_pass_freezes_the_heap_for_its_collections_and_gives_it_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    wh, state = _world(tmp_path)
    config = _config(tmp_path)
    pipeline = Pipeline(config, config.destination("meta"), state, wh)
    seen: list[tuple[int, tuple[int, int, int]]] = []
    real = quality.window_key_counts

    def spy(*args: Any) -> dict[tuple[str, str], int]:  # called during the pass
        seen.append((gc.get_freeze_count(), gc.get_threshold()))
        return real(*args)

    monkeypatch.setattr(quality, "window_key_counts", spy)
    frozen_for_good = gc.get_freeze_count() > 0  # GX imported in this process: stays so
    gc.unfreeze()
    try:
        threshold = gc.get_threshold()
        pipeline.open_run("r1")
        pipeline.check("r1")
        (during,) = seen
        assert during[0] > 0 and during[1][0] >= 10_000
        assert (gc.get_freeze_count(), gc.get_threshold()) == (0, threshold)
        # A heap frozen before a pass (GX imported in this process) is left as it is: frozen
        # again, whatever became garbage since would never be collected (engines, their
        # connections: a test run ran out of file descriptors and Postgres connections).
        gc.freeze()
        frozen = gc.get_freeze_count()
        pipeline.check("r1")  # again
        assert seen[1][0] <= frozen and seen[1][1][0] >= 10_000  # none frozen anew
        assert gc.get_freeze_count() <= frozen and gc.get_threshold() == threshold
    finally:
        if frozen_for_good:
            gc.freeze()
        else:
            gc.unfreeze()

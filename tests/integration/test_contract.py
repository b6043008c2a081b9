"""The data contract in the real DAG (``dag.test()``), on SQLite and on Postgres.

Bad rows are quarantined with their rule and the rest is sent; a broken window stops the run
in check_contract before anything is staged, with a message a person can act on; a row fixed
upstream is sent by the next run and its quarantine entry resolved.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text

from leadsync.config import DEFAULT_CONFIG_PATH
from leadsync.destinations.base import derive_event_id
from leadsync.hashing import sha256_hex

from .conftest import ROOT, Backend

pytestmark = pytest.mark.integration

BROKEN = {
    ("00QXFUTURE000001", "lead"): "future_event_time",
    ("00QXFUTURE000002", "lead"): "future_event_time",
    ("00QXCURRENCY0001", "won"): "bad_currency",
    ("00QXCURRENCY0002", "won"): "bad_currency",
    ("00QXNOKEYS000001", "lead"): "no_match_keys",
    ("00QXNOKEYS000002", "lead"): "no_match_keys",
    ("00QXNOKEYS000003", "lead"): "no_match_keys",  # a mistyped email, nothing else
    ("00QXDUPLICATE0001", "qualified"): "duplicate_lead_stage",
    ("00QXDUPLICATE0001 ", "qualified"): "duplicate_lead_stage",
}


def _dag_state(dagrun: Any) -> str:
    return str(getattr(dagrun.state, "value", dagrun.state))


def _airflow_db(home: Path) -> Any:
    return create_engine(f"sqlite:///{home / 'airflow' / 'airflow.db'}")


def _task_states(home: Path, run_id: str) -> dict[str, str]:
    with _airflow_db(home).connect() as conn:
        return {t: s for t, s in conn.execute(text(
            "SELECT task_id, state FROM task_instance WHERE dag_id = 'leadsync_meta' "
            "AND run_id = :r"), {"r": run_id})}


def _xcom(home: Path, run_id: str, task_id: str, key: str = "return_value") -> Any:
    with _airflow_db(home).connect() as conn:
        value = conn.execute(text(
            "SELECT value FROM xcom WHERE dag_id = 'leadsync_meta' AND run_id = :r "
            "AND task_id = :t AND key = :k"), {"r": run_id, "t": task_id, "k": key}).scalar()
    return json.loads(value) if isinstance(value, str | bytes) else value


def _quarantine(backend: Backend) -> dict[tuple[str, str], dict[str, Any]]:
    from leadsync.state import quarantine

    store = backend.store()
    with store.engine.connect() as conn:
        rows = conn.execute(quarantine.select().where(quarantine.c.destination == "meta"))
        return {(r.lead_id, r.stage): dict(r._mapping) for r in rows}


def _run_counts(backend: Backend, run_id: str) -> dict[str, Any]:
    run = backend.store().get_run(run_id, "meta")
    assert run is not None
    return run


def _insert(backend: Backend, rows: list[dict[str, Any]]) -> None:
    wh, _ = backend.engines()
    with wh.begin() as conn:
        conn.execute(text(
            "INSERT INTO crm_lead_stages (lead_id, stage, event_time, updated_at, email, "
            "country, opted_out) VALUES (:lead_id, :stage, :event_time, :updated_at, :email, "
            "'US', :opted_out)"), [{"email": "someone@example.com", "opted_out": False, **r}
                                   for r in rows])


def test_bad_rows_are_quarantined_the_rest_sent_and_a_fixed_row_follows(
    backend: Backend, home: Path
) -> None:
    from leadsync import demo_data

    wh, _ = backend.engines()
    seeded = demo_data.seed(wh, 80, datetime.now(UTC), broken_rows=True)
    dr = backend.run_dag()
    assert _dag_state(dr) == "success"

    report = _xcom(home, dr.run_id, "check_contract", "contract")
    assert report["passed"] and report["rows"] == seeded
    for rule in ("future_event_time", "bad_currency", "no_match_keys", "duplicate_lead_stage"):
        assert report["quarantined"][rule] >= 2
    assert any(e["rule"] == "duplicate_lead_stage" and e["unexpected"] == 2
               for e in report["failing_expectations"])
    assert report["data_docs"] and Path(report["data_docs"]).is_file()
    assert (home / "data_docs" / "index.html").is_file()

    # Identifier rules are warnings: the rows are sent without the unusable identifier.
    assert report["identifiers_dropped"]["email.bad_email"] >= 2
    assert all(e["severity"] == "critical" for e in report["failing_expectations"])

    entries = _quarantine(backend)
    for key, rule in BROKEN.items():
        assert entries[key]["rule"] == rule and entries[key]["resolved_at"] is None
        assert entries[key]["detail"] and key[0].strip() not in entries[key]["detail"]
    events = {e["event_id"]: e for e in backend.sandbox_events()}
    assert events and not set(events) & {derive_event_id(lead, stage) for lead, stage in BROKEN}
    phone_only = events[derive_event_id("00QXBADEMAIL0001", "qualified")]["event"]["user_data"]
    assert phone_only["ph"] == sha256_hex("16505550142") and "em" not in phone_only
    hashed = events[derive_event_id("00QXHASHEDEMAIL1", "qualified")]["event"]["user_data"]
    assert hashed["em"] == demo_data.HASHED_EMAIL.lower()

    counts = _run_counts(backend, dr.run_id)["counts"]
    assert counts["identifiers_dropped.email.bad_email"] == \
        report["identifiers_dropped"]["email.bad_email"]
    staged = _xcom(home, dr.run_id, "check_contract", "counts")
    assert staged["identifiers_dropped.email.bad_email"] == \
        report["identifiers_dropped"]["email.bad_email"]
    assert counts["checked"] == counts["read"] == seeded
    accounted = sum(counts.get(k, 0) for k in ("delivered", "skipped", "expired",
                                               "quarantined"))
    assert accounted == seeded  # G1: every row is sent, skipped, expired or quarantined
    quarantined_before = backend.store().summary(["meta"])["meta"]["quarantined"]
    assert quarantined_before == counts["quarantined"] >= len(BROKEN)

    # The CRM fixes one currency; the row's updated_at moves, so the next run re-checks it.
    with wh.begin() as conn:
        conn.execute(text("UPDATE crm_lead_stages SET currency = 'USD', updated_at = :t "
                          "WHERE lead_id = '00QXCURRENCY0001'"),
                     {"t": datetime.now(UTC) - timedelta(minutes=3)})
    dr = backend.run_dag()
    assert _dag_state(dr) == "success"
    fixed = derive_event_id("00QXCURRENCY0001", "won")
    events = {e["event_id"]: e for e in backend.sandbox_events()}
    assert fixed in events
    entries = _quarantine(backend)
    assert entries[("00QXCURRENCY0001", "won")]["resolved_at"] is not None
    assert entries[("00QXCURRENCY0002", "won")]["resolved_at"] is None
    assert backend.store().summary(["meta"])["meta"]["quarantined"] == quarantined_before - 1
    assert backend.sandbox_stats()["duplicate_events"] == 0


def _config_with_query(tmp_path: Path, sql: str) -> Path:
    query = tmp_path / "source.sql"
    query.write_text(sql)
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["source"]["query_file"] = str(query)
    path = tmp_path / "leadsync.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_breaker_stops_a_window_missing_a_column(
    backend: Backend, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    backend.seed(30)
    config = _config_with_query(
        tmp_path, "SELECT lead_id, stage, event_time, email, phone FROM crm_lead_stages")
    monkeypatch.setenv("LEADSYNC_CONFIG", str(config))
    capfd.readouterr()
    dr = backend.run_dag()
    assert _dag_state(dr) == "failed"
    states = _task_states(home, dr.run_id)
    assert states["check_contract"] == "failed"
    assert states["push_lane"] == "upstream_failed"
    assert states["commit_watermark"] == "failed"  # red: the run sent nothing

    out, err = capfd.readouterr()
    assert "missing_column: expect_column_to_exist(column=updated_at)" in out + err
    assert "Nothing was staged or sent" in out + err

    store = backend.store()
    assert backend.sandbox_stats()["events_received"] == 0
    assert store.get_watermark("meta") is None
    assert store.lease_holder("meta") is None
    assert store.ledger_rows("meta") == []
    assert store.get_run(dr.run_id, "meta")["status"] == "contract_failed"


def test_breaker_over_the_threshold_then_the_upstream_fix(backend: Backend, home: Path) -> None:
    seeded = backend.seed(20)
    now = datetime.now(UTC)
    bad = [{"lead_id": f"FUT-{i:03d}", "stage": "lead", "event_time": now + timedelta(days=1),
            "updated_at": now - timedelta(minutes=20)} for i in range(seeded // 2)]
    _insert(backend, bad)
    dr = backend.run_dag()
    assert _dag_state(dr) == "failed"
    assert _task_states(home, dr.run_id)["check_contract"] == "failed"
    store = backend.store()
    assert backend.sandbox_stats()["events_received"] == 0
    assert store.get_watermark("meta") is None and store.ledger_rows("meta") == []
    assert store.lease_holder("meta") is None
    run = store.get_run(dr.run_id, "meta")
    assert run["status"] == "contract_failed"
    assert run["counts"]["quarantined.future_event_time"] == len(bad)
    assert store.summary(["meta"])["meta"]["quarantined"] == len(bad)

    # Upstream fixes the time zone bug: the rows change, the next run sends everything.
    wh, _ = backend.engines()
    with wh.begin() as conn:
        conn.execute(text("UPDATE crm_lead_stages SET event_time = :e, updated_at = :u "
                          "WHERE lead_id LIKE 'FUT-%'"),
                     {"e": now - timedelta(hours=1), "u": now - timedelta(minutes=3)})
    dr = backend.run_dag()
    assert _dag_state(dr) == "success"
    sent = {e["event_id"] for e in backend.sandbox_events()}
    assert {derive_event_id(r["lead_id"], "lead") for r in bad} <= sent
    assert store.summary(["meta"])["meta"]["quarantined"] == 0
    assert store.get_watermark("meta") is not None


def test_render_applies_the_contract(monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from leadsync import cli

    now = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    base = {"stage": "won", "event_time": "2026-03-02T11:00:00Z",
            "updated_at": "2026-03-02T11:30:00Z", "email": "anna@example.com"}
    lines = [
        {**base, "lead_id": "ok"},
        {**base, "lead_id": "future", "event_time": "2026-03-05T11:00:00Z"},
        {**base, "lead_id": "money", "value": 10, "currency": "US$"},
        {**base, "lead_id": "nokeys", "email": None},
    ]
    monkeypatch.delenv("AIRFLOW_CONN_LEADSYNC_META", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(json.dumps(x) for x in lines)))
    assert cli.main(["render", "--destination", "meta", "--now", now.isoformat()]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    reasons = {o["skipped"]["lead_id"]: o["skipped"]["reason"] for o in out if "skipped" in o}
    assert reasons == {"future": "future_event_time", "money": "bad_currency",
                       "nokeys": "no_match_keys"}
    assert sum(len(o["body"]["data"]) for o in out if "body" in o) == 1


def test_dag_files_do_not_import_great_expectations() -> None:
    code = (
        "import runpy, sys\n"
        f"runpy.run_path({str(ROOT / 'dags' / 'leadsync_sync.py')!r})\n"
        "heavy = sorted(m for m in ('great_expectations', 'pandas') if m in sys.modules)\n"
        "print(','.join(heavy) or 'none')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ), timeout=300, check=True)
    assert "great_expectations" not in result.stdout.strip().splitlines()[-1]

"""DagBag integrity: the DAG folder parses, with no I/O and no heavy imports at parse time."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Parses the DAG folder in a fresh interpreter with connection and variable look-ups and
# network sockets made to fail, then reports what parsing imported.
_PROBE = textwrap.dedent(
    """
    import json, socket, sys
    import airflow.sdk
    from airflow.sdk import BaseHook, Variable

    def _boom(*a, **k):
        raise RuntimeError("I/O at DAG parse time")

    BaseHook.get_connection = classmethod(_boom)
    Variable.get = staticmethod(_boom)
    socket.socket.connect = _boom
    before = set(sys.modules)
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=sys.argv[1])
    new = sorted(set(sys.modules) - before)
    print(json.dumps({
        "errors": {k: str(v) for k, v in bag.import_errors.items()},
        "dags": {d: {"tasks": [t.task_id for t in bag.dags[d].tasks],
                     "max_active_runs": bag.dags[d].max_active_runs,
                     "tags": sorted(bag.dags[d].tags),
                     "doc_md": bool(bag.dags[d].doc_md),
                     "timetable": type(bag.dags[d].timetable).__name__,
                     "pools": sorted({t.pool for t in bag.dags[d].tasks}),
                     "retries": sorted({t.retries for t in bag.dags[d].tasks})}
                 for d in bag.dag_ids},
        "heavy": [m for m in new if m.split(".")[0] in
                  ("great_expectations", "pandas", "requests", "phonenumbers", "psycopg2")],
    }))
    """
)


@pytest.fixture(scope="module")
def parsed() -> dict:
    import json
    import os

    proc = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT / "dags")],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_import_errors(parsed: dict) -> None:
    assert parsed["errors"] == {}


def test_one_dag_per_configured_destination(parsed: dict) -> None:
    from leadsync.config import load_config

    expected = {d.dag_id for d in load_config().destinations if d.enabled}
    assert expected <= set(parsed["dags"])


def test_dag_shape(parsed: dict) -> None:
    from leadsync.config import load_config

    for dest in load_config().destinations:
        dag = parsed["dags"][dest.dag_id]
        assert dag["max_active_runs"] == 1
        assert dag["doc_md"]
        assert "leadsync" in dag["tags"]
        assert dag["timetable"] == "CronTriggerTimetable"
        assert dag["pools"] == [dest.pool]
        assert min(dag["retries"]) >= 1
        for task in ("open_run", "check_contract", "push_lane", "commit_watermark"):
            assert task in dag["tasks"]
        # Checking and staging are one task instance (a task costs a process start and
        # scheduling round trips on every run).
        assert "stage_events" not in dag["tasks"]


def test_parsing_does_no_heavy_imports(parsed: dict) -> None:
    assert parsed["heavy"] == []

"""Shared fixtures: an isolated LEADSYNC_HOME/AIRFLOW_HOME, Postgres databases, the sandbox.

Environment is set before anything imports Airflow, so the whole session uses a private
Airflow metadata database under a temporary directory.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
_HOME = Path(tempfile.mkdtemp(prefix="leadsync-test-"))
os.environ["LEADSYNC_HOME"] = str(_HOME)
os.environ["AIRFLOW_HOME"] = str(_HOME / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ.pop("LEADSYNC_CONFIG", None)
for _key in list(os.environ):
    if _key.startswith("AIRFLOW_CONN_LEADSYNC"):
        del os.environ[_key]

PG_ADMIN_URL = os.environ.get(
    "LEADSYNC_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() == "true"


def _pg_reachable() -> str | None:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"


def require_postgres() -> None:
    """Skips (or, in CI, fails) when the Postgres server cannot be reached."""
    problem = _pg_reachable()
    if problem:
        message = f"PostgreSQL at {PG_ADMIN_URL} is unreachable ({problem})"
        if IN_CI:
            pytest.fail(message + " — CI requires it", pytrace=False)
        pytest.skip(message)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty Postgres database for one test (dropped afterwards)."""
    require_postgres()
    from sqlalchemy import create_engine, text

    name = f"leadsync_t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
            ), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_session_url() -> Iterator[str]:
    """One Postgres database for the whole session (see ``pg_empty_url``)."""
    require_postgres()
    from sqlalchemy import create_engine, text

    name = f"leadsync_s_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
            ), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture
def pg_empty_url(pg_session_url: str) -> str:
    """An empty Postgres database for one test, like ``pg_url`` but ~10x cheaper: the session
    database with other connections closed and its ``public`` schema recreated."""
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_session_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ))
            conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()
    return pg_session_url


@pytest.fixture
def home() -> Path:
    """The session's LEADSYNC_HOME."""
    return _HOME


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--schedules", type=int, default=int(os.environ.get(
        "LEADSYNC_SCHEDULES", "200")), help="random fault schedules for the fault-injection suite")
    parser.addoption("--schedule-seed", type=int, default=int(os.environ.get(
        "LEADSYNC_SCHEDULE_SEED", "20261126")), help="base seed of the fault schedules")


# What `make test` runs at a smaller scale than the separate make targets, by the test that
# stands for it (a node id's beginning).
_SOAK_TEST = "tests/integration/test_faults.py::test_random_fault_schedules"
_FUZZ_TEST = "tests/integration/test_fuzz.py::test_hostile_rows_each_end_in_one_outcome"
_RENDER_TEST = "tests/integration/test_fuzz.py::test_render_on_fuzzed_lines"
_BENCH_TESTS = ("tests/unit/test_bench", "tests/integration/test_bench_dag.py",
                "tests/cluster/test_bench_scheduler.py")


def left_out(ran: set[str], schedules: int, fuzz: tuple[int, int, int] | None) -> list[str]:
    """Lines that say what this run left to ``make soak``, ``make fuzz`` and ``make bench``,
    given the node ids that ran, the fault schedules and the fuzz scale (rows, seeds, render
    lines) in effect."""

    def any_ran(*prefixes: str) -> bool:
        return any(node.startswith(prefixes) for node in ran)

    here = f"{schedules:,} here" if any_ran(_SOAK_TEST) else "none here"
    lines = [f"make soak: 1,000 random crash/fault schedules on SQLite ({here})"]
    parts = []
    if fuzz is not None:
        rows, seeds, render = fuzz
        if any_ran(_FUZZ_TEST):
            parts.append(f"{rows:,} rows x {seeds} seed{'s' if seeds != 1 else ''} per backend")
        if any_ran(_RENDER_TEST):
            parts.append(f"{render:,} render lines")
    here = " and ".join(parts) + " here" if parts else "none here"
    lines.append("make fuzz: 10,000 hostile rows x 2 seeds per backend and 10,000 render "
                 f"lines ({here})")
    here = ("each run here on a few thousand rows, to check that it works, without figures"
            if any_ran(*_BENCH_TESTS) else "none here")
    lines.append(f"make bench: the benchmarks at 200,000-1,000,000 rows, with their figures "
                 f"({here})")
    return lines


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    ran = {report.nodeid for key in ("passed", "failed", "error")
           for report in terminalreporter.stats.get(key, []) if hasattr(report, "nodeid")}
    fuzz_module = sys.modules.get("tests.integration.test_fuzz")
    fuzz = None if fuzz_module is None else (
        fuzz_module.ROWS, fuzz_module.SEEDS, fuzz_module.RENDER_LINES)
    terminalreporter.section("left to separate make targets (larger runs)")
    for line in left_out(ran, int(config.getoption("--schedules")), fuzz):
        terminalreporter.write_line(line)

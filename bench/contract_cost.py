"""What the data contract costs per 100k rows, next to hashing + payload building.

Run it::

    .venv/bin/python bench/contract_cost.py                # 100k rows, in memory
    .venv/bin/python bench/contract_cost.py --rows 200000 --repeat 5
    .venv/bin/python bench/contract_cost.py --e2e           # + check vs stage on SQLite

or call :func:`contract_cost` (``bench.py`` can load this file with ``runpy``/``importlib``).

What is measured, on the same synthetic rows (``demo_data.generate_rows_fast``), alternating
the two sides ``repeat`` times and keeping the median, so that a busy machine slows both:

- **check**: the contract as ``check_contract`` runs it, minus the warehouse read: rows are
  projected and validated by the Great Expectations suite in batches of
  ``contract.batch_rows``, failures ranked per row. Split into projection and GX.
- **build**: what ``stage`` does per row besides reading: ``plan_row`` (the guard,
  eligibility, identifier normalisation + SHA-256, the platform event) for Meta.

Fixed costs per task (not per row) are reported apart: importing ``great_expectations``, the
first validation (context, suite) and building the Data Docs of a run.

With ``--e2e`` a SQLite warehouse of ``--rows`` rows is seeded and ``Pipeline.check`` is timed:
the one pass over the window (read, the contract, planning, and writing the ledger and the
outbox batches), per 100k rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "include") not in sys.path:
    sys.path.insert(0, str(ROOT / "include"))

from leadsync import quality  # noqa: E402
from leadsync.config import Config, get_config  # noqa: E402
from leadsync.demo_data import generate_rows_fast  # noqa: E402
from leadsync.destinations import get_destination  # noqa: E402
from leadsync.pipeline import plan_row  # noqa: E402


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _config() -> Config:
    config = get_config()
    return config.model_copy(update={"contract": config.contract.model_copy(
        update={"data_docs": False})})


def contract_cost(n_rows: int = 100_000, repeat: int = 3, e2e: bool = False) -> dict[str, Any]:
    """Seconds per 100k rows of the contract check and of hashing + building, and the ratio.

    Args:
        n_rows: Rows to run through both sides (the result is scaled to 100k).
        repeat: Alternating rounds; the median of each side is kept.
        e2e: Also time ``Pipeline.check`` against ``Pipeline.stage`` on a SQLite warehouse.

    Returns:
        A JSON-serialisable dict (seconds; ``per_100k`` scaled from ``n_rows``).
    """
    now = datetime.now(UTC)
    config = _config()
    dest = config.destination("meta")
    module = get_destination(dest.type)
    rows = list(generate_rows_fast(n_rows, now))
    columns = list(rows[0])
    scale = 100_000 / n_rows

    gx_import = _timed(quality.import_gx)
    spec = quality.ContractSpec.from_config(config, dest)

    def check() -> quality.ContractReport:  # as check_contract: chunks of source.chunk_size
        chunk = config.source.chunk_size
        session = quality.ContractSession(spec, "bench", now)
        session.check_columns(columns)
        for at in range(0, n_rows, chunk):
            session.add(rows[at:at + chunk])
        return session.finish()

    def project() -> None:  # the check's own Python work, without GX (chunks as streamed)
        chunk = config.source.chunk_size
        for start in range(0, n_rows, spec.batch_rows):
            batch = quality._Projection(spec, now)
            for at in range(start, min(start + spec.batch_rows, n_rows), chunk):
                part = rows[at:at + chunk]
                batch.extend(part, [1] * len(part), [None] * len(part), at,
                             [True] * len(part))
            batch.columns()

    def build() -> None:
        for row in rows:
            plan_row(row, dest, module, now)

    def check_small() -> None:  # the per-run part of the check: suite, structure, 1 batch
        session = quality.ContractSession(spec, "bench", now)
        session.check_columns(columns)
        session.add(rows[:1000])
        session.finish()

    first_validation = _timed(lambda: quality.check_rows(rows[:1000], config, dest, now))
    report = check()
    checks, smalls, projections, builds = [], [], [], []
    for _ in range(repeat):
        checks.append(_timed(check))
        smalls.append(_timed(check_small))
        projections.append(_timed(project))
        builds.append(_timed(build))
    check_s, small_s, project_s, build_s = (
        statistics.median(x) for x in (checks, smalls, projections, builds))

    with tempfile.TemporaryDirectory() as docs:
        docs_spec = quality.ContractSpec(**{**spec.__dict__, "data_docs_dir": Path(docs)})
        session = quality.ContractSession(docs_spec, "bench", now)
        session.check_columns(columns)
        session.add(rows[:1000])
        session.flush()
        docs_s = _timed(session.finish)

    result: dict[str, Any] = {
        "rows": n_rows,
        "batch_rows": spec.batch_rows,
        "expectations": len(spec.structure_checks()) + len(spec.row_checks()),
        "failing_rows": report.failing_rows,
        "per_100k": {
            "check_s": round(check_s * scale, 3),
            "check_projection_s": round(project_s * scale, 3),
            "check_gx_validation_s": round((check_s - project_s) * scale, 3),
            "hash_and_build_s": round(build_s * scale, 3),
            "check_over_hash_and_build": round(check_s / build_s, 3),
            "check_per_row_part_s": round((check_s - small_s) * 100_000 / (n_rows - 1000), 3),
        },
        "fixed_per_task_s": {
            "check_of_1000_rows": round(small_s, 3),
            "import_great_expectations": round(gx_import, 3),
            "first_validation_1000_rows": round(first_validation, 3),
            "data_docs_build": round(docs_s, 3),
        },
    }
    if e2e:
        result["e2e_sqlite"] = _e2e(n_rows, now)
    return result


def _e2e(n_rows: int, now: datetime) -> dict[str, Any]:
    """``Pipeline.check`` (the whole pass) on an embedded warehouse of ``n_rows``."""
    from leadsync import demo_data
    from leadsync.db import make_engine
    from leadsync.pipeline import Pipeline
    from leadsync.state import StateStore

    with tempfile.TemporaryDirectory() as tmp:
        warehouse = make_engine(f"sqlite:///{tmp}/warehouse.db")
        demo_data.create_schema(warehouse)
        demo_data._load(warehouse, generate_rows_fast(n_rows, now), only_if_empty=False)
        store = StateStore(make_engine(f"sqlite:///{tmp}/state.db"))
        config = _config()
        pipeline = Pipeline(config, config.destination("meta"), store, warehouse)
        pipeline.open_run("bench")
        check_s = _timed(lambda: pipeline.check("bench"))
        staged = pipeline.stage("bench")
        store.engine.dispose()
        warehouse.dispose()
        return {"check_s_per_100k": round(check_s * 100_000 / n_rows, 3),
                "batches_staged": len(staged["batch_ids"])}


def main(argv: list[str] | None = None) -> int:
    """``python bench/contract_cost.py [--rows N] [--repeat K] [--e2e]``: prints JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--e2e", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(contract_cost(args.rows, args.repeat, args.e2e), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

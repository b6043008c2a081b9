"""Warehouse extraction on SQLite and Postgres: keyset paging, windows, timestamps, errors,
streaming memory."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    text,
)

from leadsync.db import make_engine
from leadsync.source import Source, SourceError, Window, plan_window, to_utc
from leadsync.state import Cursor

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
FAR = datetime(2030, 1, 1, tzinfo=UTC)
QUERY = "SELECT lead_id, stage, event_time, updated_at, email FROM leads"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgres":
        url = str(request.getfixturevalue("pg_empty_url"))
    else:
        url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _table() -> Table:
    return Table("leads", MetaData(),
                 Column("lead_id", String(32), primary_key=True),
                 Column("stage", String(32), primary_key=True),
                 Column("event_time", DateTime(timezone=True)),
                 Column("updated_at", DateTime(timezone=True)),
                 Column("email", String(64)))


def load(engine: Engine, rows: list[dict[str, Any]]) -> None:
    table = _table()
    table.metadata.create_all(engine)
    if rows:
        with engine.begin() as conn:
            conn.execute(insert(table), rows)


def row(lead: str, stage: str, minutes: float) -> dict[str, Any]:
    ts = T0 + timedelta(minutes=minutes)
    return {"lead_id": lead, "stage": stage, "event_time": ts - timedelta(minutes=1),
            "updated_at": ts, "email": f"{lead}@example.com"}


def tied_rows() -> list[dict[str, Any]]:
    """40 rows over 4 timestamps (10 ties each), some leads with two stages, shuffled."""
    rows = []
    for i in range(30):
        rows.append(row(f"L{i:02d}", "lead", (i % 4) * 10))
    for i in range(0, 30, 3):
        rows.append(row(f"L{i:02d}", "won", (i % 4) * 10))
    random.Random(5).shuffle(rows)
    return rows


def key(r: dict[str, Any]) -> tuple[datetime, str, str]:
    return (to_utc(r["updated_at"]), r["lead_id"], r["stage"])  # type: ignore[return-value]


def read(source: Source, window: Window) -> tuple[list[dict[str, Any]], list[int]]:
    rows: list[dict[str, Any]] = []
    sizes: list[int] = []
    for chunk in source.stream(window):
        sizes.append(len(chunk))
        rows.extend(chunk)
    return rows, sizes


# -- keyset paging --------------------------------------------------------------------------


def test_keyset_paging_returns_every_row_once_in_cursor_order(engine: Engine) -> None:
    rows = tied_rows()
    load(engine, rows)
    source = Source(engine, QUERY, chunk_size=3, page_size=7)

    got, sizes = read(source, Window(None, FAR))

    assert [(r["lead_id"], r["stage"]) for r in got] == [
        (r["lead_id"], r["stage"]) for r in sorted(rows, key=key)]
    assert len({(r["lead_id"], r["stage"]) for r in got}) == len(rows) == 40
    # Pages of 7 rows, streamed in chunks of at most 3: 5 full pages, then the last 5 rows.
    assert sizes == [3, 3, 1] * 5 + [3, 2]
    # Every row carries its cursor, in increasing order.
    cursors = [r["_cursor"] for r in got]
    assert all(isinstance(c, Cursor) for c in cursors)
    assert [(c.ts, c.lead_id, c.stage) for c in cursors] == sorted(key(r) for r in rows)
    assert all("_ls_ts" not in r for r in got)


@pytest.mark.parametrize(("chunk_size", "page_size"), [(1, 1), (2, 3), (10, 10), (50, 1000)])
def test_paging_is_exact_for_any_page_and_chunk_size(
    engine: Engine, chunk_size: int, page_size: int
) -> None:
    rows = tied_rows()
    load(engine, rows)
    got, sizes = read(Source(engine, QUERY, chunk_size=chunk_size, page_size=page_size),
                      Window(None, FAR))
    assert [key(r) for r in got] == sorted(key(r) for r in rows)
    assert max(sizes) <= chunk_size


def test_resume_strictly_after_an_exact_cursor(engine: Engine) -> None:
    rows = tied_rows()
    load(engine, rows)
    ordered = sorted(rows, key=key)
    source = Source(engine, QUERY, chunk_size=3, page_size=7)
    first, _ = read(source, Window(None, FAR))

    for cut in (0, 12, 13, 25, 39):  # inside runs of ties and at their edges
        after, _ = read(source, Window(first[cut]["_cursor"], FAR))
        assert [key(r) for r in after] == [key(r) for r in ordered[cut + 1:]]


def test_empty_source_yields_nothing(engine: Engine) -> None:
    load(engine, [])
    assert read(Source(engine, QUERY, chunk_size=3, page_size=7), Window(None, FAR)) == ([], [])


def test_integer_lead_ids_page_in_numeric_order(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE int_leads (lead_id INTEGER, stage VARCHAR(10), "
                          "event_time TIMESTAMP, updated_at TIMESTAMP)"))
        conn.execute(text("INSERT INTO int_leads VALUES (:l, 'lead', :t, :t)"),
                     [{"l": n, "t": datetime(2025, 6, 1, 12, 0)} for n in (10, 9, 100, 2, 1000)])
    got, _ = read(Source(engine, "SELECT * FROM int_leads", chunk_size=1, page_size=2),
                  Window(None, FAR))
    assert [r["lead_id"] for r in got] == [2, 9, 10, 100, 1000]
    assert got[-1]["_cursor"].lead_id == 1000


# -- windows --------------------------------------------------------------------------------


def test_plan_window_first_run() -> None:
    window = plan_window(None, T0, timedelta(hours=2), timedelta(minutes=2))
    assert window == Window(None, T0 - timedelta(minutes=2))


def test_plan_window_with_lookback_drops_the_tie_breakers() -> None:
    watermark = Cursor(T0, "L07", "won")
    window = plan_window(watermark, T0 + timedelta(hours=1), timedelta(hours=2),
                         timedelta(minutes=2))
    assert window.lo == Cursor(T0 - timedelta(hours=2), None, "")
    assert window.hi == T0 + timedelta(hours=1) - timedelta(minutes=2)


def test_plan_window_without_lookback_is_an_exact_keyset_bound() -> None:
    watermark = Cursor(T0, "L07", "won")
    window = plan_window(watermark, T0 + timedelta(hours=1), timedelta(0), timedelta(0))
    assert window == Window(watermark, T0 + timedelta(hours=1))


def test_lookback_window_rereads_rows_behind_the_watermark(engine: Engine) -> None:
    rows = [row("A", "lead", -180), row("B", "lead", -90), row("C", "lead", 0),
            row("D", "lead", 0), row("E", "lead", 30)]
    load(engine, rows)
    source = Source(engine, QUERY, chunk_size=2, page_size=3)
    watermark = Cursor(T0, "D", "lead")

    lookback = plan_window(watermark, T0 + timedelta(hours=1), timedelta(hours=2), timedelta(0))
    got, _ = read(source, lookback)
    # Everything from the watermark's time minus 2 h, including ties before the watermark row.
    assert [r["lead_id"] for r in got] == ["B", "C", "D", "E"]

    exact = plan_window(watermark, T0 + timedelta(hours=1), timedelta(0), timedelta(0))
    got, _ = read(source, exact)
    assert [r["lead_id"] for r in got] == ["E"]


def test_settle_lag_upper_bound_excludes_recent_rows(engine: Engine) -> None:
    now = T0 + timedelta(minutes=60)
    rows = [row("OLD", "lead", 0), row("EDGE", "lead", 58), row("NEW", "lead", 59),
            row("NEWER", "lead", 59.99)]
    load(engine, rows)
    window = plan_window(None, now, timedelta(hours=2), timedelta(minutes=2))

    got, _ = read(Source(engine, QUERY), window)

    assert window.hi == T0 + timedelta(minutes=58)
    assert [r["lead_id"] for r in got] == ["OLD", "EDGE"]  # hi is inclusive


def test_sqlite_timestamps_in_different_spellings_compare_correctly(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    spellings = [
        ("A", "2025-06-01T11:59:59Z"),
        ("B", "2025-06-01 12:00:00"),
        ("C", "2025-06-01T12:00:00.000+00:00"),
        ("D", "2025-06-01T14:00:00.250+02:00"),  # 12:00:00.250 UTC
        ("E", "2025-06-01 12:00:00.500000"),
        ("F", "2025-06-01T12:00:01Z"),
        ("G", "2025-06-01T13:00:00+00:00"),
        ("H", "2025-06-01T07:30:00-05:00"),  # 12:30 UTC
    ]
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE leads (lead_id TEXT, stage TEXT, event_time TEXT, "
                          "updated_at TEXT, email TEXT)"))
        conn.execute(text("INSERT INTO leads VALUES (:l, 'lead', :t, :t, NULL)"),
                     [{"l": lead, "t": ts} for lead, ts in spellings])
    source = Source(engine, QUERY, chunk_size=2, page_size=3)

    got, _ = read(source, Window(None, datetime(2025, 6, 1, 12, 0, 0, 500000, tzinfo=UTC)))
    assert [r["lead_id"] for r in got] == ["A", "B", "C", "D", "E"]
    assert got[3]["_cursor"].ts == datetime(2025, 6, 1, 12, 0, 0, 250000, tzinfo=UTC)

    got, _ = read(source, Window(None, FAR))
    assert [r["lead_id"] for r in got] == ["A", "B", "C", "D", "E", "F", "H", "G"]

    # Resuming after B (same instant as C, spelled differently) is exact.
    got, _ = read(source, Window(Cursor(datetime(2025, 6, 1, 12, 0, tzinfo=UTC), "B", "lead"),
                                 FAR))
    assert [r["lead_id"] for r in got] == ["C", "D", "E", "F", "H", "G"]
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_postgres_naive_timestamps_with_a_non_utc_server_time_zone(pg_empty_url: str) -> None:
    """A `timestamp without time zone` cursor column is read as UTC whatever the server's
    time zone: the window bound is right and paging terminates (it used to loop forever)."""
    database = pg_empty_url.rsplit("/", 1)[1]
    admin = create_engine(pg_empty_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{database}" SET timezone TO \'America/New_York\''))
        conn.execute(text("CREATE TABLE leads (lead_id TEXT, stage TEXT, event_time TIMESTAMP, "
                          "updated_at TIMESTAMP, email TEXT)"))
        conn.execute(text("INSERT INTO leads VALUES (:l, 'lead', :t, :t, NULL)"),
                     [{"l": f"L{i:02d}", "t": datetime(2025, 6, 1, 12) + timedelta(minutes=30 * i)}
                      for i in range(20)])
    engine = make_engine(pg_empty_url)
    raw = create_engine(pg_empty_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW timezone")).scalar() == "UTC"
        source = Source(engine, QUERY, chunk_size=3, page_size=4)
        got, _ = read(source, Window(None, FAR))
        assert [r["lead_id"] for r in got] == [f"L{i:02d}" for i in range(20)]
        assert got[0]["_cursor"].ts == datetime(2025, 6, 1, 12, tzinfo=UTC)

        got, _ = read(source, Window(None, datetime(2025, 6, 1, 14, tzinfo=UTC)))
        assert [r["lead_id"] for r in got] == ["L00", "L01", "L02", "L03", "L04"]

        # An engine that does not pin the session to UTC gets inconsistent comparisons: the
        # source must fail loudly instead of re-reading the same page forever.
        with raw.connect() as conn:
            assert conn.execute(text("SHOW timezone")).scalar() == "America/New_York"
        with pytest.raises(SourceError, match="no progress"):
            read(Source(raw, QUERY, chunk_size=3, page_size=4), Window(None, FAR))
    finally:
        engine.dispose()
        raw.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" RESET timezone'))
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("column_type", ["uuid", "numeric", "bigint"])
def test_typed_lead_ids_resume_exactly_from_the_stored_watermark(pg_empty_url: str,
                                                                 column_type: str) -> None:
    """A Postgres uuid/numeric lead_id goes through the state store (JSON) and back into the
    keyset bound: the next run starts strictly after the watermark row."""
    from leadsync.state import StateStore

    engine = make_engine(pg_empty_url)
    value = {"uuid": "gen_random_uuid()", "numeric": "(i * 7919 % 1000)::numeric",
             "bigint": "(i * 7919 % 1000)::bigint"}[column_type]
    try:
        with engine.begin() as conn:
            conn.execute(text(
                f"CREATE TABLE leads AS SELECT {value} AS lead_id, 'lead'::text AS stage, "
                "timestamptz '2025-06-01 12:00+00' + (i % 3) * interval '1 minute' AS event_time,"
                " timestamptz '2025-06-01 12:00+00' + (i % 3) * interval '1 minute' AS updated_at,"
                " NULL::text AS email FROM generate_series(1, 12) AS i"))
        source = Source(engine, QUERY, chunk_size=2, page_size=5)
        first, _ = read(source, Window(None, FAR))
        assert len(first) == 12

        store = StateStore(engine)
        store.migrate()
        store.start_run("r1", "meta", None, FAR, None)
        store.update_run("r1", "meta", window_max=first[6]["_cursor"])
        store.commit_run("r1", "meta", "success")
        watermark = store.get_watermark("meta")
        assert watermark is not None

        resumed, _ = read(source, Window(watermark, FAR))
        assert [str(r["lead_id"]) for r in resumed] == [str(r["lead_id"]) for r in first[7:]]
    finally:
        engine.dispose()


# -- errors ---------------------------------------------------------------------------------


def test_check_columns_returns_the_query_columns(engine: Engine) -> None:
    load(engine, [row("A", "lead", 0)])
    assert Source(engine, QUERY).check_columns() == [
        "lead_id", "stage", "event_time", "updated_at", "email"]


def test_missing_required_columns_are_named(engine: Engine) -> None:
    load(engine, [row("A", "lead", 0)])
    source = Source(engine, "SELECT lead_id, email, stage FROM leads")
    with pytest.raises(SourceError) as info:
        source.check_columns()
    message = str(info.value)
    assert "event_time" in message
    assert "updated_at" in message
    assert "lead_id, email, stage" in message  # what it does return


@pytest.mark.parametrize("query", [
    "SELECT lead_id, stage, event_time, updated_at FROM no_such_table",
    "SELEC lead_id FROM leads",
    "SELECT no_such_column, stage, event_time, updated_at FROM leads",
])
def test_broken_query_is_one_clear_line(engine: Engine, query: str) -> None:
    load(engine, [row("A", "lead", 0)])
    source = Source(engine, query)
    for action in (source.check_columns, lambda: read(source, Window(None, FAR))):
        with pytest.raises(SourceError) as info:
            action()
        message = str(info.value)
        assert message.startswith(("the source query failed:", "reading the source failed:"))
        assert "\n" not in message
        assert "Traceback" not in message
        assert "[SQL:" not in message
        assert len(message) < 400
        assert info.value.__cause__ is None
        assert info.value.__suppress_context__


def test_unreadable_cursor_is_outside_every_window_and_found_by_the_contract(
    tmp_path: Path,
) -> None:
    from leadsync.quality import null_cursor_rows

    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE leads (lead_id TEXT, stage TEXT, event_time TEXT, "
                          "updated_at TEXT, email TEXT)"))
        conn.execute(text("INSERT INTO leads VALUES ('A', 'lead', '2025-06-01', 'garbage', NULL),"
                          " ('B', 'lead', '2025-06-01', NULL, NULL),"
                          " ('C', 'lead', '2025-06-01', '2025-06-01 12:00:00', NULL)"))
    source = Source(engine, QUERY)
    got, _ = read(source, Window(None, FAR))
    assert [r["lead_id"] for r in got] == ["C"]
    # The keyset window cannot see them; the contract's scan reports them instead (G1).
    assert sorted(r["lead_id"] for r in null_cursor_rows(source, 10)) == ["A", "B"]
    engine.dispose()


# -- memory ---------------------------------------------------------------------------------

_GENERATED = {
    # 50,000 rows made by the database itself: nothing is materialised on the client side.
    "sqlite": """
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000)
        SELECT printf('L%06d', i) AS lead_id, 'lead' AS stage,
               datetime('2025-06-01 00:00:00', '+' || i || ' seconds') AS event_time,
               datetime('2025-06-01 00:00:00', '+' || i || ' seconds') AS updated_at,
               'person' || i || '@example.com' AS email
        FROM n""",
    "postgresql": """
        SELECT 'L' || lpad(i::text, 6, '0') AS lead_id, 'lead' AS stage,
               timestamptz '2025-06-01 00:00:00+00' + i * interval '1 second' AS event_time,
               timestamptz '2025-06-01 00:00:00+00' + i * interval '1 second' AS updated_at,
               'person' || i || '@example.com' AS email
        FROM generate_series(1, 50000) AS i""",
}


def test_streaming_does_not_materialise_the_window(engine: Engine) -> None:
    source = Source(engine, _GENERATED[engine.dialect.name], chunk_size=5000)
    sizes: list[int] = []
    first = last = None
    tracemalloc.start()
    try:
        for chunk in source.stream(Window(None, FAR)):
            sizes.append(len(chunk))
            first = first or chunk[0]["lead_id"]
            last = chunk[-1]["lead_id"]
            del chunk  # the consumer keeps nothing
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sizes == [5000] * 10
    assert (first, last) == ("L000001", "L050000")
    # The whole window as row dicts measures ~39 MB; one chunk (plus the driver's buffer)
    # stays well under half of that.
    assert peak < 18_000_000, f"peak {peak / 1e6:.1f} MB: the stream materialises the window"


def test_sqlite_reads_a_window_in_one_query_unless_paged(engine: Engine) -> None:
    # SQLite evaluates the cursor on every row of the table for each page: one query there;
    # 100,000 rows per page elsewhere.
    sqlite = engine.dialect.name == "sqlite"
    assert Source(engine, QUERY).page_size == (2**62 if sqlite else 100_000)
    assert Source(engine, QUERY, chunk_size=3, page_size=7).page_size == 7
    load(engine, tied_rows())
    got, _ = read(Source(engine, QUERY, chunk_size=2), Window(None, FAR))
    paged, _ = read(Source(engine, QUERY, chunk_size=2, page_size=3), Window(None, FAR))
    assert got == paged and got


# -- SQLite: the raw floor under a lower bound ------------------------------------------------

_CENTER = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)


def _spelled(rng: random.Random, utc: datetime) -> Any:
    """One way a warehouse may hold ``utc`` that SQLite's strftime reads (or something near)."""
    offset = timedelta(minutes=rng.randint(-899, 899))  # ±14:59
    local = utc + offset
    sign = "+" if offset >= timedelta(0) else "-"
    mins = abs(int(offset.total_seconds() // 60))
    julian = utc.timestamp() / 86400 + 2440587.5
    forms = [
        utc.strftime("%Y-%m-%d %H:%M:%S"), utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        utc.strftime("%Y-%m-%d  %H:%M"), utc.strftime("%Y-%m-%d"),
        local.strftime("%Y-%m-%d %H:%M:%S") + f"{sign}{mins // 60:02d}:{mins % 60:02d}",
        local.strftime("%Y-%m-%dT%H:%M") + f"{sign}{mins // 60:02d}:{mins % 60:02d}",
        julian, f"{julian:.6f}", f"+{julian:.6f}", f" {julian:.6f}", f"0{julian:.6f}",
        int(utc.timestamp()), utc.strftime("%H:%M"), utc.strftime("%Y-%m-%dt%H:%M"),
    ]
    return rng.choice(forms)


@pytest.mark.parametrize("declared", ["DATETIME", "TEXT", ""])
def test_sqlite_floor_under_a_lower_bound_drops_no_row_of_the_window(
        tmp_path: Path, declared: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every spelling SQLite reads as a time, in a column of NUMERIC, TEXT or no affinity,
    indexed: a window with a lower bound yields exactly what it yields without the floor."""
    from leadsync import source as source_module

    rng = random.Random(9)
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE leads (lead_id TEXT, stage TEXT, event_time TEXT, "
                             f"updated_at {declared}, email TEXT)")
        conn.exec_driver_sql("CREATE INDEX ix_leads_updated ON leads (updated_at)")
        values: list[Any] = [_spelled(rng, _CENTER + timedelta(minutes=rng.randint(-3000, 3000)))
                             for _ in range(600)]
        values += ["now", "1999-01-01 00:00", "abc", None, b"2026-06-15 12:00", "+2461013.5",
                   " 2026-06-15 12:00", "2026-06-15 12:00:00.123456789"]
        conn.exec_driver_sql(
            "INSERT INTO leads VALUES (?, 'lead', '2026-06-01 00:00', ?, NULL)",
            [(f"L{i:04d}", v) for i, v in enumerate(values)])
    source = Source(engine, QUERY, chunk_size=50)

    def ids(window: Window) -> list[Any]:
        got: list[Any] = []
        for item in source.stream(window):
            got += [r["lead_id"] for r in item] if isinstance(item, list) else [repr(item)]
        return got

    lows = [_CENTER + timedelta(minutes=rng.randint(-3200, 3200)) for _ in range(25)]
    for lo in lows:
        for window in (Window(Cursor(lo, None, ""), FAR), Window(Cursor(lo, "L0300", "lead"),
                                                                  FAR)):
            floored = ids(window)
            monkeypatch.setattr(source_module, "_SQLITE_FLOOR", "(1 = 1 OR :lo_day IS NULL)")
            unfloored = ids(window)
            monkeypatch.undo()
            assert floored == unfloored, (declared, lo)
    engine.dispose()


def test_sqlite_floor_is_read_through_an_index_on_updated_at(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    load(engine, [row(f"L{i}", "lead", i) for i in range(10)])
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX ix_leads_updated ON leads (updated_at)")
    source = Source(engine, QUERY)
    lo = Cursor(T0, None, "")
    with engine.connect() as conn:
        plan = " ".join(str(r[-1]) for r in conn.execute(
            text("EXPLAIN QUERY PLAN " + source._sql(lo, False)),
            source._params(Window(lo, FAR), lo, False)))
    assert "ix_leads_updated" in plan, plan
    engine.dispose()

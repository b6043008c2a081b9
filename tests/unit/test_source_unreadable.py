"""Rows the warehouse driver cannot read: each becomes one marker in its place, the window goes
on around it, nothing of its value escapes, and the happy path reads as before."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from leadsync.db import make_engine
from leadsync.source import Source, SourceError, UnreadableRow, Window

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
FAR = datetime(2030, 1, 1, tzinfo=UTC)
QUERY = "SELECT lead_id, stage, event_time, updated_at, first_name FROM leads"
CANARY = "Qzx7Canary"


def read(source: Source, window: Window = Window(None, FAR)) -> list[Any]:
    """Rows and markers in stream order (rows as lead ids, markers as themselves)."""
    out: list[Any] = []
    for item in source.stream(window):
        if isinstance(item, UnreadableRow):
            out.append(item)
        else:
            out.extend(r["lead_id"] for r in item)
    return out


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE leads (lead_id TEXT, stage TEXT, event_time TEXT, "
                          "updated_at TEXT, first_name TEXT)"))
    yield engine
    engine.dispose()


def _insert_sqlite(engine: Engine, n: int, bad: dict[int, tuple[str, bytes]]) -> None:
    """``n`` rows L00.. one minute apart; ``bad[i] = (column, bytes)`` stores invalid UTF-8."""
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        for i in range(n):
            ts = (T0 + timedelta(minutes=i)).strftime("%Y-%m-%d %H:%M:%S")
            values: dict[str, Any] = {"lead_id": f"L{i:02d}", "stage": "lead",
                                      "event_time": ts, "updated_at": ts, "first_name": "Ann"}
            column, payload = bad.get(i, ("", b""))
            cols = list(values)
            marks = ["CAST(? AS TEXT)" if c == column else "?" for c in cols]
            params = [payload if c == column else values[c] for c in cols]
            cur.execute(f"INSERT INTO leads ({', '.join(cols)}) VALUES ({', '.join(marks)})",
                        params)
        raw.commit()
    finally:
        raw.close()


def test_sqlite_undecodable_optional_text_is_one_marker_in_its_place(sqlite: Engine) -> None:
    _insert_sqlite(sqlite, 12, {4: ("first_name", CANARY.encode() + b"\xff")})
    got = read(Source(sqlite, QUERY, chunk_size=3, page_size=5))
    markers = [g for g in got if isinstance(g, UnreadableRow)]
    assert [g if isinstance(g, str) else "X" for g in got] == [
        "L00", "L01", "L02", "L03", "X", "L05", "L06", "L07", "L08", "L09", "L10", "L11"]
    (marker,) = markers
    assert (marker.lead_id, marker.stage, marker.columns) == ("L04", "lead", ("first_name",))
    assert marker.cursor is not None and marker.cursor.ts == T0 + timedelta(minutes=4)
    assert CANARY not in repr(marker) and CANARY not in marker.detail
    assert "first_name" in marker.detail


@pytest.mark.parametrize("position", [0, 4, 5, 11])  # first row, page end, page start, last
def test_sqlite_undecodable_key_anywhere_keeps_paging_exact(sqlite: Engine,
                                                             position: int) -> None:
    _insert_sqlite(sqlite, 12, {position: ("lead_id", b"L\xff" + f"{position:02d}".encode())})
    got = read(Source(sqlite, QUERY, chunk_size=2, page_size=5))
    assert len(got) == 12  # every row once: none lost, none read twice at a page boundary
    (marker,) = [g for g in got if isinstance(g, UnreadableRow)]
    assert got.index(marker) == position
    assert marker.lead_id == f"L\ufffd{position:02d}" and marker.columns == ("lead_id",)
    marker.lead_id.encode()  # storable text


def test_sqlite_resumes_exactly_after_an_undecodable_watermark(sqlite: Engine) -> None:
    _insert_sqlite(sqlite, 6, {2: ("stage", b"le\xffad")})
    source = Source(sqlite, QUERY, chunk_size=10, page_size=10)
    (marker,) = [g for g in read(source) if isinstance(g, UnreadableRow)]
    assert marker.cursor is not None
    after = read(source, Window(marker.cursor, FAR))
    # The marker's cursor is storable (U+FFFD for the bad byte) and still a bound: rows
    # after it are read, and the rows before it are not.
    assert after[-3:] == ["L03", "L04", "L05"] and "L01" not in after


def test_lenient_reading_does_not_leak_into_the_pool(sqlite: Engine) -> None:
    _insert_sqlite(sqlite, 3, {1: ("first_name", b"\xff")})
    read(Source(sqlite, QUERY))
    with sqlite.connect() as conn:
        assert conn.connection.dbapi_connection.text_factory is str  # type: ignore[union-attr]


def test_happy_path_yields_only_rows(sqlite: Engine) -> None:
    _insert_sqlite(sqlite, 7, {})
    assert read(Source(sqlite, QUERY, chunk_size=2, page_size=3)) == [
        f"L{i:02d}" for i in range(7)]


def test_a_query_that_fails_outright_is_still_one_clean_error(sqlite: Engine) -> None:
    _insert_sqlite(sqlite, 2, {})
    with pytest.raises(SourceError) as info:
        read(Source(sqlite, f"SELECT * FROM leads WHERE first_name = '{CANARY}' AND nope = 1"))
    assert CANARY not in str(info.value) and "[SQL" not in str(info.value)


def _pg_leads(url: str) -> Engine:
    """A Postgres ``leads`` table of nine rows L00..L08, one minute apart."""
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE leads (lead_id text, stage text, event_time timestamptz,"
                          " updated_at timestamptz, value interval)"))
        for i in range(9):
            ts = T0 + timedelta(minutes=i)
            conn.execute(text("INSERT INTO leads VALUES (:l, 'lead', :t, :t, NULL)"),
                         {"l": f"L{i:02d}", "t": ts})
    return engine


@pytest.mark.postgres
@pytest.mark.parametrize(("column", "literal"), [
    ("event_time", "10000-01-01 00:00:00+00"),
    ("event_time", "0044-03-15 00:00:00+00 BC"),
    ("updated_at", "0001-06-01 00:00:00+00 BC"),
    ("value", None),  # interval out of Python's range
])
def test_postgres_values_out_of_pythons_range_are_markers(pg_empty_url: str, column: str,
                                                          literal: str | None) -> None:
    engine = _pg_leads(pg_empty_url)
    with engine.begin() as conn:
        if column == "value":
            conn.execute(text("UPDATE leads SET value = interval '1500000000 days' "
                              "WHERE lead_id = 'L05'"))
        else:
            conn.execute(text(f"UPDATE leads SET {column} = CAST(:v AS timestamptz) "
                              "WHERE lead_id = 'L05'"), {"v": literal})
    query = "SELECT lead_id, stage, event_time, updated_at, value FROM leads"
    got = read(Source(engine, query, chunk_size=2, page_size=4))
    (marker,) = [g for g in got if isinstance(g, UnreadableRow)]
    assert marker.lead_id == "L05" and marker.columns == (column,)
    assert [g for g in got if isinstance(g, str)] == [f"L{i:02d}" for i in range(9) if i != 5]
    if column == "updated_at":
        assert marker.cursor is None and got[0] is marker  # BC sorts first; no place to page
    else:
        assert marker.cursor is not None and got.index(marker) == 5
    # The pool's connections are the strict ones again.
    with engine.connect() as conn, pytest.raises(Exception):
        conn.execute(text("SELECT value, event_time, updated_at FROM leads "
                          "WHERE lead_id = 'L05'")).all()
    engine.dispose()


def test_rows_without_a_cursor_are_found_even_when_unreadable(sqlite: Engine) -> None:
    from leadsync.quality import null_cursor_rows

    _insert_sqlite(sqlite, 3, {1: ("first_name", CANARY.encode() + b"\xff")})
    with sqlite.begin() as conn:
        conn.execute(text("UPDATE leads SET updated_at = NULL WHERE lead_id IN ('L01', 'L02')"))
    rows = null_cursor_rows(Source(sqlite, QUERY), 10)
    assert sorted((r["lead_id"], r["first_name"]) for r in rows) == [("L01", None),
                                                                      ("L02", "Ann")]


def test_marker_keys_are_always_storable_text() -> None:
    from leadsync.source import _safe_text

    assert _safe_text(b"L\xff1".decode("utf-8", "surrogateescape")) == "L\ufffd1"
    assert _safe_text("L\ud83d1") == "L?1"
    assert _safe_text(None) == "" and _safe_text(42) == "42"


@pytest.mark.parametrize(("page", "chunk"), [(11, 5), (5, 2), (12, 12), (1, 1), (None, 4)])
def test_a_page_of_rows_without_a_cursor_does_not_end_the_window(sqlite: Engine, page: int | None,
                                                                  chunk: int) -> None:
    # Twelve rows whose updated_at Python cannot represent (year 0) sort first: pages full of
    # them have no row to resume after. Every row comes once, the three after them included.
    _insert_sqlite(sqlite, 15, {})
    with sqlite.begin() as conn:
        conn.execute(text("UPDATE leads SET updated_at = '0000-01-01 00:00:00' "
                          "WHERE lead_id < 'L12'"))
    got = read(Source(sqlite, QUERY, chunk_size=chunk, page_size=page))
    markers = [g for g in got if isinstance(g, UnreadableRow)]
    assert sorted(m.lead_id for m in markers) == [f"L{i:02d}" for i in range(12)]
    assert all(m.cursor is None for m in markers)
    assert [g for g in got if isinstance(g, str)] == ["L12", "L13", "L14"]


@pytest.mark.postgres
def test_postgres_pages_past_rows_whose_cursor_is_out_of_pythons_range(pg_empty_url: str) -> None:
    engine = _pg_leads(pg_empty_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE leads SET updated_at = CAST('0001-06-01 00:00:00+00 BC' AS "
                          "timestamptz) WHERE lead_id < 'L05'"))
    query = "SELECT lead_id, stage, event_time, updated_at, value FROM leads"
    got = read(Source(engine, query, chunk_size=2, page_size=2))
    markers = [g for g in got if isinstance(g, UnreadableRow)]
    assert sorted(m.lead_id for m in markers) == [f"L{i:02d}" for i in range(5)]
    assert [g for g in got if isinstance(g, str)] == ["L05", "L06", "L07", "L08"]
    engine.dispose()

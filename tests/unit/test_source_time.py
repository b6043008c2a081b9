"""Timestamp reading: the one-call fast path of ISO text and the arithmetic naive → UTC give
exactly what the general reading (strip, 'Z' suffix, fromisoformat, replace/astimezone) gives,
for every spelling; and a SQLite window of odd spellings streams as that reading says."""

from __future__ import annotations

import itertools
import pickle
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from leadsync.db import make_engine
from leadsync.source import (
    Source,
    UnreadableRow,
    Window,
    _iso_spelled,
    _iso_to_utc,
    _naive_as_utc,
    _text_time,
    to_utc,
)

DATES = ["2025-06-01", "20250601", "2025-W22-7", "0001-01-01", "9999-12-31", "0000-01-01",
         "2025-02-30", "2025-06"]
SEPARATORS = ["T", " ", "t", "\u2009", ""]
TIMES = ["12", "12:30", "1230", "12:30:45", "123045", "12:30:45.5", "12:30:45.123",
         "12:30:45.123000", "12:30:45.1234567", "12:30:45,5", "00:00:00", "23:59:59.999999",
         "24:00:00", "12:30:45.", ""]
ZONES = ["", "Z", "z", "+00:00", "-00:00", "+02:00", "-05:30", "+0200", "+02", "+23:59:59.999999",
         "+24:00", "Z+00:00", "+00:00Z", " Z"]
PADS = [("", ""), (" ", ""), ("", " "), ("\t", "\n"), ("", "\x00")]
ODD = ["", " ", "Z", "z", "not a timestamp", "2025-06-01Z", "2025-06-01z", "2025-06-01+00:00",
       "2025-06-01T", "T12:00", "12:00:00", "\udcff2025-06-01 12:00:00",
       "2025-06-01 12:00:00\udcff", "２０２５-06-01 12:00:00", "2025-06-01 12:00:00.000 UTC"]


def _spellings() -> list[str]:
    got = list(ODD)
    for date, sep, time_, zone in itertools.product(DATES, SEPARATORS, TIMES, ZONES):
        got.append(date + (sep + time_ if time_ else "") + zone)
    got += [f"{a}2025-06-01T12:30:45.5{zone}{b}" for a, b in PADS for zone in ZONES]
    return got


def _general(value: str) -> datetime | None:
    """The reading as it was before the fast path: the reference."""
    parsed = _iso_spelled(value)
    if parsed is None:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _outcome(read: Any, value: Any) -> tuple[str, bytes]:
    """What ``read(value)`` gives, to the pickled byte (type, fields, fold, tzinfo), or the
    exception type it raises."""
    try:
        got = read(value)
    except Exception as exc:  # noqa: BLE001 - the type is the outcome
        return "raises", type(exc).__name__.encode()
    return "returns", pickle.dumps(got)


def test_the_fast_iso_path_reads_every_spelling_as_the_general_path() -> None:
    spellings = _spellings()
    assert len(spellings) > 5000
    differ = [s for s in spellings if _outcome(_iso_to_utc, s) != _outcome(_general, s)]
    assert differ == []
    # Both paths are taken often, and the list holds values the reading refuses.
    fast = [s for s in spellings if _outcome(datetime.fromisoformat, s)[0] == "returns"]
    assert len(fast) > 1000
    assert len(spellings) - len(fast) > 1000
    outcomes = [_outcome(_general, s) for s in spellings]
    assert ("raises", b"OverflowError") in outcomes
    assert outcomes.count(("returns", pickle.dumps(None))) > 1000


def test_text_times_are_the_general_reading_or_the_text_itself() -> None:
    for value in _spellings():
        try:
            expected: Any = _general(value)
        except (OverflowError, ValueError):
            expected = None
        assert _outcome(_text_time, value) == _outcome(
            lambda v, e=expected: v if e is None else e, value), value


@pytest.mark.parametrize("naive", [
    datetime.min, datetime.max, datetime(1970, 1, 1), datetime(1969, 12, 31, 23, 59, 59, 999999),
    datetime(2025, 6, 1, 12, 30, 45, 123456), datetime(1, 1, 1, 0, 0, 0, 1),
    datetime(9999, 12, 31, 23, 59, 59),
])
def test_naive_as_utc_is_replace_exactly(naive: datetime) -> None:
    assert pickle.dumps(_naive_as_utc(naive)) == pickle.dumps(naive.replace(tzinfo=UTC))
    assert pickle.dumps(to_utc(naive)) == pickle.dumps(naive.replace(tzinfo=UTC))


def test_to_utc_keeps_the_fold_of_a_naive_datetime() -> None:
    folded = datetime(2025, 10, 26, 1, 30, fold=1)
    assert pickle.dumps(to_utc(folded)) == pickle.dumps(folded.replace(tzinfo=UTC))


# -- the stream over odd spellings (SQLite text) --------------------------------------------

STREAM_TIMES = ["2025-06-01T12:00:00Z", "2025-06-01 12:00:00", "2025-06-01 12:00:00.250000",
                "2025-06-01T14:00:00.5+02:00", "2025-06-01t12:00:01z", " 2025-06-01 12:00:02 ",
                "2025-06-01", "2025-06-01Z", "20250601T120003", "2025-06-01 12:00:04.1234567",
                "9999-12-31T23:59:59-01:00", "0001-01-01T00:30:00+01:00", "0000-01-01 00:00:00",
                "not a timestamp", "2025-06-01 12:00:05.999999", "2025-06-01 12:00:05.999"]


def test_a_sqlite_window_of_odd_spellings_streams_as_the_general_reading(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    rows = [(f"L{i:02d}", stage, event, updated)
            for i, (event, updated) in enumerate(itertools.product(STREAM_TIMES, repeat=2))
            for stage in ("lead", "won")][::3]
    rows.append(("NULL", "lead", "2025-06-01", None))
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE leads (lead_id TEXT, stage TEXT, event_time TEXT, "
                          "updated_at TEXT, email TEXT)"))
        conn.execute(text("INSERT INTO leads VALUES (:l, :s, :e, :u, 'x@example.com')"),
                     [{"l": lead, "s": s, "e": e, "u": u} for lead, s, e, u in rows])
        ordered = conn.execute(text(
            "SELECT lead_id, stage, event_time, updated_at, "
            "strftime('%Y-%m-%d %H:%M:%f', updated_at) AS ls FROM leads "
            "WHERE ls IS NOT NULL ORDER BY ls, lead_id, stage")).all()
    query = "SELECT lead_id, stage, event_time, updated_at, email FROM leads"

    def streamed(page_size: int | None) -> list[Any]:
        got: list[Any] = []
        for item in Source(engine, query, chunk_size=7, page_size=page_size).stream(
                Window(None, datetime(9999, 12, 31, tzinfo=UTC))):
            got.extend(item if isinstance(item, list) else [item])
        for item in got:
            if isinstance(item, dict):
                cur = item["_cursor"]
                item["_cursor"] = (cur.ts, cur.lead_id, cur.stage)
        return got

    def reading(value: str) -> Any:
        try:
            parsed = _general(value)
        except (OverflowError, ValueError):
            return value
        return value if parsed is None else parsed

    expected: list[Any] = []
    for lead, stage, event, updated, ls in ordered:
        ts = _general(ls)
        if ts is None:
            expected.append(UnreadableRow(lead, stage, None, ("updated_at",)))
            continue
        expected.append({"lead_id": lead, "stage": stage, "event_time": reading(event),
                         "updated_at": reading(updated), "email": "x@example.com",
                         "_cursor": (ts, lead, stage)})
    got = streamed(None)
    assert got == expected
    assert streamed(40) == expected  # in pages (fewer rows without a cursor than a page)
    assert repr(got) == repr(expected)  # the same types and time zones, too
    assert len(got) > 50
    assert any(isinstance(item, UnreadableRow) for item in got)  # year 0000
    assert any(isinstance(item, dict) and item["event_time"] == "not a timestamp"
               for item in got)

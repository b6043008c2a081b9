"""Pins the exact output of planning, so that speed work on the per-row path (identity rules,
the destinations' build_event, the guard, coverage names, timestamp parsing) cannot change a byte.

The digests were computed before that work, from seeded rows: clean synthetic ones
(``demo_data.generate_rows_fast``), messy realistic ones (``demo_data.generate_funnel``) and
hostile ones (``tests.fuzz_rows``), planned for every destination type and shape. When a change
is *meant* to alter events, update the digest in the same commit and say why.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from leadsync import demo_data, quality
from leadsync.config import DestinationConfig, get_config
from leadsync.destinations import get_destination
from leadsync.destinations.http import encode_event
from leadsync.identity import GOOGLE_RULES, META_RULES, TIKTOK_RULES, clear_caches, hash_identifiers
from leadsync.monitor.coverage import Coverage
from leadsync.pipeline import Planned, Planner
from leadsync.source import to_utc
from tests import fuzz_rows

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
_ENC = msgspec.json.Encoder(order="sorted")


def _rows() -> list[dict[str, Any]]:
    rows = list(demo_data.generate_rows_fast(300, NOW, seed=11))
    rows += list(demo_data.generate_funnel(200, NOW, seed=12))
    rows += [r.values for r in fuzz_rows.generate(13, 300, "postgres", now=NOW).rows]
    rows += [r.values for r in fuzz_rows.generate(14, 300, "sqlite", now=NOW).rows]
    # The same rows as SQLite's source hands them over: timestamps as text.
    for row in list(demo_data.generate_funnel(60, NOW, seed=15)):
        row = dict(row)
        for column in ("event_time", "updated_at"):
            value = row[column]
            if isinstance(value, datetime):
                row[column] = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        rows.append(row)
    return rows


def _destinations() -> list[DestinationConfig]:
    dests = list(get_config().destinations)
    extra: list[DestinationConfig] = []
    for dest in dests:
        if dest.type in ("meta", "tiktok", "snapchat"):
            extra.append(dest.model_copy(update={"shape": "website"}))
    extra.append(DestinationConfig(
        name="google_ads", type="google_ads", customer_id="1234567890",
        stages={"lead": "1000000001", "qualified": "1000000002", "won": "1000000004"}))
    return dests + extra


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal | bytes | timedelta):
        return repr(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    return repr(value)


def _plan_lines(dest: DestinationConfig, rows: list[dict[str, Any]]) -> Iterator[bytes]:
    module = get_destination(dest.type)
    planner = Planner(dest, module, NOW)
    coverage = Coverage(dest.type)
    for row in rows:
        plan = planner.plan(row)
        if isinstance(plan, Planned):
            yield b"P" + encode_event(plan.body) + plan.event_id.encode() + \
                plan.event_name.encode() + plan.event_time.isoformat().encode()
            yield b"C" + ",".join(sorted(coverage.names(plan.body))).encode()
        else:
            yield b"R" + msgspec.json.encode(plan, enc_hook=_default)


def _digest(lines: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line)
        h.update(b"\n")
    return h.hexdigest()


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return _rows()


def test_the_pinned_rows_are_varied(rows: list[dict[str, Any]]) -> None:
    assert len(rows) > 1000
    kinds = {type(r.get("event_time")) for r in rows}
    assert {datetime, str} <= kinds


# What planning gave before the per-row speed work (recompute with _digest(_plan_lines(...))).
PLAN_DIGESTS = {
    "meta/crm": "e55f9364f560de0ef73a12d99ee0c63a6be1fe8e3f258f17751e87a986df2f6a",
    "tiktok/crm": "999b1ad5c5cb0f98dd538004c69e72cdc1433b7abb88aba0001dd73a8c80f3db",
    "google_datamanager/crm": "4e0cac294084cc531e060adf0f75768a672d5201dc4fc526c3abc54dfe92135e",
    "linkedin/crm": "90382e8c8e6a182e3222e61bf3ee1f8c915d2ba836d134eab4ddfebfbc1f54b6",
    "snapchat/crm": "3912fbd44d298f127c4d9b8e53aab0710222ce6f3260a1ceba6de5d189b2f85c",
    "pinterest/crm": "978e1b93d06dfe1d0a543a4e47bfabaea24814e105850cf5b47e1029efea323e",
    "reddit/crm": "139780aa54a52dbe3d6d79196b91c074140a95bebd8ebdcb9fa5c50babd44160",
    "meta/website": "ad870589f5e2018b245a5cf494d9338c27533008a2797576c9f4c555059fb5f7",
    "tiktok/website": "150c27df7deaa6550498e9fcee84694667cf6f2088653589cb85cf2891e9a3c6",
    "snapchat/website": "baf199e9138a9d4ef719682dff7437f25592e2d1d3c2ea10b79a2618056dd8e2",
    "google_ads/crm": "66f0a690697cb0c65a17d992bc390c1a15055a969997f7e6ad4293a8b416f874",
}


@pytest.mark.parametrize("index", range(11))
def test_planning_is_byte_for_byte_unchanged(rows: list[dict[str, Any]], index: int) -> None:
    dest = _destinations()[index]
    key = f"{dest.type}/{dest.shape}"
    for memo_state in ("cold", "warm"):  # memoised rules must give what they computed
        if memo_state == "cold":
            clear_caches()
        assert _digest(_plan_lines(dest, rows)) == PLAN_DIGESTS[key], (key, memo_state)


def _identity_lines(rows: list[dict[str, Any]]) -> Iterator[bytes]:
    for row in rows:
        for rules in (META_RULES, TIKTOK_RULES, GOOGLE_RULES):
            yield _ENC.encode(hash_identifiers(row, rules))


IDENTITY_DIGEST = "9a11a1b9bd4038a36160ae761b6dc3af8a5e62213d7483e6ad53eb9f243e38cd"


def test_identifiers_are_byte_for_byte_unchanged(rows: list[dict[str, Any]]) -> None:
    clear_caches()
    assert _digest(_identity_lines(rows)) == IDENTITY_DIGEST


def _guard_lines(rows: list[dict[str, Any]]) -> Iterator[bytes]:
    for row in rows:
        for tolerance in (timedelta(seconds=60), timedelta(0)):
            yield msgspec.json.encode(quality.guard_row(row, NOW, tolerance), enc_hook=_default)


GUARD_DIGEST = "7b20fd9924ab223f47feed8388ed14c2c654fcf1946f6a26644855afff77ba74"


def test_guard_is_byte_for_byte_unchanged(rows: list[dict[str, Any]]) -> None:
    assert _digest(_guard_lines(rows)) == GUARD_DIGEST


_TIMES: list[Any] = [
    None, "", "  ", "2026-11-26", "2026-11-26 09:05:07", "2026-11-26 09:05:07.123",
    "2026-11-26T09:05:07Z", "2026-11-26T09:05:07z", "2026-11-26T09:05:07+02:00",
    "2026-11-26T09:05:07.5-05:30", " 2026-11-26T09:05:07 ", "2026-13-01", "garbage",
    "0001-01-01T00:00+14:00", "9999-12-31T23:59:59-10:00", "2026-11-26 09:05:07.123456",
    "20261126T090507", "2026-W48-4", date(2026, 1, 2), datetime(2026, 1, 2, 3, 4, 5),
    datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=-3))),
    datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(0))),
    0, 1.5, Decimal("1700000000.25"), True, 10**20, float("nan"), b"2026-01-01", [],
]


@pytest.mark.parametrize("index", range(len(_TIMES)))
def test_to_utc_is_unchanged(index: int) -> None:
    value = _TIMES[index]
    try:
        result: Any = to_utc(value)
    except (OverflowError, ValueError) as exc:
        result = type(exc).__name__
    assert repr(result) == TO_UTC[index]
    if isinstance(result, datetime):
        assert result.tzinfo is UTC


TO_UTC: list[str] = [
    "None",
    "None",
    "None",
    "datetime.datetime(2026, 11, 26, 0, 0, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 11, 26, 9, 5, 7, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 11, 26, 9, 5, 7, 123000, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 11, 26, 9, 5, 7, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 11, 26, 9, 5, 7, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 11, 26, 7, 5, 7, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 11, 26, 14, 35, 7, 500000, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 11, 26, 9, 5, 7, tzinfo=datetime.timezone.utc)",
    "None",
    "None",
    "'OverflowError'",
    "'OverflowError'",
    "datetime.datetime(2026, 11, 26, 9, 5, 7, 123456, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 11, 26, 9, 5, 7, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 11, 26, 0, 0, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 1, 2, 0, 0, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 1, 2, 6, 4, 5, 6, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(1970, 1, 1, 0, 0, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(1970, 1, 1, 0, 0, 1, 500000, tzinfo=datetime.timezone.utc)",
    "datetime.datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=datetime.timezone.utc)",
    "None",
    "None",
    "None",
    "None",
    "None",
]


def _summary() -> dict[str, Any]:  # pragma: no cover - to recompute the pinned values
    rows = _rows()
    out: dict[str, Any] = {}
    for dest in _destinations():
        clear_caches()
        out[f"{dest.type}/{dest.shape}"] = _digest(_plan_lines(dest, rows))
    clear_caches()
    out["identity"] = _digest(_identity_lines(rows))
    out["guard"] = _digest(_guard_lines(rows))
    times = []
    for value in _TIMES:
        try:
            result: Any = to_utc(value)
        except (OverflowError, ValueError) as exc:
            result = type(exc).__name__
        times.append(repr(result))
    out["to_utc"] = times
    return out

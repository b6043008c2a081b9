"""Tests for the synthetic CRM funnel (leadsync.demo_data)."""

from __future__ import annotations

import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, create_engine, func, select, text

from leadsync.demo_data import (
    STAGES,
    TABLE_NAME,
    add_changes,
    create_schema,
    generate_funnel,
    generate_rows_fast,
    lead_stages_table,
    seed,
)

NOW = datetime(2025, 6, 2, 9, 30, tzinfo=UTC)
COLUMNS = {column.name for column in lead_stages_table(MetaData()).columns}


@pytest.fixture(scope="module")
def funnel() -> list[dict[str, Any]]:
    return list(generate_funnel(20_000, NOW, seed=11))


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    yield engine
    engine.dispose()


def _count(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(text(f"SELECT count(*) FROM {TABLE_NAME}")).scalar_one()


def _keys(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(text(f"SELECT lead_id, stage FROM {TABLE_NAME}"))
        ]


# ---------------------------------------------------------------------------------------------
# generate_funnel
# ---------------------------------------------------------------------------------------------


def test_same_seed_and_now_give_the_same_rows() -> None:
    first = list(generate_funnel(300, NOW, seed=5))
    assert first == list(generate_funnel(300, NOW, seed=5))
    assert first != list(generate_funnel(300, NOW, seed=6))
    shifted = list(generate_funnel(300, NOW + timedelta(hours=1), seed=5))
    assert [row["event_time"] + timedelta(hours=1) for row in first] == [
        row["event_time"] for row in shifted
    ]


def test_rows_have_exactly_the_table_columns(funnel: list[dict[str, Any]]) -> None:
    assert all(set(row) == COLUMNS for row in funnel[:500])


def test_funnel_proportions(funnel: list[dict[str, Any]]) -> None:
    stages = Counter(row["stage"] for row in funnel)
    assert stages["lead"] == 20_000
    assert 0.42 < stages["qualified"] / stages["lead"] < 0.48
    assert 0.46 < stages["sales_accepted"] / stages["qualified"] < 0.54
    assert 0.35 < stages["won"] / stages["sales_accepted"] < 0.45


def test_lead_stage_is_unique_and_funnels_are_contiguous(funnel: list[dict[str, Any]]) -> None:
    keys = [(row["lead_id"], row["stage"]) for row in funnel]
    assert len(keys) == len(set(keys))
    by_lead: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in funnel:
        by_lead[row["lead_id"]].append(row)
    for rows in by_lead.values():
        assert [row["stage"] for row in rows] == list(STAGES[: len(rows)])
        times = [row["event_time"] for row in rows]
        assert times == sorted(times) and len(set(times)) == len(times)
        # Identifiers are the lead's, the same on every stage row.
        assert len({(row["email"], row["phone"], row["external_id"]) for row in rows}) == 1


def test_timestamps_are_utc_and_settled(funnel: list[dict[str, Any]]) -> None:
    settled = NOW - timedelta(minutes=10)
    for row in funnel:
        assert row["event_time"].utcoffset() == timedelta(0)
        assert row["updated_at"].utcoffset() == timedelta(0)
        assert row["event_time"] <= row["updated_at"] <= settled
        assert row["updated_at"] - row["event_time"] <= timedelta(minutes=21)
    assert min(row["event_time"] for row in funnel) > NOW - timedelta(days=10)


def test_a_few_leads_are_older_than_metas_seven_days(funnel: list[dict[str, Any]]) -> None:
    cutoff = NOW - timedelta(days=7)
    old_leads = {row["lead_id"] for row in funnel if row["event_time"] < cutoff}
    assert 0.005 < len(old_leads) / 20_000 < 0.02
    # All of an old lead's events are old, not just its creation.
    assert all(row["event_time"] < cutoff for row in funnel if row["lead_id"] in old_leads)
    recent = [row for row in funnel if row["lead_id"] not in old_leads]
    assert all(row["event_time"] > NOW - timedelta(days=6, minutes=1) for row in recent)


def test_identifiers_are_messy_but_plausible(funnel: list[dict[str, Any]]) -> None:
    leads = [row for row in funnel if row["stage"] == "lead"]
    n = len(leads)

    def share(predicate: Any) -> float:
        return sum(1 for row in leads if predicate(row)) / n

    emails = [row["email"] for row in leads if row["email"] is not None]
    assert 0.07 < share(lambda r: r["email"] is None) < 0.13
    assert any(email != email.strip() for email in emails)
    assert any(email.strip() != email.strip().lower() for email in emails)
    assert all(
        email.strip().lower().rsplit("@", 1)[1]
        in {
            "example.com",
            "example.org",
            "example.net",
            "mail.example.com",
            "gmail.com",
            "googlemail.com",
        }
        for email in emails
    )
    assert 0.12 < share(lambda r: r["phone"] is None) < 0.18
    assert any(row["phone"] in {"n/a", "000"} for row in leads)
    phones = {row["phone"] for row in leads}
    assert any(p and p.startswith("(") for p in phones)  # US national format
    assert any(p and p.startswith("+44") for p in phones)
    assert any(p and p.startswith("0044") for p in phones)
    assert any(p and p.startswith("030 ") for p in phones)
    countries = {row["country"] for row in leads}
    assert {"US", "GB", "DE", "FR", "BR", "IN", "CA", "AU"} <= countries
    assert any(c and c != c.strip() for c in countries) and "us" in countries
    assert "California" in {row["state"] for row in leads}
    assert any(re.fullmatch(r"\d{5}-\d{4}", row["zip"] or "") for row in leads)
    assert "SW1A 1AA" in {row["zip"] for row in leads}
    assert any(re.search(r"[éüöçã]", row["last_name"] or row["first_name"] or "") for row in leads)
    assert 0.25 < share(lambda r: r["date_of_birth"] is not None) < 0.35
    assert all(
        re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["date_of_birth"])
        for row in leads
        if row["date_of_birth"] is not None
    )
    assert {"F", "female", "Male", None} <= {row["gender"] for row in leads}

    assert 0.37 < share(lambda r: r["meta_lead_id"] is not None) < 0.43
    assert all(
        re.fullmatch(r"1\d{15}", row["meta_lead_id"])
        for row in leads
        if row["meta_lead_id"] is not None
    )
    assert 0.27 < share(lambda r: r["fbc"] is not None) < 0.33
    assert all(re.fullmatch(r"fb\.1\.\d{13}\.\S+", row["fbc"]) for row in leads if row["fbc"])
    assert all(re.fullmatch(r"fb\.1\.\d{13}\.\d+", row["fbp"]) for row in leads if row["fbp"])
    assert 0.22 < share(lambda r: r["gclid"] is not None) < 0.28
    assert 0.17 < share(lambda r: r["ttclid"] is not None) < 0.23
    web = [row for row in leads if row["event_source_url"] is not None]
    assert web and all(row["meta_lead_id"] is None for row in web)
    assert share(lambda r: r["client_ip"] is not None and r["event_source_url"] is None) == 0


def test_consent_value_and_event_id_rules(funnel: list[dict[str, Any]]) -> None:
    leads = [row for row in funnel if row["stage"] == "lead"]
    assert 0.005 < sum(row["opted_out"] for row in leads) / len(leads) < 0.02
    assert all(isinstance(row["opted_out"], bool) for row in funnel)
    consent = Counter(row["ad_user_data"] for row in leads)
    assert consent[True] > 0.8 * len(leads) and consent[None] > 0 and consent[False] > 0
    ldu = [row for row in funnel if row["limited_data_use"]]
    assert ldu and all(row["country"].strip().upper() == "US" for row in ldu)
    assert all(row["state"].upper() in {"CA", "CALIFORNIA"} for row in ldu)

    for row in funnel:
        if row["stage"] == "won":
            assert Decimal("500") <= row["value"] <= Decimal("5000")
        elif row["stage"] != "sales_accepted":
            assert row["value"] is None
        assert (row["value"] is None) == (row["currency"] is None)
        if row["currency"] is not None:
            assert re.fullmatch(r"[A-Z]{3}", row["currency"])
        if row["event_id"] is not None:
            assert row["stage"] == "lead"
            uuid.UUID(row["event_id"])
    assert any(row["value"] is not None for row in funnel if row["stage"] == "sales_accepted")
    with_event_id = sum(row["event_id"] is not None for row in leads) / len(leads)
    assert 0.07 < with_event_id < 0.13


def test_generate_rows_fast_shape() -> None:
    rows = list(generate_rows_fast(5_000, NOW, seed=2))
    assert len(rows) == 5_000
    assert all(set(row) == COLUMNS for row in rows)
    assert len({(row["lead_id"], row["stage"]) for row in rows}) == 5_000
    assert all(
        row["event_time"] <= row["updated_at"] <= NOW - timedelta(minutes=10) for row in rows
    )
    assert rows == list(generate_rows_fast(5_000, NOW, seed=2))
    assert not {row["lead_id"] for row in rows} & {
        row["lead_id"] for row in generate_rows_fast(100, NOW, seed=3)
    }


# ---------------------------------------------------------------------------------------------
# SQLite: seed once, add changes
# ---------------------------------------------------------------------------------------------


def test_create_schema_is_idempotent(sqlite_engine: Engine) -> None:
    create_schema(sqlite_engine)
    create_schema(sqlite_engine)
    assert _count(sqlite_engine) == 0


def test_seed_runs_once_on_sqlite(sqlite_engine: Engine) -> None:
    expected = list(generate_funnel(400, NOW, seed=3))
    assert seed(sqlite_engine, 400, NOW, seed=3) == len(expected)
    assert seed(sqlite_engine, 400, NOW, seed=3) == 0
    assert seed(sqlite_engine, 50, NOW, seed=99) == 0
    assert _count(sqlite_engine) == len(expected)

    table = lead_stages_table(MetaData())
    with sqlite_engine.connect() as connection:
        stored = (
            connection.execute(select(table).order_by(table.c.lead_id, table.c.stage))
            .mappings()
            .all()
        )
    expected.sort(key=lambda row: (row["lead_id"], row["stage"]))
    for got, want in zip(stored, expected, strict=True):
        # SQLite keeps no offset: the stored wall-clock time is the UTC one.
        assert got["event_time"] == want["event_time"].replace(tzinfo=None)
        assert got["updated_at"] == want["updated_at"].replace(tzinfo=None)
        for name in COLUMNS - {"event_time", "updated_at"}:
            assert got[name] == want[name], name


def test_add_changes_appends_exactly_n_without_duplicates(sqlite_engine: Engine) -> None:
    rows = seed(sqlite_engine, 300, NOW, seed=4)
    later = NOW + timedelta(minutes=30)
    assert add_changes(sqlite_engine, 40, later, seed=1) == 40
    assert add_changes(sqlite_engine, 40, later, seed=1) == 40  # same seed again: still unique
    assert add_changes(sqlite_engine, 25, later + timedelta(minutes=1)) == 25
    assert _count(sqlite_engine) == rows + 105
    keys = _keys(sqlite_engine)
    assert len(keys) == len(set(keys))

    table = lead_stages_table(MetaData())
    with sqlite_engine.connect() as connection:
        new = (
            connection.execute(select(table).where(table.c.updated_at > NOW.replace(tzinfo=None)))
            .mappings()
            .all()
        )
        stages_by_lead: dict[str, set[str]] = defaultdict(set)
        for lead_id, stage in connection.execute(select(table.c.lead_id, table.c.stage)):
            stages_by_lead[lead_id].add(stage)
    assert len(new) == 105
    by_updated = Counter(row["updated_at"] for row in new)
    last = later + timedelta(minutes=1)
    assert by_updated == {
        (later - timedelta(seconds=1)).replace(tzinfo=None): 80,
        (last - timedelta(seconds=1)).replace(tzinfo=None): 25,
    }
    for row in new:
        now = later if row["updated_at"] < later.replace(tzinfo=None) else last
        assert now - timedelta(minutes=5) <= row["event_time"].replace(tzinfo=UTC) < now
    # Advancing keeps funnels contiguous: a lead at stage k has all stages before k.
    for stages in stages_by_lead.values():
        assert stages == set(STAGES[: len(stages)])
    assert any(row["stage"] != "lead" for row in new)


def test_add_changes_creates_leads_when_none_can_advance(sqlite_engine: Engine) -> None:
    assert add_changes(sqlite_engine, 30, NOW, seed=8) == 30
    table = lead_stages_table(MetaData())
    with sqlite_engine.connect() as connection:
        stages = connection.execute(select(table.c.stage, func.count()).group_by(table.c.stage))
        assert dict(stages.all()) == {"lead": 30}


# ---------------------------------------------------------------------------------------------
# PostgreSQL: COPY
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def postgres_engine(pg_url: str) -> Iterator[Engine]:
    """A scratch database from the shared ``pg_url`` fixture (fails in CI when unreachable)."""
    engine = create_engine(pg_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_seed_with_copy_on_postgres(postgres_engine: Engine) -> None:
    n_leads = 11_400  # about 20k rows
    expected = list(generate_funnel(n_leads, NOW, seed=21))
    assert len(expected) > 19_000
    assert seed(postgres_engine, n_leads, NOW, seed=21) == len(expected)
    assert seed(postgres_engine, n_leads, NOW, seed=21) == 0

    table = lead_stages_table(MetaData())
    with postgres_engine.connect() as connection:
        stored = (
            connection.execute(select(table).order_by(table.c.lead_id, table.c.stage))
            .mappings()
            .all()
        )
    expected.sort(key=lambda row: (row["lead_id"], row["stage"]))
    assert len(stored) == len(expected)
    for got, want in zip(stored, expected, strict=True):
        for name in ("event_time", "updated_at"):
            assert got[name].tzinfo is not None
            assert got[name].astimezone(UTC) == want[name]
        # COPY must keep NULL apart from empty strings, booleans, decimals, stray whitespace.
        for name in COLUMNS - {"event_time", "updated_at"}:
            assert got[name] == want[name], name

    assert add_changes(postgres_engine, 500, NOW + timedelta(minutes=20), seed=2) == 500
    keys = _keys(postgres_engine)
    assert len(keys) == len(expected) + 500 == len(set(keys))

"""Unit tests for the data contract (leadsync.quality): rules, breaker, Data Docs, render.

No Airflow here: the suite runs on rows in memory, and the pipeline steps on SQLite engines.
Great Expectations is imported once per session (about ten seconds, the price of GX).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from leadsync import quality
from leadsync.config import Config, ConfigError, parse_config
from leadsync.destinations import get_destination
from leadsync.destinations.base import derive_event_id
from leadsync.pipeline import Pipeline, render_requests
from leadsync.quality import (
    RULES,
    ContractSession,
    ContractSpec,
    ContractViolation,
    check_row,
    check_rows,
    quarantine_key,
)
from leadsync.state import StateStore

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
TOLERANCE = timedelta(seconds=60)


def make_config(**contract: Any) -> Config:
    return parse_config({
        "contract": contract,
        "destinations": [{
            "name": "meta", "type": "meta", "crm_name": "Test CRM",
            "stages": {"lead": "Lead", "qualified": "QL", "won": "Converted"},
        }],
    })


CONFIG = make_config()
DEST = CONFIG.destination("meta")


def good(lead_id: Any = "L-1", **over: Any) -> dict[str, Any]:
    """A row that passes every rule; ``over`` breaks (or bends) one thing."""
    row: dict[str, Any] = {
        "lead_id": lead_id, "stage": "won",
        "event_time": NOW - timedelta(hours=1), "updated_at": NOW - timedelta(minutes=30),
        "email": "Anna.Smith@example.com", "value": Decimal("120.50"), "currency": "usd",
        "country": " us",
    }
    row.update(over)
    return row


NO_KEYS = {"email": None}

# (expected rule, row): every row breaks exactly the rule it is listed under (first by rank).
FAILING: list[tuple[str, dict[str, Any]]] = [
    ("missing_lead_id", good(None)),
    ("missing_lead_id", good("   ")),
    ("missing_stage", good("F-stage-none", stage=None)),
    ("missing_stage", good("F-stage-blank", stage="")),
    ("missing_event_time", good("F-et-none", event_time=None)),
    ("missing_event_time", good("F-et-blank", event_time=" ")),
    ("missing_updated_at", good("F-ut-none", updated_at=None)),
    ("bad_type", good(2.5)),
    ("bad_type", good("F-stage-int", stage=3)),
    ("bad_type", good("F-et-text", event_time="yesterday")),
    ("bad_type", good("F-et-epoch", event_time=1_772_400_000)),
    ("bad_type", good("F-ut-text", updated_at="not a date")),
    ("bad_lead_id", good("x" * 129)),
    ("bad_lead_id", good("F-nul\x00id")),
    ("unknown_stage", good("F-stage-case", stage="Won")),
    ("unknown_stage", good("F-stage-lost", stage="lost")),
    ("duplicate_lead_stage", good("F-dup")),
    ("duplicate_lead_stage", good("F-dup ")),
    ("future_event_time", good("F-future", event_time=NOW + timedelta(minutes=2))),
    ("event_after_updated_at", good("F-after", event_time=NOW - timedelta(minutes=10),
                                    updated_at=NOW - timedelta(minutes=20))),
    ("bad_value", good("F-value-neg", value=-1)),
    ("bad_value", good("F-value-text", value="abc")),
    ("bad_value", good("F-value-inf", value=math.inf)),
    ("bad_value", good("F-value-bool", value=True)),
    ("bad_currency", good("F-cur", currency="US$")),
    ("bad_currency", good("F-cur-none", currency=None)),
    ("no_match_keys", good("F-nokeys", **NO_KEYS)),
    # An unusable identifier is dropped; with nothing else to match on, the row is quarantined.
    ("no_match_keys", good("F-email-only-1", email="anna@")),
    ("no_match_keys", good("F-email-only-2", email="an na@example.com")),
    ("no_match_keys", good("F-phone-only", email=None, phone="555-1212")),  # no area code
    ("no_match_keys", good("F-ip-only", email=None, client_ip="203.0.113.7")),  # needs the UA
]

DIGEST = "A" * 8 + "0123456789ABCDEF" * 3 + "B" * 8  # 64 upper-case hex digits

# (identifier.rule, row): the identifier is dropped and counted, the row passes on its other
# match keys (each row drops exactly the one listed).
PHONE = "+1 650 555 0123"
WARNINGS: list[tuple[str, dict[str, Any]]] = [
    ("email.bad_email", good("W-email-1", email="anna@", phone=PHONE)),
    ("email.bad_email", good("W-email-2", email="an na@example.com", phone=PHONE)),
    ("email.bad_email", good("W-email-3", email="anna@example", phone=PHONE)),
    ("email.bad_email", good("W-email-4", email=12345, phone=PHONE)),
    ("phone.bad_phone", good("W-phone-1", phone="555-1212")),
    ("phone.bad_phone", good("W-phone-2", phone="n/a")),
    ("phone.bad_phone", good("W-phone-3", phone="6505550123", country=None)),  # no country
    ("country.bad_country", good("W-country-1", country="XX")),
    ("country.bad_country", good("W-country-2", country="Atlantis")),
]

# Rows that bend a rule without breaking it.
PASSING: list[tuple[str, dict[str, Any]]] = [
    ("plain", good("P-plain")),
    ("integer lead_id", good(12345)),
    ("lead_id of 128 chars", good("y" * 128)),
    ("stage with spaces", good("P-stage", stage=" won ")),
    ("ISO text event_time", good("P-iso", event_time="2026-03-02T10:00:00Z")),
    ("date event_time", good("P-date", event_time=date(2026, 3, 1))),
    ("event_time inside the tolerance", good("P-soon", event_time=NOW + timedelta(seconds=30),
                                             updated_at=NOW)),
    ("value as text", good("P-value", value="12.50")),
    ("value zero", good("P-zero", value=0)),
    ("no value, no currency", good("P-novalue", value=None, currency=None)),
    ("lower-case currency", good("P-eur", currency="eur")),
    ("no country", good("P-nocountry", country=None)),
    ("country with spaces", good("P-de", country=" de ")),
    ("alpha-3 country", good("P-usa", country="USA")),  # identity sends "us"
    ("email with spaces and case", good("P-email", email=" Anna@Example.COM\t")),
    ("upper-case SHA-256 digest as the only key", good("P-digest", email=DIGEST)),
    ("SHA-256 digest as the phone", good("P-digest-phone", email=None, phone=DIGEST.lower())),
    *WARNINGS,
    ("phone as the only key", good("P-phone", email=None, phone="+1 650 555 0123")),
    ("ip and user agent", good("P-ipua", email="", client_ip="203.0.113.7",
                               user_agent="Mozilla/5.0")),
]


@pytest.fixture(scope="module")
def verdicts() -> dict[int, quality.Failure | None]:
    rows = [row for _, row in FAILING] + [row for _, row in PASSING]
    result = check_rows(rows, CONFIG, DEST, NOW)
    return dict(enumerate(result))


@pytest.mark.parametrize("index", range(len(FAILING)),
                         ids=[f"{rule}-{i}" for i, (rule, _) in enumerate(FAILING)])
def test_each_rule_fails_its_row(verdicts: dict[int, Any], index: int) -> None:
    rule, _ = FAILING[index]
    failure = verdicts[index]
    assert failure is not None, f"expected {rule}"
    assert failure.rule == rule
    assert failure.detail and failure.position == index


def test_batches_failing_other_rules_or_none_each_name_exactly_their_rows() -> None:
    # GX validates a batch for its counts first, then again only with the expectations some
    # row failed, which name the rows: the sets differ from batch to batch (and are kept).
    breaks: dict[int, tuple[str, dict[str, Any]]] = {
        7: ("bad_value", {"value": -1}),
        130: ("unknown_stage", {"stage": "lost"}), 170: ("bad_value", {"value": "abc"}),
        301: ("unknown_stage", {"stage": "Won"}), 320: ("bad_currency", {"currency": "US$"}),
        399: ("bad_value", {"value": -2}),
        405: ("bad_value", {"value": -3}),
    }
    rows = [good(f"B-{i}", **breaks[i][1]) if i in breaks else good(f"B-{i}")
            for i in range(450)]  # batches of 100: the third has no failing row
    verdicts = check_rows(rows, make_config(batch_rows=100), DEST, NOW)
    got = {i: v.rule for i, v in enumerate(verdicts) if v is not None}
    assert got == {i: rule for i, (rule, _) in breaks.items()}


@pytest.mark.parametrize("index", range(len(PASSING)), ids=[name for name, _ in PASSING])
def test_bent_rows_pass(verdicts: dict[int, Any], index: int) -> None:
    assert verdicts[len(FAILING) + index] is None


def test_every_rule_has_a_failing_case() -> None:
    # unreadable_row is the source's (a row the driver cannot read): test_source_unreadable.
    covered = {rule for rule, _ in FAILING} | {"missing_column", "unreadable_row"}
    covered |= {key.split(".")[1] for key, _ in WARNINGS}
    assert covered == set(RULES)


def test_unusable_identifiers_are_dropped_and_counted_not_quarantined() -> None:
    rows = [row for _, row in WARNINGS] + [good("W-fine")]
    report = run_session(rows)
    assert report.passed and report.failing_rows == 0 and report.quarantined == {}
    expected: dict[str, int] = {}
    for key, _ in WARNINGS:
        expected[key] = expected.get(key, 0) + 1
    assert report.identifiers_dropped == expected
    assert report.failing_expectations == []
    warned = {e["rule"]: e for e in report.expectations if e["severity"] == "warning"}
    assert set(warned) == {"bad_email", "bad_phone", "bad_country"}
    assert warned["bad_email"]["unexpected"] == 4
    data = report.as_dict()
    assert data["identifiers_dropped"] == expected and data["failing_expectations"] == []
    text = report.describe()
    assert "Data contract passed" in text
    assert "Warnings: unusable identifiers left out of their events" in text
    assert "email.bad_email=4" in text and "phone.bad_phone=3" in text


def test_identifier_rules_follow_the_destination() -> None:
    """TikTok and Google send no country: an unusable one is nothing they drop."""
    config = parse_config({"destinations": [
        {"name": "tiktok", "type": "tiktok", "crm_name": "X", "stages": {"won": "Converted"}},
        {"name": "google", "type": "google_ads", "customer_id": "1234567890",
         "stages": {"won": "1000000004"}}]})
    rows = [good("T-1", country="XX", phone=PHONE), good("T-2", email="anna@", phone=PHONE)]
    for name in ("tiktok", "google"):
        spec = ContractSpec.from_config(config, config.destination(name), data_docs=False)
        assert {code for code, _ in spec.judged_identifiers} == {"bad_email", "bad_phone"}
        s = ContractSession(spec, "r", NOW)
        assert s.check_columns(COLUMNS)
        s.add(rows)
        report = s.finish()
        assert report.identifiers_dropped == {"email.bad_email": 1}, name
        # Google's own email rule: a gmail address with nothing before its +tag is unusable.
    google = check_rows([good("G-plus", email="+tag@gmail.com")], config,
                        config.destination("google"), NOW)
    tiktok = check_rows([good("T-plus", email="+tag@gmail.com")], config,
                        config.destination("tiktok"), NOW)
    assert google[0] is not None and google[0].rule == "no_match_keys"
    assert tiktok[0] is None


def test_details_never_hold_the_value() -> None:
    rows = [good("S-1", email="secret.person@"), good("S-2", currency="S3CR3T")]
    failures = check_rows(rows, CONFIG, DEST, NOW)
    for failure in failures:
        assert failure is not None
        assert "secret" not in failure.detail.lower()


def test_known_stages_and_disabled_rules() -> None:
    config = make_config(known_stages=["lost"], disabled_rules=["bad_country", "bad_currency"])
    rows = [good("K-1", stage="lost"), good("K-2", currency="US$"), good("K-3", stage="other")]
    result = check_rows(rows, config, config.destination("meta"), NOW)
    assert result[0] is None and result[1] is None
    assert result[2] is not None and result[2].rule == "unknown_stage"
    report = run_session([good("K-4", country="XX")], config)
    assert report.identifiers_dropped == {}
    assert "bad_country" not in {e["rule"] for e in report.expectations}


def test_missing_column_fails_every_row() -> None:
    rows = [{k: v for k, v in good(f"M-{i}").items() if k != "updated_at"} for i in range(3)]
    result = check_rows(rows, CONFIG, DEST, NOW)
    assert [f.rule for f in result if f] == ["missing_column"] * 3


def test_match_keys_follow_the_destination() -> None:
    config = parse_config({"destinations": [
        {"name": "meta", "type": "meta", "crm_name": "X", "stages": {"won": "Converted"}},
        {"name": "google", "type": "google_datamanager", "customer_id": "1234567890",
         "stages": {"won": "1000000004"}},
    ]})
    names_only = good("G-1", email=None, first_name="Anna", last_name="Smith")
    clicked = good("G-2", email=None, gclid="Cj0KCQiA1234")
    meta = check_rows([names_only, clicked], config, config.destination("meta"), NOW)
    google = check_rows([names_only, clicked], config, config.destination("google"), NOW)
    assert meta[0] is None  # Meta matches on names
    assert meta[1] is not None and meta[1].rule == "no_match_keys"
    assert google[0] is not None and google[0].rule == "no_match_keys"
    assert google[1] is None  # Google matches on a click id


# -- the stage step's guard agrees with the suite ----------------------------------------------

GUARDED = {"missing_lead_id", "missing_stage", "missing_event_time", "bad_type", "bad_lead_id",
           "future_event_time"}
RANK = {code: i for i, code in enumerate(RULES)}

guard_values = st.fixed_dictionaries({
    "lead_id": st.one_of(st.none(), st.just(""), st.just("  "), st.integers(-5, 10**12),
                         st.floats(allow_nan=False), st.text(max_size=6),
                         st.just("x" * 200), st.just("a\x00b")),
    "stage": st.one_of(st.none(), st.just(""), st.sampled_from(["won", "lead", "Won", " won"]),
                       st.integers()),
    "event_time": st.one_of(
        st.none(), st.just(""), st.sampled_from(["garbage", "2026-03-02T11:00:00Z"]),
        st.integers(0, 2_000_000_000),
        st.timedeltas(timedelta(days=-3), timedelta(days=3)).map(lambda d: NOW + d)),
})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(guard_values, min_size=1, max_size=15))
def test_guard_agrees_with_the_suite(parts: list[dict[str, Any]]) -> None:
    rows = [good(**part) for part in parts]  # everything else valid
    rows.append(good("G-mixed", stage={}))
    rows.append(good("G-mixed-2", stage=False))  # GX's in_type_list broke on this mix
    for row in rows:
        row["updated_at"] = NOW + timedelta(days=4)  # never "event after updated_at"
    suite = check_rows(rows, CONFIG, DEST, NOW)
    for row, failure in zip(rows, suite, strict=True):
        guard = check_row(row, NOW, TOLERANCE)
        if failure is None:
            assert guard is None, (row, guard)
            continue
        if failure.rule in GUARDED:
            assert guard is not None and guard[0] == failure.rule, (row, guard, failure)
        if guard is not None:
            assert RANK[failure.rule] <= RANK[guard[0]], (row, guard, failure)


# -- breaker -----------------------------------------------------------------------------------


def session(config: Config = CONFIG, docs: Path | None = None) -> ContractSession:
    spec = ContractSpec.from_config(config, config.destination("meta"), data_docs=docs is not None)
    if docs is not None:
        spec = ContractSpec(**{**spec.__dict__, "data_docs_dir": docs})
    return ContractSession(spec, "manual__2026-03-02T12:00:00+00:00", NOW)


COLUMNS = list(good())


def run_session(rows: list[dict[str, Any]], config: Config = CONFIG) -> quality.ContractReport:
    s = session(config)
    assert s.check_columns(COLUMNS)
    s.add(rows)
    return s.finish()


def test_breaker_trips_on_a_missing_column() -> None:
    s = session()
    assert not s.check_columns(["lead_id", "stage", "event_time", "email"])
    report = s.finish()
    assert not report.passed
    violation = ContractViolation(report)
    message = str(violation)
    assert "FAILED" in message
    assert "missing_column: expect_column_to_exist(column=updated_at)" in message
    assert "Nothing was staged or sent" in message


def test_breaker_trips_above_the_threshold_only() -> None:
    future = {"event_time": NOW + timedelta(hours=3)}
    at_limit = [good(f"T-{i}", **(future if i < 4 else {})) for i in range(20)]
    report = run_session(at_limit)
    assert report.passed and report.failing_rows == 4  # 20% is not above 20%
    over = [good(f"U-{i}", **(future if i < 5 else {})) for i in range(20)]
    report = run_session(over)
    assert not report.passed
    assert report.quarantined == {"future_event_time": 5}
    message = str(ContractViolation(report))
    assert "5 of 20 new rows (25.0%) fail the contract, above the threshold of 20%" in message
    assert "future_event_time: expect_column_values_to_be_between(" in message
    assert "max_value=60.0): 5" in message
    assert run_session(over, make_config(failure_threshold=1.0)).passed


def test_small_windows_are_not_judged_by_share() -> None:
    rows = [good(f"W-{i}", **({"currency": "XX"} if i < 5 else {})) for i in range(10)]
    report = run_session(rows)
    assert report.passed and report.quarantined == {"bad_currency": 5}
    assert not run_session(rows, make_config(failure_min_rows=10)).passed


def test_breaker_trips_past_max_quarantined_rows() -> None:
    rows = [good(f"Q-{i}", currency="XX") for i in range(3)] + [good(f"R-{i}") for i in range(30)]
    assert run_session(rows, make_config(max_quarantined_rows=5)).passed
    report = run_session(rows, make_config(max_quarantined_rows=2))
    assert not report.passed and "max_quarantined_rows" in (report.tripped or "")


def test_a_column_of_the_wrong_type_is_structural() -> None:
    epoch = [good(f"E-{i}", event_time=1_772_400_000 + i) for i in range(20)]
    report = run_session(epoch)
    assert not report.passed
    assert any("event_time" in problem for problem in report.structural)
    # One odd value in a good column is a row problem, not a broken column.
    mixed = [good(f"X-{i}") for i in range(20)] + [good("X-odd", event_time=1_772_400_000)]
    report = run_session(mixed)
    assert report.passed and report.quarantined == {"bad_type": 1}


def test_report_is_json_and_holds_no_identifiers() -> None:
    rows = [good("ID-SECRET-1", email="hidden.person@"), good("ID-2")]
    report = run_session(rows)
    data = json.loads(json.dumps(report.as_dict()))
    assert data["quarantined"] == {"no_match_keys": 1}  # the bad email was its only key
    assert data["identifiers_dropped"] == {"email.bad_email": 1}
    assert [e["rule"] for e in data["failing_expectations"]] == ["no_match_keys"]
    blob = json.dumps(data)
    assert "ID-SECRET" not in blob and "hidden.person" not in blob


def test_data_docs_are_written_without_values(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    s = session(docs=docs)
    assert s.check_columns(COLUMNS)
    s.add([good("DD-1", email="private.person@nowhere"), good("DD-2")])
    report = s.finish()
    assert report.data_docs and Path(report.data_docs).is_file()
    assert (docs / "index.html").is_file()
    for path in docs.rglob("*"):
        if path.is_file() and path.suffix in (".html", ".json"):
            content = path.read_text(encoding="utf-8", errors="ignore")
            assert "private.person" not in content and "DD-1" not in content, path
    page = Path(report.data_docs).read_text(encoding="utf-8")
    assert "leadsync_meta_contract" in page


def test_data_docs_show_dropped_identifiers_as_warnings(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    s = session(docs=docs)
    assert s.check_columns(COLUMNS)
    s.add([good("DW-1", email="dropped.person@", phone=PHONE), good("DW-2")])
    report = s.finish()
    assert report.passed and report.identifiers_dropped == {"email.bad_email": 1}
    (stored,) = (docs / ".results").rglob("*.json")
    result = json.loads(stored.read_text())
    assert result["success"] is True  # a warning does not fail the suite
    by_rule = {r["expectation_config"]["meta"]["rule"]: r for r in result["results"]}
    email = by_rule["bad_email"]
    assert email["success"] is True and email["result"]["unexpected_count"] == 1
    assert email["expectation_config"]["severity"] == "warning"
    assert by_rule["no_match_keys"]["expectation_config"]["severity"] == "critical"
    page = Path(report.data_docs or "").read_text(encoding="utf-8")
    assert "Warning, not a failure (bad_email)" in page
    assert "identifiers_dropped.email.bad_email" in (docs / "expectations" /
                                                     "leadsync_meta_contract.html").read_text()
    assert "dropped.person" not in page and "dropped.person" not in stored.read_text()


def _verdicts_of(s: ContractSession, rows: list[dict[str, Any]]) -> tuple[list[Any], Any]:
    """Feeds rows in chunks of 7 (batch boundaries fall inside chunks) and collects every
    failure, checking that ``validated`` never runs ahead of the verdicts returned."""
    from collections import Counter as _Counter

    counts = _Counter(quality.duplicate_key(r.get("lead_id"), r.get("stage")) for r in rows)
    failures: list[Any] = []
    assert s.check_columns(COLUMNS, wait=False)
    for start in range(0, len(rows), 7):
        failures += s.add(rows[start:start + 7],
                          lambda r: counts[quality.duplicate_key(r.get("lead_id"),
                                                                 r.get("stage"))])
        assert all(f.position < s.validated for f in failures)
    failures += s.flush()
    assert s.validated == len(rows)
    return failures, s.finish()


def test_a_worker_process_gives_the_verdicts_of_the_task_process(tmp_path: Path) -> None:
    """contract.separate_process: GX validates in a worker process, batch by batch while the
    task goes on; the failures, counts and Data Docs are those of validating in the task."""
    rows = [row for _, row in FAILING] + [row for _, row in PASSING] + [
        good(f"G-{i}") for i in range(200)]  # three batches of 100 rows, and a part
    spec = ContractSpec.from_config(make_config(batch_rows=100), DEST)
    outcome = {}
    for mode in (False, True):
        docs = tmp_path / str(mode)
        s = ContractSession(ContractSpec(**{**spec.__dict__, "data_docs_dir": docs}),
                            "run-1", NOW, separate_process=mode)
        failures, report = _verdicts_of(s, rows)
        assert report.data_docs and Path(report.data_docs).is_file()
        outcome[mode] = (sorted((f.position, f.rule) for f in failures),
                         {k: v for k, v in report.as_dict().items() if k != "data_docs"})
    assert outcome[True] == outcome[False]
    assert len(outcome[True][0]) == len(FAILING)


def test_a_worker_process_finds_a_missing_column() -> None:
    spec = ContractSpec.from_config(CONFIG, DEST, data_docs=False)
    s = ContractSession(spec, "run-1", NOW, separate_process=True)
    assert not s.check_columns([c for c in COLUMNS if c != "updated_at"])
    report = s.finish()
    assert not report.passed and "column=updated_at" in (report.tripped or "")


def test_a_worker_process_that_dies_fails_the_check_with_a_clear_error() -> None:
    from leadsync.contract_worker import WorkerValidator

    s = ContractSession(quality.ContractSpec.from_config(make_config(batch_rows=100), DEST,
                                                         data_docs=False),
                        "run-1", NOW, separate_process=True)
    assert isinstance(s.validator, WorkerValidator)
    s.validator.worker.proc.kill()
    s.validator.worker.proc.wait()
    with pytest.raises(quality.ContractError, match="contract worker process stopped"):
        s.add([good(f"K-{i}") for i in range(250)])
        s.flush()
    s.close()  # a dead worker is not kept for the next session
    again = ContractSession(s.spec, "run-2", NOW, separate_process=True)
    assert again.check_columns(COLUMNS)
    assert again.add([good("K-1")]) + again.flush() == []
    again.close()


def test_data_docs_keep_the_newest_runs(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    spec = ContractSpec.from_config(make_config(data_docs_keep=2), DEST)
    spec = ContractSpec(**{**spec.__dict__, "data_docs_dir": docs})
    pages = []
    for i in range(4):
        s = ContractSession(spec, f"run-{i}", NOW + timedelta(minutes=i))
        assert s.check_columns(COLUMNS)
        s.add([good(f"K-{i}")])
        pages.append(s.finish().data_docs)
    kept = sorted(p.name for p in (docs / "validations").rglob("*.html"))
    assert len(kept) == 2 and len(list((docs / ".results").rglob("*.json"))) == 2
    assert Path(pages[-1]).is_file() and not Path(pages[0]).exists()
    index = (docs / "index.html").read_text()
    assert "run-3" in index and "run-0" not in index


def test_data_docs_keep_every_destination(tmp_path: Path) -> None:
    config = parse_config({"destinations": [
        {"name": name, "type": "meta", "crm_name": "X", "stages": {"won": "Converted"}}
        for name in ("meta", "meta_eu")]})
    for name in ("meta", "meta_eu"):
        spec = ContractSpec.from_config(config, config.destination(name))
        s = ContractSession(ContractSpec(**{**spec.__dict__, "data_docs_dir": tmp_path}),
                            f"run-{name}", NOW)
        assert s.check_columns(COLUMNS)
        s.add([good("K")])
        assert s.finish().data_docs
        quality._GX_CONTEXTS.clear()  # each Airflow task is a process of its own
    pages = sorted(p.name for p in (tmp_path / "expectations").glob("*.html"))
    assert pages == ["leadsync_meta_contract.html", "leadsync_meta_eu_contract.html"]


# -- render: the same contract, reasons are rule codes --------------------------------------------


def _creds() -> Any:
    return get_destination("meta").parse_credentials(None, "token", {"pixel_id": "1234567890"})


def test_render_reports_quarantined_rows_with_the_rule_code() -> None:
    rows = [good("R-ok"), good("R-future", event_time=NOW + timedelta(days=2)),
            good("R-cur", currency="US$")]
    out = list(render_requests(rows, DEST, _creds(), NOW, config=CONFIG))
    skipped = {o["skipped"]["lead_id"]: o["skipped"]["reason"] for o in out if "skipped" in o}
    assert skipped == {"R-future": "future_event_time", "R-cur": "bad_currency"}
    requests = [o for o in out if "body" in o]
    assert len(requests) == 1 and len(requests[0]["body"]["data"]) == 1


junk_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["'; DROP TABLE crm_lead_stages; --", "<script>alert(1)</script>",
                     "${jndi:ldap://x/a}", "%s%s%n", "\x00\x1b[31m", "Ω≈ç√∫˜µ≤", "💥" * 10,
                     "x" * 5000, "1e400", "NaN", "-0", "null", "true"]),
)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), junk_text)
json_value = st.one_of(json_scalar, st.lists(json_scalar, max_size=3),
                       st.dictionaries(st.text(max_size=5), json_scalar, max_size=3))
timestampish = st.one_of(
    json_value, st.timedeltas(timedelta(days=-10), timedelta(days=3)).map(
        lambda d: (NOW + d).isoformat()))
columns = ["lead_id", "stage", "event_time", "updated_at", "event_id", "email", "phone",
           "first_name", "last_name", "country", "external_id", "fbc", "fbp", "meta_lead_id",
           "client_ip", "user_agent", "value", "currency", "opted_out", "limited_data_use"]


@st.composite
def malformed_row(draw: st.DrawFn) -> dict[str, Any]:
    base = good(draw(st.one_of(st.text(min_size=1, max_size=12), json_value)))
    base["stage"] = draw(st.one_of(st.sampled_from(["won", "lead", "qualified"]), json_value))
    for name in draw(st.lists(st.sampled_from(columns), max_size=8, unique=True)):
        strategy = timestampish if name in ("event_time", "updated_at") else json_value
        base[name] = draw(strategy)
    return base


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(malformed_row(), min_size=1, max_size=12))
def test_render_accounts_for_every_malformed_row(rows: list[dict[str, Any]]) -> None:
    out = list(render_requests(rows, DEST, _creds(), NOW, config=CONFIG))
    skipped = [o["skipped"] for o in out if "skipped" in o]
    sent = sum(len(o["body"]["data"]) for o in out if "body" in o)
    assert sent + len(skipped) == len(rows)
    for item in skipped:
        assert isinstance(item["reason"], str) and item["reason"]
    json.dumps(out)  # every line is printable as JSON


# -- the pipeline's check + stage on a real (SQLite) warehouse ------------------------------------

WAREHOUSE_COLUMNS = ["lead_id", "stage", "event_time", "updated_at", "email", "phone",
                     "country", "value", "currency", "opted_out"]
sqlite_value = st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False),
                         junk_text)
row_values = st.fixed_dictionaries({
    "lead_id": st.one_of(st.text(min_size=1, max_size=10), sqlite_value),
    "stage": st.one_of(st.sampled_from(["won", "lead", "qualified", "Won", " lead"]),
                       sqlite_value),
    "event_time": st.one_of(sqlite_value, st.timedeltas(
        timedelta(days=-9), timedelta(days=2)).map(lambda d: NOW + d)),
    # Numbers are left out: SQLite reads them as Julian day numbers, not as text.
    "updated_at": st.one_of(st.none(), st.just(""), st.text(max_size=8).filter(
        lambda s: not s.strip().lstrip("+-").replace(".", "").isdigit()),
        st.timedeltas(timedelta(days=-9), timedelta(minutes=-5)).map(lambda d: NOW + d)),
    "email": st.one_of(st.just("anna@example.com"), sqlite_value),
    "phone": st.one_of(st.none(), st.just("+1 650 555 0123"), junk_text),
    "country": st.one_of(st.none(), st.just("US"), junk_text),
    "value": st.one_of(st.none(), st.just(12.5), sqlite_value),
    "currency": st.one_of(st.none(), st.just("USD"), junk_text),
    "opted_out": st.one_of(st.none(), st.booleans(), sqlite_value),
})


@pytest.fixture(scope="module")
def query_file() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "leads.sql"
        path.write_text(f"SELECT {', '.join(WAREHOUSE_COLUMNS)} FROM raw_leads")
        yield path


def _pipeline(tmp: Path, query: Path, **contract: Any) -> Pipeline:
    config = parse_config({
        "source": {"query_file": str(query), "lookback": "0s", "settle_lag": "1m"},
        "contract": {"data_docs": False, **contract},
        "destinations": [{"name": "meta", "type": "meta", "crm_name": "Test CRM",
                          "stages": {"lead": "Lead", "qualified": "QL", "won": "Converted"}}],
    })
    warehouse = create_engine(f"sqlite:///{tmp / 'wh.db'}")
    with warehouse.begin() as conn:
        conn.execute(text(f"CREATE TABLE raw_leads ({', '.join(WAREHOUSE_COLUMNS)})"))
    state = StateStore(create_engine(f"sqlite:///{tmp / 'state.db'}"))
    return Pipeline(config, config.destination("meta"), state, warehouse, clock=lambda: NOW)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(row_values, min_size=1, max_size=10))
def test_pipeline_sends_or_quarantines_every_malformed_row(
    query_file: Path, rows: list[dict[str, Any]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = _pipeline(Path(tmp), query_file, failure_threshold=1.0)
        with pipeline.warehouse.begin() as conn:
            conn.execute(text(f"INSERT INTO raw_leads VALUES "
                              f"({', '.join(':' + c for c in WAREHOUSE_COLUMNS)})"), rows)
            stored = [dict(m) for m in conn.execute(text("SELECT * FROM raw_leads")).mappings()]
        pipeline.open_run("r1")
        try:
            pipeline.check("r1")
        except ContractViolation as exc:
            assert exc.report.structural  # threshold 1.0: only a broken column stops it
            summary = pipeline.commit("r1")
            assert summary["status"] == "contract_failed"
            assert pipeline.state.ledger_rows("meta") == []
            assert pipeline.state.pending_batch_ids("meta") == []
            assert pipeline.state.get_watermark("meta") is None
            assert pipeline.state.lease_holder("meta") is None
            return
        pipeline.stage("r1")
        quarantined = pipeline.state.open_quarantine_keys("meta")
        ledger = {(r["lead_id"], r["stage"]): r for r in pipeline.state.ledger_rows("meta")}
        for row in stored:
            key = quarantine_key(row)
            if key in quarantined:
                continue
            entry = ledger.get(key)
            assert entry is not None, f"row neither staged nor quarantined: {key!r}"
            assert entry["status"] == "pending" or entry["reason"], entry
        pipeline.commit("r1")


def test_fixed_row_is_resolved_and_staged_by_the_next_run(tmp_path: Path,
                                                          query_file: Path) -> None:
    pipeline = _pipeline(tmp_path, query_file)
    insert = text(f"INSERT INTO raw_leads ({', '.join(WAREHOUSE_COLUMNS)}) VALUES "
                  f"({', '.join(':' + c for c in WAREHOUSE_COLUMNS)})")
    base = {c: None for c in WAREHOUSE_COLUMNS}
    with pipeline.warehouse.begin() as conn:
        conn.execute(insert, [
            {**base, "lead_id": f"OK-{i}", "stage": "lead", "email": "a@example.com",
             "event_time": NOW - timedelta(hours=2), "updated_at": NOW - timedelta(hours=1)}
            for i in range(9)
        ] + [{**base, "lead_id": "BAD-1", "stage": "won", "email": "b@example.com",
              "value": 100, "currency": "US$", "event_time": NOW - timedelta(hours=2),
              "updated_at": NOW - timedelta(hours=1)}])
    pipeline.open_run("r1")
    assert pipeline.check("r1")["quarantined"] == {"bad_currency": 1}
    staged = pipeline.stage("r1")
    assert staged["counts"]["staged"] == 9
    pipeline.commit("r1")
    assert pipeline.state.summary(["meta"])["meta"]["quarantined"] == 1

    with pipeline.warehouse.begin() as conn:
        conn.execute(text("UPDATE raw_leads SET currency = 'USD', updated_at = :t "
                          "WHERE lead_id = 'BAD-1'"), {"t": NOW - timedelta(minutes=10)})
    pipeline.open_run("r2")
    assert pipeline.check("r2")["quarantined"] == {}
    staged = pipeline.stage("r2")
    assert staged["counts"]["staged"] == 1 and staged["counts"]["quarantine_resolved"] == 1
    pipeline.commit("r2")
    assert pipeline.state.summary(["meta"])["meta"]["quarantined"] == 0


def test_a_bad_identifier_is_dropped_and_counted_the_row_sent_on_its_other_keys(
    tmp_path: Path, query_file: Path
) -> None:
    from leadsync.hashing import sha256_hex

    pipeline = _pipeline(tmp_path, query_file)
    digest = sha256_hex("hashed.lead@example.com")
    base = {c: None for c in WAREHOUSE_COLUMNS} | {
        "stage": "qualified", "event_time": NOW - timedelta(hours=2),
        "updated_at": NOW - timedelta(hours=1), "country": "US"}
    rows = [
        {**base, "lead_id": "BAD-EMAIL-GOOD-PHONE", "email": "anna.smith(at)example.com",
         "phone": "+1 (650) 555-0142"},
        {**base, "lead_id": "UPPER-DIGEST", "email": digest.upper()},
        {**base, "lead_id": "BAD-EMAIL-ONLY", "email": "anna.smith(at)example.com"},
    ]
    with pipeline.warehouse.begin() as conn:
        conn.execute(text(f"INSERT INTO raw_leads VALUES "
                          f"({', '.join(':' + c for c in WAREHOUSE_COLUMNS)})"), rows)
    pipeline.open_run("r1")
    report = pipeline.check("r1")
    assert report["quarantined"] == {"no_match_keys": 1}
    assert report["identifiers_dropped"] == {"email.bad_email": 2}
    pipeline.check("r1")  # a retried check counts afresh, not twice
    counts = pipeline.state.get_run("r1", "meta")["counts"]
    assert counts["identifiers_dropped"] == 2 and counts["identifiers_dropped.email.bad_email"] == 2
    assert counts["quarantined.no_match_keys"] == 1
    staged = pipeline.stage("r1")
    # The check stages in the same pass; its retry finds the two events already in an outbox
    # batch (in flight), so together they count each sent row once.
    assert staged["counts"].get("staged", 0) + staged["counts"].get("in_flight", 0) == 2
    assert staged["counts"]["identifiers_dropped.email.bad_email"] == 2
    users = {}
    for batch_id in staged["batch_ids"]:
        batch = pipeline.state.load_batch(batch_id)
        assert batch is not None
        users.update({e["event_id"]: e["body"]["user_data"] for e in batch.events})
    phone_only = users[derive_event_id("BAD-EMAIL-GOOD-PHONE", "qualified")]
    assert phone_only["ph"] == sha256_hex("16505550142") and "em" not in phone_only
    assert users[derive_event_id("UPPER-DIGEST", "qualified")]["em"] == digest  # lower-cased
    assert pipeline.state.open_quarantine_keys("meta") == {("BAD-EMAIL-ONLY", "qualified")}
    pipeline.commit("r1")
    run = pipeline.state.get_run("r1", "meta")["counts"]
    assert run["identifiers_dropped.email.bad_email"] == 2  # not added to by stage or commit


def test_stage_refuses_and_commit_keeps_the_watermark_after_a_violation(
    tmp_path: Path, query_file: Path
) -> None:
    pipeline = _pipeline(tmp_path, query_file, failure_min_rows=1)
    with pipeline.warehouse.begin() as conn:
        conn.execute(text("INSERT INTO raw_leads (lead_id, stage, event_time, updated_at, email) "
                          "VALUES (:l, 'lead', :e, :u, 'a@example.com')"),
                     [{"l": f"F-{i}", "e": NOW + timedelta(days=1),
                       "u": NOW - timedelta(hours=1)} for i in range(5)])
    pipeline.open_run("r1")
    with pytest.raises(ContractViolation, match="5 of 5 new rows"):
        pipeline.check("r1")
    with pytest.raises(RuntimeError, match="has not passed"):
        pipeline.stage("r1")
    summary = pipeline.commit("r1")
    assert summary["status"] == "contract_failed"
    assert summary["watermark_after"] is None and pipeline.state.get_watermark("meta") is None
    assert pipeline.state.lease_holder("meta") is None
    assert pipeline.state.get_run("r1", "meta")["counts"]["quarantined.future_event_time"] == 5


def test_rows_reread_by_the_lookback_do_not_count_twice(tmp_path: Path,
                                                         query_file: Path) -> None:
    pipeline = _pipeline(tmp_path, query_file, failure_min_rows=1)
    config = pipeline.config.model_copy(update={"source": pipeline.config.source.model_copy(
        update={"lookback": timedelta(hours=2)})})
    pipeline.config = config
    rows = [{"l": f"A-{i}", "c": "US", "m": "a@" if i < 3 else "a@example.com"}
            for i in range(30)]
    insert = text("INSERT INTO raw_leads (lead_id, stage, event_time, updated_at, email, "
                  "country) VALUES (:l, 'lead', :e, :u, :m, :c)")
    with pipeline.warehouse.begin() as conn:
        conn.execute(insert, [{**r, "e": NOW - timedelta(hours=2),
                               "u": NOW - timedelta(hours=1)} for r in rows])
    pipeline.open_run("r1")
    assert pipeline.check("r1")["failing_share"] == 0.1
    pipeline.stage("r1")
    pipeline.commit("r1")
    with pipeline.warehouse.begin() as conn:
        conn.execute(insert, [{"l": f"B-{i}", "c": "US", "m": "b@example.com",
                               "e": NOW - timedelta(minutes=30),
                               "u": NOW - timedelta(minutes=20)} for i in range(2)])
    pipeline.open_run("r2")
    report = pipeline.check("r2")  # 3 failing of 32 read, but none of the 2 new rows
    assert report["rows"] == 32 and report["failing_rows"] == 3
    assert report["new_rows"] == 2 and report["failing_share"] == 0.0
    assert pipeline.stage("r2")["counts"]["staged"] == 2


def test_null_updated_at_rows_are_quarantined_not_lost(tmp_path: Path, query_file: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    scans: list[str] = []
    real = quality.null_cursor_rows

    def spy(*args: Any) -> list[dict[str, Any]]:
        scans.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(quality, "null_cursor_rows", spy)
    pipeline = _pipeline(tmp_path, query_file)
    with pipeline.warehouse.begin() as conn:
        conn.execute(text("INSERT INTO raw_leads (lead_id, stage, event_time, updated_at, email) "
                          "VALUES (:l, 'lead', :e, :u, 'a@example.com')"),
                     [{"l": f"N-{i}", "e": NOW - timedelta(hours=2),
                       "u": None if i < 2 else NOW - timedelta(hours=1)} for i in range(12)])
    pipeline.open_run("r1")
    result = pipeline.check("r1")
    assert result["rows"] == 10 and result["outside_window_rows"] == 2
    assert result["quarantined"] == {"missing_updated_at": 2}
    assert pipeline.state.open_quarantine_keys("meta") == {("N-0", "lead"), ("N-1", "lead")}
    # The table was scanned once, beside the window's read (not after it, in the task).
    assert len(scans) == 1 and scans[0].startswith("null-cursor scan"), scans


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("contract", "message"), [
    ({"disabled_rules": ["bad_colour"]}, "contract.disabled_rules: unknown rule 'bad_colour'"),
    ({"disabled_rules": ["missing_column"]}, "contract.disabled_rules: 'missing_column' is "
                                             "structural"),
    ({"failure_threshold": 1.5}, "contract.failure_threshold"),
    ({"threshold": 0.1}, "contract.threshold"),
])
def test_contract_config_errors_name_the_key(contract: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(**contract)


def test_data_docs_dir_is_relative_to_leadsync_home(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("LEADSYNC_HOME", str(tmp_path))
    assert make_config().contract.data_docs_path() == tmp_path / "data_docs"
    assert make_config(data_docs_dir="docs/gx").contract.data_docs_path() == tmp_path / "docs/gx"
    assert make_config(data_docs_dir="/srv/docs").contract.data_docs_path() == Path("/srv/docs")


def test_bundled_config_is_valid() -> None:
    from leadsync.config import load_config

    config = load_config()
    assert 0 < config.contract.failure_threshold < 1


def test_gx_import_defers_scipy_stats_and_it_still_loads_on_use() -> None:
    """``import_gx`` leaves scipy.stats unloaded (GX imports it for expectations the contract
    never runs), and the first use of it loads the real module."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from leadsync.quality import import_gx\n"
        "import_gx()\n"
        "import importlib.util\n"
        "assert isinstance(sys.modules['scipy.stats'], importlib.util._LazyModule), "
        "type(sys.modules['scipy.stats'])\n"
        "assert 'scipy.stats._stats_py' not in sys.modules\n"
        "from scipy import stats\n"
        "assert abs(stats.norm.cdf(0.0) - 0.5) < 1e-12\n"
        "assert 'scipy.stats._stats_py' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"

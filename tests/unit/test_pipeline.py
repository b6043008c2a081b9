"""One destination's run: planning rows, rendering requests, and whole runs against the real
sandbox (SQLite warehouse and state)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, MetaData, select

from leadsync import demo_data
from leadsync.config import Config, DestinationConfig, parse_config
from leadsync.db import make_engine
from leadsync.destinations import meta
from leadsync.destinations.base import derive_event_id
from leadsync.pipeline import Pipeline, Planned, Rejected, plan_row, render_requests
from leadsync.sandbox.app import SandboxConfig
from leadsync.sandbox.server import SandboxServer
from leadsync.state import DELIVERED, EXPIRED, PENDING, SKIPPED, LeaseBusyError, StateStore

NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
TOKEN = "EAAB-very-secret-token"
PIXEL = "1234567890123456"
SANDBOX_TOKEN = "sandbox-meta-token"
STAGES = {"lead": "Lead", "qualified": "Marketing Qualified Lead",
          "sales_accepted": "Sales Qualified Lead", "won": "Converted"}
DEST = DestinationConfig(name="meta", type="meta", crm_name="HubSpot", stages=STAGES)
CREDS = meta.parse_credentials(None, TOKEN, {"pixel_id": PIXEL})


def row(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "lead_id": "00Q123", "stage": "qualified", "event_time": NOW - timedelta(hours=2),
        "updated_at": NOW - timedelta(hours=1), "event_id": None,
        "email": "Jane.Doe@example.com", "phone": "+1 650 555 0123", "country": "US",
        "opted_out": False,
    }
    data.update(changes)
    return data


def plan(r: dict[str, Any], now: datetime = NOW) -> Planned | Rejected:
    return plan_row(r, DEST, meta, now)


# -- plan_row -------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "reason"), [
    ({"lead_id": None}, "missing_lead_id"),
    ({"lead_id": "  "}, "missing_lead_id"),
    ({"stage": None}, "missing_stage"),
    ({"event_time": None}, "missing_event_time"),
    ({"event_time": "yesterday-ish"}, "bad_type"),
    ({"event_time": NOW + timedelta(hours=1)}, "future_event_time"),
    ({"lead_id": "x" * 200}, "bad_lead_id"),
])
def test_plan_row_quarantines_rows_that_break_the_minimal_contract(
    changes: dict[str, Any], reason: str
) -> None:
    result = plan(row(**changes))
    assert isinstance(result, Rejected)
    assert (result.status, result.reason) == ("quarantined", reason)
    assert result.detail
    assert "Jane" not in result.detail and "650" not in result.detail


def test_plan_row_stage_not_mapped() -> None:
    result = plan(row(stage="lost"))
    assert isinstance(result, Rejected)
    assert (result.status, result.reason, result.event_id) == (SKIPPED, "stage_not_mapped", None)


def test_plan_row_opted_out() -> None:
    result = plan(row(opted_out=True))
    assert isinstance(result, Rejected)
    assert (result.status, result.reason) == (SKIPPED, "opted_out")
    assert result.event_id == derive_event_id("00Q123", "qualified")
    assert result.event_name == "Marketing Qualified Lead"


def test_plan_row_event_too_old_is_expired() -> None:
    # Older than Meta's 7 days less the staging margin: never sent, recorded as expired.
    result = plan(row(event_time=NOW - timedelta(days=7) + timedelta(minutes=30)))
    assert isinstance(result, Rejected)
    assert (result.status, result.reason) == (EXPIRED, "event_too_old")
    assert result.event_id == derive_event_id("00Q123", "qualified")
    assert isinstance(plan(row(event_time=NOW - timedelta(days=6))), Planned)


def test_plan_row_respects_the_destination_max_event_age() -> None:
    dest = DEST.model_copy(update={"max_event_age": timedelta(days=2)})
    # 2 days less the 1 h staging margin: sent now, it could age out before it is retried.
    old = NOW - timedelta(days=2) + timedelta(minutes=30)
    result = plan_row(row(event_time=old), dest, meta, NOW)
    assert isinstance(result, Rejected) and result.reason == "event_too_old"
    fresh = plan_row(row(event_time=old + timedelta(hours=1)), dest, meta, NOW)
    assert isinstance(fresh, Planned)


def test_plan_row_no_match_keys_is_quarantined() -> None:
    # The contract's verdict too: rows committed after the check get the same one at stage.
    result = plan(row(email=None, phone="n/a"))
    assert isinstance(result, Rejected)
    assert (result.status, result.reason) == ("quarantined", "no_match_keys")
    assert result.event_id is None and result.detail


def test_plan_row_planned_envelope_with_derived_event_id() -> None:
    result = plan(row())
    assert isinstance(result, Planned)
    expected_id = derive_event_id("00Q123", "qualified")
    assert result.event_id == expected_id
    assert result.event_id.startswith("ls_")
    assert result.event_name == "Marketing Qualified Lead"
    assert result.envelope["event_id"] == expected_id
    assert result.envelope["event_time"] == int((NOW - timedelta(hours=2)).timestamp())
    body = result.envelope["body"]
    assert body["event_id"] == expected_id
    assert body["event_name"] == "Marketing Qualified Lead"
    assert body["action_source"] == "system_generated"
    assert "Jane" not in json.dumps(body)

    # Stable across calls, times and unrelated changes; different for another stage.
    later = plan(row(email="other@example.com"), NOW + timedelta(hours=5))
    assert isinstance(later, Planned) and later.event_id == expected_id
    other = plan(row(stage="won"))
    assert isinstance(other, Planned) and other.event_id != expected_id


def test_plan_row_uses_the_row_event_id() -> None:
    result = plan(row(event_id=" pixel-7f3a "))
    assert isinstance(result, Planned)
    assert result.event_id == "pixel-7f3a"
    assert result.envelope["body"]["event_id"] == "pixel-7f3a"
    blank = plan(row(event_id="  "))
    assert isinstance(blank, Planned) and blank.event_id == derive_event_id("00Q123",
                                                                            "qualified")


def test_plan_row_accepts_text_timestamps() -> None:
    result = plan(row(event_time="2025-06-02T10:00:00Z"))
    assert isinstance(result, Planned)
    assert result.event_time == datetime(2025, 6, 2, 10, tzinfo=UTC)


# -- render_requests ------------------------------------------------------------------------


def test_render_batches_of_at_most_1000() -> None:
    rows = [row(lead_id=f"L{i:05d}") for i in range(2500)]
    lines = list(render_requests(rows, DEST, CREDS, NOW))

    assert [len(line["body"]["data"]) for line in lines] == [1000, 1000, 500]
    for line in lines:
        assert line["destination"] == "meta"
        assert line["method"] == "POST"
        assert line["url"] == f"https://graph.facebook.com/v25.0/{PIXEL}/events"
    ids = [e["event_id"] for line in lines for e in line["body"]["data"]]
    assert len(ids) == len(set(ids)) == 2500


def test_render_honours_a_smaller_batch_size() -> None:
    dest = DEST.model_copy(update={"batch_size": 300})
    rows = [row(lead_id=f"L{i:04d}") for i in range(700)]
    sizes = [len(x["body"]["data"]) for x in render_requests(rows, dest, CREDS, NOW)]
    assert sizes == [300, 300, 100]


def test_render_skipped_lines_and_duplicates() -> None:
    rows = [
        row(lead_id="A"),
        row(lead_id="B", stage="lost"),
        row(lead_id="C", opted_out=True),
        row(lead_id=None),
        row(lead_id="D", event_id="shared-id"),
        row(lead_id="E", event_id="shared-id"),
        row(lead_id="A"),  # the same (lead, stage) twice
        row(lead_id="F", email=None, phone=None),
    ]
    lines = list(render_requests(rows, DEST, CREDS, NOW))
    skipped = [line["skipped"] for line in lines if "skipped" in line]
    requests_ = [line for line in lines if "body" in line]

    assert [(s["lead_id"], s["reason"]) for s in skipped] == [
        ("B", "stage_not_mapped"), ("C", "opted_out"), (None, "missing_lead_id"),
        ("E", "duplicate_event_id"), ("A", "duplicate_event_id"), ("F", "no_match_keys")]
    assert len(requests_) == 1
    assert [e["event_id"] for e in requests_[0]["body"]["data"]] == [
        derive_event_id("A", "qualified"), "shared-id"]


def test_render_masks_secrets() -> None:
    lines = list(render_requests([row(lead_id=f"L{i}") for i in range(3)], DEST, CREDS, NOW))
    text = json.dumps(lines)
    assert TOKEN not in text
    assert lines[0]["body"]["access_token"] == "***"
    assert "jane" not in text.lower()  # identifiers hashed


def test_render_of_nothing() -> None:
    assert list(render_requests([], DEST, CREDS, NOW)) == []


def test_render_with_the_contract_disabled_shows_what_a_run_sends() -> None:
    """With contract.enabled false, render must not apply the contract a run skips."""
    config = parse_config({"contract": {"enabled": False},
                           "destinations": [DEST.model_dump(exclude_defaults=True)]})
    rows = [row(lead_id="A", stage="won", value=100, currency="US$")]
    without = list(render_requests(rows, DEST, CREDS, NOW))
    assert "body" in without[0]  # what stage + push do with the contract disabled
    assert list(render_requests(rows, DEST, CREDS, NOW, config=config)) == without


# -- whole runs against the sandbox ---------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig(meta_tokens={SANDBOX_TOKEN}, meta_pixels={PIXEL})) as srv:
        yield srv


def make_config(retry: dict[str, Any] | None = None, **state: Any) -> Config:
    return parse_config({
        "source": {"lookback": "2h", "settle_lag": "2m", "chunk_size": 97, "page_size": 500},
        "state": {"lease_ttl": "5m", "lease_wait": "0.2s", **state},
        # The data contract (Great Expectations) is not under test here; its crash guard is.
        "contract": {"enabled": False},
        "destinations": [{"name": "meta", "type": "meta", "crm_name": "HubSpot",
                          "stages": STAGES, "retry": {"attempts": 3, **(retry or {})}}],
    })


@dataclass
class World:
    sandbox: SandboxServer
    warehouse: Engine
    store: StateStore
    config: Config

    def pipeline(self) -> Pipeline:
        creds = meta.parse_credentials(self.sandbox.url, SANDBOX_TOKEN, {"pixel_id": PIXEL})
        return Pipeline(self.config, self.config.destinations[0], self.store, self.warehouse,
                        credentials=lambda: creds, sleep=lambda s: None)

    def stats(self) -> dict[str, int]:
        return dict(requests.get(f"{self.sandbox.url}/_sandbox/stats", timeout=10).json()["meta"])

    def sandbox_ids(self) -> list[str]:
        events = requests.get(f"{self.sandbox.url}/_sandbox/meta/events", timeout=10).json()
        return [e["event_id"] for e in events]

    def fault(self, **fault: Any) -> None:
        resp = requests.post(f"{self.sandbox.url}/_sandbox/faults", timeout=10,
                             json={"platform": "meta", "faults": [fault]})
        resp.raise_for_status()

    def ledger(self) -> dict[str, str]:
        return {r["event_id"]: r["status"] for r in self.store.ledger_rows("meta")}

    def rows(self) -> list[dict[str, Any]]:
        table = demo_data.lead_stages_table(MetaData())
        with self.warehouse.connect() as conn:
            return [dict(r) for r in conn.execute(select(table)).mappings()]

    def eligible(self, now: datetime) -> set[str]:
        dest = self.config.destinations[0]
        return {p.event_id for p in (plan_row(r, dest, meta, now) for r in self.rows())
                if isinstance(p, Planned)}

    def add(self, n: int) -> None:
        lag = self.config.source.settle_lag + timedelta(seconds=1)
        demo_data.add_changes(self.warehouse, n, datetime.now(UTC) - lag, seed=n)


@pytest.fixture
def world(sandbox: SandboxServer, tmp_path: Path) -> Iterator[World]:
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=10).raise_for_status()
    warehouse = make_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    state = make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    demo_data.seed(warehouse, 250, datetime.now(UTC))
    yield World(sandbox, warehouse, StateStore(state), make_config())
    warehouse.dispose()
    state.dispose()


def test_first_run_delivers_every_eligible_row_and_the_second_sends_nothing(world: World) -> None:
    expected = world.eligible(datetime.now(UTC))
    assert len(expected) > 300

    summary = world.pipeline().run("run-1")

    assert summary["status"] == "success"
    assert "errors" not in summary
    ledger = world.ledger()
    delivered = {k for k, v in ledger.items() if v == DELIVERED}
    assert delivered == expected
    assert PENDING not in ledger.values()
    stats = world.stats()
    assert stats["unique_events"] == len(delivered)
    assert stats["duplicate_events"] == 0
    assert set(world.sandbox_ids()) == delivered
    counts = summary["counts"]
    assert counts["delivered"] == counts["acknowledged"] == len(expected)
    assert counts["read"] == len(world.rows())
    assert world.store.summary(["meta"])["meta"]["expired"] == Counter(ledger.values())[EXPIRED]
    assert summary["watermark_after"] is not None

    second = world.pipeline().run("run-2")
    assert second["status"] == "success"
    assert world.stats()["requests"] == stats["requests"]  # nothing sent
    assert second["counts"].get("sent", 0) == 0
    assert second["watermark_after"] == summary["watermark_after"]
    assert world.stats()["unique_events"] == len(delivered)


def test_new_rows_are_sent_exactly_once(world: World) -> None:
    world.pipeline().run("run-1")
    before = set(world.sandbox_ids())
    eligible_before = world.eligible(datetime.now(UTC))

    world.add(25)
    new = world.eligible(datetime.now(UTC)) - eligible_before
    assert 15 <= len(new) <= 25
    summary = world.pipeline().run("run-2")

    after = world.sandbox_ids()
    assert set(after) - before == new
    assert len(after) == len(set(after))  # nothing twice
    assert summary["counts"]["delivered"] == len(new)
    assert world.stats()["duplicate_events"] == 0


def test_transient_fault_is_retried_and_delivered_once(world: World) -> None:
    world.pipeline().run("run-1")
    world.add(10)
    world.fault(kind="graph_error", code=2, is_transient=True, times=1)

    summary = world.pipeline().run("run-2")

    assert summary["status"] == "success"
    assert summary["counts"]["retries"] == 1
    assert summary["counts"]["delivered"] >= 5
    stats = world.stats()
    assert stats["faulted_requests"] == 1
    assert stats["duplicate_events"] == 0
    assert PENDING not in world.ledger().values()
    ids = world.sandbox_ids()
    assert len(ids) == len(set(ids))


def test_fatal_fault_holds_the_batch_and_the_watermark_until_it_clears(world: World) -> None:
    world.pipeline().run("run-1")
    watermark = world.store.get_watermark("meta")
    assert watermark is not None
    delivered_before = set(world.sandbox_ids())
    world.add(10)
    world.fault(kind="graph_error", code=190, is_transient=False, times=1)

    failed = world.pipeline().run("run-2")

    assert failed["status"] == "partial"
    assert failed["pending_batches"] == 1
    assert any("190" in e for e in failed["errors"])
    assert world.store.get_watermark("meta") == watermark  # held before the pending batch
    pending = {k for k, v in world.ledger().items() if v == PENDING}
    assert 5 <= len(pending) <= 10
    assert set(world.sandbox_ids()) == delivered_before  # nothing of it was accepted

    cleared = world.pipeline().run("run-3")

    assert cleared["status"] == "success"
    assert cleared["pending_batches"] == 0
    assert {k for k, v in world.ledger().items() if v == PENDING} == set()
    assert set(world.sandbox_ids()) == delivered_before | pending
    assert world.stats()["duplicate_events"] == 0
    after = world.store.get_watermark("meta")
    assert after is not None and after.ts > watermark.ts


def test_a_cleared_push_task_never_sends_a_batch_twice(world: World) -> None:
    pipeline = world.pipeline()
    pipeline.open_run("run-1")
    pipeline.check("run-1")
    staged = pipeline.stage("run-1")
    assert staged["batch_ids"]
    for batch_id in staged["batch_ids"]:
        assert pipeline.push("run-1", batch_id)["delivered"] > 0
    requests_before = world.stats()["requests"]

    for batch_id in staged["batch_ids"]:  # Airflow retries or a user clears the tasks
        assert pipeline.push("run-1", batch_id) == {}
    pipeline.commit("run-1")

    assert world.stats()["requests"] == requests_before
    assert world.stats()["duplicate_events"] == 0


def test_a_response_lost_after_processing_is_resent_with_the_same_ids(world: World) -> None:
    world.config = make_config(retry={"timeout": "0.3s"})
    world.pipeline().run("run-1")
    world.add(10)
    world.fault(kind="timeout_after_processing", delay_s=1.0, times=1)

    summary = world.pipeline().run("run-2")

    assert summary["status"] == "success"
    assert summary["counts"]["retries"] == 1
    stats = world.stats()
    # The platform got the batch twice and deduplicated it by event id (G2).
    assert stats["duplicate_events"] == summary["counts"]["delivered"] > 0
    assert stats["unique_events"] == len(set(world.sandbox_ids()))
    assert {v for v in world.ledger().values()} <= {DELIVERED, EXPIRED, SKIPPED}


def test_known_bad_rows_do_not_stop_later_runs(sandbox: SandboxServer, tmp_path: Path) -> None:
    """Rows quarantined by an earlier run and re-read by the lookback must not trip the
    breaker again: a small window would be mostly known-bad rows, and nothing would be sent
    run after run."""
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=10).raise_for_status()
    warehouse = make_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    store = StateStore(make_engine(f"sqlite:///{tmp_path / 'state.db'}"))
    demo_data.seed(warehouse, 150, datetime.now(UTC), broken_rows=True)
    config = parse_config({
        "source": {"lookback": "2h", "settle_lag": "2m"},
        "contract": {"data_docs": False},  # the default breaker: 20% of the window
        "destinations": [{"name": "meta", "type": "meta", "crm_name": "HubSpot",
                          "stages": STAGES}]})
    world = World(sandbox, warehouse, store, config)

    first = world.pipeline().run("run-1")
    assert first["status"] == "success"
    # 8 broken rows + one whose only match key is a mistyped email (no_match_keys); its
    # twin with a good phone, and the row with a hashed email, are sent.
    assert store.summary(["meta"])["meta"]["quarantined"] == 9

    second = world.pipeline().run("run-2")  # nothing changed upstream
    assert second["status"] == "success"


def test_a_second_run_of_the_same_destination_is_refused(world: World) -> None:
    first, second = world.pipeline(), world.pipeline()
    first.open_run("run-a")

    with pytest.raises(LeaseBusyError) as info:
        second.open_run("run-b")
    assert "run-a" in str(info.value)

    first.commit("run-a")  # frees the lease
    second.open_run("run-b")
    assert world.store.lease_holder("meta") == "run-b"


def test_a_run_that_lost_its_lease_stops(world: World) -> None:
    config = make_config(lease_ttl="0.05s")
    world.config = config
    first = world.pipeline()
    first.open_run("run-a")
    import time

    time.sleep(0.1)
    world.pipeline().open_run("run-b")  # the expired lease is taken over

    with pytest.raises(LeaseBusyError, match="run-b"):
        first.stage("run-a")

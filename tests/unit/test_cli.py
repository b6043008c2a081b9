"""The ``leadsync`` command: render (payload preview) and state show.

``render`` reads connections through the Airflow SDK hook, so these tests import Airflow
indirectly (the CLI does); they never run a DAG.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from leadsync import cli
from leadsync.destinations.base import derive_event_id

NOW = "2025-06-02T12:00:00Z"
PIXEL = "1234567890123456"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty LEADSYNC_HOME, no leadsync connections, the bundled config."""
    home = tmp_path / "home"
    monkeypatch.setenv("LEADSYNC_HOME", str(home))
    monkeypatch.delenv("LEADSYNC_CONFIG", raising=False)
    for key in list(os.environ):
        if key.startswith("AIRFLOW_CONN_LEADSYNC"):
            monkeypatch.delenv(key)
    return home


def stdin(monkeypatch: pytest.MonkeyPatch, *lines: Any) -> None:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines)
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


def row(lead_id: str, stage: str = "qualified", **changes: Any) -> dict[str, Any]:
    data = {"lead_id": lead_id, "stage": stage, "event_time": "2025-06-02T10:00:00Z",
            "updated_at": "2025-06-02T10:05:00Z", "email": "Jane.Doe@Example.com",
            "phone": "+1 650 555 0123", "country": "US"}
    data.update(changes)
    return data


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, [line for line in out.splitlines() if line.strip()], err


def test_render_prints_the_request_and_skipped_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin(monkeypatch, row("00QA"), "", row("00QB", stage="lost"), row("00QC"))

    code, lines, err = run(capsys, "render", "--destination", "meta", "--now", NOW)

    assert code == 0, err
    items = [json.loads(line) for line in lines]
    requests_ = [i for i in items if "body" in i]
    skipped = [i["skipped"] for i in items if "skipped" in i]
    assert len(requests_) == 1
    request = requests_[0]
    assert request["destination"] == "meta"
    assert request["method"] == "POST"
    assert request["url"] == f"https://graph.facebook.com/v25.0/{PIXEL}/events"
    assert request["body"]["access_token"] == "***"
    events = request["body"]["data"]
    assert [e["event_id"] for e in events] == [derive_event_id("00QA", "qualified"),
                                               derive_event_id("00QC", "qualified")]
    assert events[0]["event_time"] == 1748858400  # 2025-06-02T10:00:00Z
    assert events[0]["action_source"] == "system_generated"
    assert len(skipped) == 1
    assert skipped[0]["lead_id"] == "00QB"
    assert skipped[0]["stage"] == "lost"
    assert skipped[0]["reason"] in ("unknown_stage", "stage_not_mapped")
    text = "\n".join(lines)
    assert "jane" not in text.lower() and "555 0123" not in text


def test_render_masks_the_real_connection_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "EAAG-real-token-that-must-not-leak"
    monkeypatch.setenv("AIRFLOW_CONN_LEADSYNC_META", json.dumps({
        "conn_type": "http", "host": "https://graph.facebook.com", "password": secret,
        "extra": {"pixel_id": "998877665544", "api_version": "v24.0"}}))
    stdin(monkeypatch, row("00QA"))

    code, lines, err = run(capsys, "render", "--destination", "meta", "--now", NOW)

    assert code == 0, err
    assert len(lines) == 1
    request = json.loads(lines[0])
    assert request["url"] == "https://graph.facebook.com/v24.0/998877665544/events"
    assert request["body"]["access_token"] == "***"
    assert secret not in lines[0] and secret not in err


def stdin_bytes(monkeypatch: pytest.MonkeyPatch, *lines: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n".join(lines) + b"\n")))


def test_render_treats_each_line_on_its_own(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    canary = "Qzx7Canary"
    good = json.dumps(row("00QA")).encode()
    stdin_bytes(
        monkeypatch,
        good,
        b'{"lead_id": "00QB", "first_name": "' + canary.encode() + b'\xff"}',  # not UTF-8
        ('{"lead_id": "00QC", "first_name": "' + canary + '\\ud83d"}').encode(),  # surrogate
        b'{"lead_id": "00QD", ',  # cut short
        b"[1, 2]",
        b"",
        json.dumps(row("00QE")).encode(),
    )

    code, lines, err = run(capsys, "render", "--destination", "meta", "--now", NOW)

    assert code == 0, err
    items = [json.loads(line) for line in lines]
    skipped = [i["skipped"] for i in items if "skipped" in i]
    assert [(s["line"], s["reason"]) for s in skipped] == [
        (2, "undecodable_line"), (3, "unencodable_text"), (4, "invalid_json"),
        (5, "not_a_json_object")]
    (request,) = [i for i in items if "body" in i]
    assert [e["event_id"] for e in request["body"]["data"]] == [
        derive_event_id("00QA", "qualified"), derive_event_id("00QE", "qualified")]
    assert canary not in "\n".join(lines) + err


def test_render_bad_now_exits_2(monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    stdin(monkeypatch, row("00QA"))
    code, _, err = run(capsys, "render", "--destination", "meta", "--now", "last tuesday")
    assert code == 2
    assert "--now" in err and err.count("\n") == 1


def test_render_unknown_destination_names_the_known_ones(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin(monkeypatch, row("00QA"))

    code, lines, err = run(capsys, "render", "--destination", "myspace", "--now", NOW)

    assert code == 2
    assert lines == []
    assert err.count("\n") == 1
    assert "'myspace'" in err
    assert "known:" in err and "meta" in err


def test_state_show_json_on_an_empty_home(capsys: pytest.CaptureFixture[str],
                                          isolated: Path) -> None:
    code, lines, err = run(capsys, "state", "show", "--json")

    assert code == 0, err
    data = json.loads("\n".join(lines))
    assert set(data) == {"destinations"}
    assert "meta" in data["destinations"]
    for summary in data["destinations"].values():
        assert summary == {"watermark": None, "delivered": 0, "pending": 0, "failed": 0,
                           "expired": 0, "skipped": 0, "quarantined": 0,
                           "last_run_identifiers_dropped": {}}
    assert (isolated / "state.db").exists()  # the embedded store, under LEADSYNC_HOME


def test_state_show_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = run(capsys, "state", "show")
    assert code == 0
    assert any(line.startswith("meta: watermark none; delivered 0") for line in lines)


def test_state_show_names_the_identifiers_the_last_run_left_out(
    capsys: pytest.CaptureFixture[str], isolated: Path
) -> None:
    from datetime import UTC, datetime

    from leadsync.db import make_engine
    from leadsync.state import StateStore

    isolated.mkdir(parents=True, exist_ok=True)
    store = StateStore(make_engine(f"sqlite:///{isolated / 'state.db'}"))
    store.migrate()
    store.start_run("r1", "meta", None, datetime.now(UTC), None)
    store.set_run_counts("r1", "meta", {"identifiers_dropped": 3,
                                        "identifiers_dropped.email.bad_email": 2,
                                        "identifiers_dropped.phone.bad_phone": 1})
    code, lines, _ = run(capsys, "state", "show")
    assert code == 0
    assert ("  last run left out unusable identifiers (rows sent on their other match keys): "
            "email.bad_email=2, phone.bad_phone=1") in lines
    code, lines, _ = run(capsys, "state", "show", "--json")
    dropped = json.loads("\n".join(lines))["destinations"]["meta"]["last_run_identifiers_dropped"]
    assert dropped == {"email.bad_email": 2, "phone.bad_phone": 1}

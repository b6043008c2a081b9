"""What crosses the pipe to a stage worker: the planned rows of an ``add`` call, encoded column
by column, come back exactly as the task planned them, whatever type the warehouse gave
their lead ids; the worker's inbox reads ahead no further than its bound."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from leadsync import stage_wire, stage_worker
from leadsync.contract_worker import _write_frame
from leadsync.pipeline import _NO_BODY, Planned, Rejected, _Item
from leadsync.state import Cursor
from leadsync.state.model import _cursor_json

T0 = datetime(2025, 6, 2, 12, 0, 0, 123456, tzinfo=UTC)
# Every type a warehouse can give a lead id in, and ints that msgpack cannot carry.
LEAD_IDS: list[Any] = [
    "00Q1", 42, -7, (1 << 64) - 1, -(1 << 63), 1 << 70, -(1 << 64), Decimal("12.0"),
    Decimal("1.5"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"), 3.25, True, None, b"\x00raw",
    "a" * 200,
]

ZONED: dict[int, timezone | None] = {1: timezone(timedelta(hours=2)), 2: None}


def _items(start: int = 10) -> list[_Item]:
    """Planned and rejected rows, the way _StagePass.take builds them: each row's prev is the
    row before's cursor, except after a settled row it skipped (here: every fourth)."""
    items: list[_Item] = []
    prev: Cursor | None = Cursor(T0 - timedelta(days=1), Decimal("99"), "won")
    names = [frozenset({"email", "phone"}), frozenset(), frozenset({"email"})]
    for n, lead in enumerate(LEAD_IDS):
        ts = T0 + timedelta(seconds=n)
        if n in ZONED:  # the warehouse's own zone, or none: back as they were, not in UTC
            ts = ts.astimezone(ZONED[n]) if ZONED[n] else ts.replace(tzinfo=None)
        cursor = Cursor(ts, lead, f"stage{n % 3}")
        if n % 4 == 3:
            prev = Cursor(T0 + timedelta(seconds=n, microseconds=-1), f"settled{n}", "lead")
        text = str(lead)[:128]
        stage = cursor.stage if n != 5 else "x" * 64
        qkey = (text, stage) if n != 6 else (text.replace("1", "\ufffd"), stage)
        event_id = f"ls_{n:032x}"
        plan: Planned | Rejected
        envelope: dict[str, Any] | None
        if n % 5 == 4:
            plan = Rejected("too_old", "expired", f"detail {n}", event_id, "Lead",
                            T0 - timedelta(days=n))
            envelope = None
        elif n == 8:
            plan = Rejected("no_match_keys", "skipped")
            envelope = None
        else:
            plan = Planned(event_id, "Lead", T0 - timedelta(hours=n), _NO_BODY)
            envelope = {"event_id": event_id,
                        "event_time": int(plan.event_time.timestamp()),
                        "body": msgspec.Raw(json.dumps({"n": n, "h": "e3b0" * n}).encode())}
        items.append(_Item(start + n, cursor, prev, text, stage, qkey, plan, envelope,
                           names[n % 3]))
        prev = cursor
    return items


def _fields(item: _Item) -> tuple[Any, ...]:
    envelope = None if item.envelope is None else (
        item.envelope["event_id"], item.envelope["event_time"],
        bytes(memoryview(item.envelope["body"])))
    cursors = [(c, type(c.lead_id), c.ts.isoformat(), _cursor_json(c)) if c is not None else None
               for c in (item.cursor, item.prev)]
    return (item.position, cursors, item.lead_id, item.stage, item.qkey, item.plan,
            type(item.plan), envelope, item.keys)


def test_planned_rows_cross_exactly_whatever_their_lead_id_type() -> None:
    items = _items()
    frame = stage_wire.frame(("add", items))
    method, back = stage_wire.message(bytes(frame))
    assert method == "add"
    assert [_fields(item) for item in back] == [_fields(item) for item in items]
    # The row after a planned one takes that row's cursor as prev, as it did in the task.
    assert back[1].prev is back[0].cursor


def test_other_calls_and_an_empty_add_cross_too() -> None:
    message = ("verdicts", [], [3, 4], 100)
    assert stage_wire.message(bytes(stage_wire.frame(message))) == message
    assert stage_wire.message(bytes(stage_wire.frame(("add", [])))) == ("add", [])


def test_rows_out_of_order_are_refused() -> None:
    items = _items()
    with pytest.raises(ValueError, match="consecutive"):
        stage_wire.encode_rows([items[0], items[2]])


def test_the_inbox_reads_ahead_up_to_its_bound_then_leaves_the_rest_in_the_pipe() -> None:
    read_end, write_end = os.pipe()
    frames = [bytes([n]) * 8 for n in range(4)]
    writer = threading.Thread(target=lambda: [_write_frame(write_end, f) for f in frames])
    writer.start()
    inbox = stage_worker._Inbox(read_end, limit=20)  # two frames fit, not three
    try:
        deadline = time.monotonic() + 5
        while len(inbox.frames) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # time enough to read a third, were it allowed
        assert list(inbox.frames) == frames[:2]
        assert [inbox.get() for _ in frames] == frames
        writer.join(timeout=5)
        os.close(write_end)
        write_end = -1
        assert inbox.get() is None  # end of file
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)

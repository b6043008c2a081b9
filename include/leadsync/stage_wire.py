"""What crosses the pipe to a stage worker (:mod:`leadsync.stage_worker`): its calls, each the
body of one frame.

The bulk, the planned rows of ``add`` calls, crosses column by column in msgpack
(:func:`encode_rows`): pickling each row's objects (a Cursor dataclass, a Planned struct, an
envelope dict around a ``msgspec.Raw`` body, a frozenset) cost the task 7 µs a row of its
CPU, these columns under 1 µs; decoding them costs the worker less than unpickling did. The
other calls are few and small: pickled.
"""

from __future__ import annotations

import pickle
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any

import msgspec

from leadsync.pipeline import _NO_BODY, Planned, Rejected, _Item
from leadsync.state import Cursor

# A frame's first byte: the planned rows of an ``add`` call (msgpack), or a pickled call.
_ROWS = b"r"
_PICKLED = b"p"
# Cursors cross as msgpack values when it gives them back exactly: lead ids that are text or
# 64-bit integers, times in UTC or naive (msgpack has another zone's times back in UTC). The
# others (Decimal, UUID, ... lead ids) are pickled.
_INT64 = (-(1 << 63), (1 << 64) - 1)


class _Rows(msgspec.Struct, array_like=True, gc=False):
    """The planned rows of one ``add`` call, column by column (see :func:`encode_rows`)."""

    first: int  # the first row's position; the others follow it
    cursors: list[Cursor]  # those msgpack would change (see _INT64) are placeholders here
    lead_ids: list[str]
    event_ids: list[str | None]
    event_names: list[str | None]
    event_times: list[datetime | None]
    unix_times: list[int]  # the envelope's event_time (0: no envelope)
    ends: list[int]  # where each row's encoded event body ends in ``bodies``
    bodies: memoryview
    keys: list[int]  # index of the row's identifier names in ``key_sets``
    key_sets: list[frozenset[str]]
    rejected: list[tuple[int, str, str, str]]  # index, reason, status, detail
    # Pickled: the rare values the columns above would not give back exactly, by index: the
    # cursors msgpack would change, each ``prev`` that is not the row before's cursor, each
    # stage and quarantine key that differs from the cursor's stage and (lead id, stage).
    exceptions: bytes


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_Rows)


def encode_rows(items: list[_Item]) -> bytearray:
    """An ``add`` call's frame: the rows' columns (consecutive positions, as planned)."""
    cursors = [item.cursor for item in items]
    odd = {n: cursor for n, cursor in enumerate(cursors)
           if ((lead := cursor.lead_id).__class__ is not str
               and not (lead.__class__ is int and _INT64[0] <= lead <= _INT64[1]))
           or ((zone := cursor.ts.tzinfo) is not UTC and zone is not None)}
    plain = list(cursors)
    for n, cursor in odd.items():
        plain[n] = Cursor(cursor.ts, None, cursor.stage)
    prevs = {n: item.prev for n, item in enumerate(items)
             if n == 0 or item.prev is not cursors[n - 1]}
    stages = {n: item.stage for n, item in enumerate(items) if item.stage != item.cursor.stage}
    qkeys = {n: item.qkey for n, item in enumerate(items)
             if item.qkey[0] != item.lead_id or item.qkey[1] != item.stage}
    plans = [item.plan for item in items]
    envelopes = [item.envelope for item in items]
    key_index: dict[frozenset[str], int] = {}
    rows = _Rows(
        items[0].position if items else 0, plain, [item.lead_id for item in items],
        [plan.event_id for plan in plans], [plan.event_name for plan in plans],
        [plan.event_time for plan in plans],
        [0 if envelope is None else envelope["event_time"] for envelope in envelopes],
        list(accumulate(0 if envelope is None else len(envelope["body"])
                        for envelope in envelopes)),
        memoryview(b"".join(envelope["body"] for envelope in envelopes if envelope is not None)),
        [key_index.setdefault(item.keys, len(key_index)) for item in items], list(key_index),
        [(n, plan.reason, plan.status, plan.detail) for n, plan in enumerate(plans)
         if isinstance(plan, Rejected)],
        pickle.dumps((odd, prevs, stages, qkeys), protocol=pickle.HIGHEST_PROTOCOL))
    if items and items[-1].position - rows.first != len(items) - 1:
        raise ValueError("planned rows cross in the order planned: consecutive positions")
    frame = bytearray(_ROWS)
    _ENCODER.encode_into(rows, frame, 1)
    return frame


def decode_rows(body: memoryview) -> list[_Item]:
    """The rows of an ``add`` frame (after its first byte), as :func:`encode_rows` had them;
    their event bodies are views of ``body``."""
    rows = _DECODER.decode(body)
    odd, prevs, stages, qkeys = pickle.loads(rows.exceptions)  # noqa: S301 - our own process
    cursors = rows.cursors
    for n, cursor in odd.items():
        cursors[n] = cursor
    rejected = {n: (reason, status, detail) for n, reason, status, detail in rows.rejected}
    key_sets, bodies = rows.key_sets, rows.bodies
    items: list[_Item] = []
    prev: Cursor | None = None
    start = 0
    for n, (cursor, lead_id, event_id, name, time_, unix, end, key) in enumerate(zip(
            cursors, rows.lead_ids, rows.event_ids, rows.event_names, rows.event_times,
            rows.unix_times, rows.ends, rows.keys, strict=True)):
        if n in prevs:
            prev = prevs[n]
        stage = stages.get(n, cursor.stage)
        why = rejected.get(n)
        plan: Planned | Rejected
        if why is None:
            assert event_id is not None and name is not None and time_ is not None
            plan = Planned(event_id, name, time_, _NO_BODY)
            envelope: dict[str, Any] | None = {
                "event_id": event_id, "event_time": unix, "body": msgspec.Raw(bodies[start:end])}
        else:
            plan = Rejected(why[0], why[1], why[2], event_id, name, time_)
            envelope = None
        start = end
        items.append(_Item(rows.first + n, cursor, prev, lead_id, stage,
                           qkeys.get(n) or (lead_id, stage), plan, envelope, key_sets[key]))
        prev = cursor
    return items


def frame(message: tuple[Any, ...]) -> bytes | bytearray:
    """A call of :class:`leadsync.stage_worker.RemoteStager` as the body of a frame."""
    if message[0] == "add":
        return encode_rows(message[1])
    return _PICKLED + pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def message(body: bytes) -> tuple[Any, ...]:
    """The call a frame's body carries (inverse of :func:`frame`)."""
    view = memoryview(body)[1:]
    if body[:1] == _ROWS:
        return ("add", decode_rows(view))
    call: tuple[Any, ...] = pickle.loads(view)  # noqa: S301 - our own process
    return call

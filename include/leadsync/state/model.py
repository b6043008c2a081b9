"""What the state store's parts share: statuses, the source cursor, and the records they
read and write (no raw identifiers: ids, rule codes and hashed payloads only)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine

# Ledger statuses. Terminal ones end an event's life for normal runs; only the reprocess DAG
# sends a delivered or failed event again (with the same id, which the platform dedups).
PENDING = "pending"  # staged in an outbox batch, not yet acknowledged
DELIVERED = "delivered"  # acknowledged by the platform
FAILED = "failed"  # permanently rejected: a dead letter with the platform's error
EXPIRED = "expired"  # outside the platform's age window; never sent
SKIPPED = "skipped"  # not eligible (opted out, no match keys, ...)
TERMINAL = frozenset({DELIVERED, FAILED, EXPIRED, SKIPPED})
# Skipped/expired events are looked at again when the source row changes (its cursor moves).
REEVALUATE = frozenset({EXPIRED, SKIPPED})

# A failed event's ledger reason is one of these. On Postgres, dead letters are found through
# them (ix_ls_ledger_failed, see schema._migration_hot_ledger): the ledger keeps no index on
# its status, so that a delivery rewrites its row in place. A new kind of failure adds its
# reason here; EventOutcome refuses any other.
REJECTED = "rejected"  # the platform refused the event
ACK_MISMATCH = "ack_mismatch"  # the platform acknowledged fewer events than were sent
REQUEST_FAILED = "request_failed"  # an accepted request whose processing failed later
FAILED_REASONS = (REJECTED, ACK_MISMATCH, REQUEST_FAILED)
# A delivered event that carries the platform's request id (detail) to look up later.
RECEIPT = "receipt"

BATCH_PENDING = "pending"
BATCH_DONE = "done"
# Staged by a run whose data contract has not passed yet: never pushed. Released (pending)
# when the whole window passed, discarded when the breaker trips or the run died before.
BATCH_HELD = "held"


@dataclass(frozen=True, order=True)
class Cursor:
    """Position in the source stream: (updated_at, lead_id, stage)."""

    ts: datetime
    lead_id: Any
    stage: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (lead_id keeps its warehouse type)."""
        return {"updated_at": self.ts.isoformat(), "lead_id": json_lead_id(self.lead_id),
                "stage": self.stage}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cursor:
        """Inverse of :meth:`as_dict`."""
        return cls(datetime.fromisoformat(data["updated_at"]), data["lead_id"], data["stage"])


def utcnow() -> datetime:
    """The current time, UTC-aware."""
    return datetime.now(UTC)


def _cursor_json(cursor: Cursor | None) -> str | None:
    return json.dumps(cursor.as_dict()) if cursor else None


def _cursor_from_json(text: str | None) -> Cursor | None:
    return Cursor.from_dict(json.loads(text)) if text else None


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger knows of one event."""

    status: str
    source_ts: datetime


@dataclass(frozen=True)
class LedgerRecord:
    """One ledger row to write."""

    event_id: str
    lead_id: str
    stage: str
    event_name: str | None
    status: str
    source_ts: datetime
    event_time: datetime | None = None
    reason: str | None = None
    detail: str | None = None
    batch_id: str | None = None


@dataclass(frozen=True)
class StagedBatch:
    """An outbox batch to write: its envelopes and their pending ledger rows (written with
    this batch's id), and the cursor of the last row read before its first event."""

    batch_id: str
    seq: int
    events: list[dict[str, Any]]
    records: Sequence[LedgerRecord]
    prev_cursor: Cursor | None


@dataclass(frozen=True)
class Batch:
    """One outbox batch: one platform request, repeatable without duplicates.

    ``events`` are envelopes ``{"event_id", "event_time", "body"}``; the body is a dict, or
    its stored JSON (``msgspec.Raw``) when the batch was loaded with ``raw_bodies``.
    """

    batch_id: str
    destination: str
    run_id: str | None
    status: str
    events: list[dict[str, Any]]
    attempts: int
    prev_cursor: Cursor | None


@dataclass(frozen=True)
class EventOutcome:
    """The outcome of one event of a batch."""

    status: str  # DELIVERED, FAILED, EXPIRED or PENDING (retry later)
    reason: str | None = None
    detail: str | None = None

    def __post_init__(self) -> None:
        if self.status == FAILED and self.reason not in FAILED_REASONS:
            raise ValueError(f"a failed event's reason is one of {FAILED_REASONS}, "
                             f"not {self.reason!r}")


@dataclass(frozen=True)
class QuarantineRecord:
    """A source row that broke the data contract (no raw identifiers: ids and rule only)."""

    lead_id: str
    stage: str
    rule: str
    detail: str
    source_ts: datetime | None


class LeaseBusyError(RuntimeError):
    """Another run holds the destination's lease."""



class StorePart:
    """Base of the state store's parts: each is one job over the one engine."""

    engine: Engine


def json_lead_id(value: Any) -> Any:
    """A warehouse lead id in the form the state store keeps (JSON): text and integers as
    they are; other types (Postgres uuid, numeric, ...) as an integer when integral, else as
    text, which the warehouse compares with the column's own type again."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, Decimal):
        finite = value.is_finite()
    elif isinstance(value, float):
        finite = math.isfinite(value)
    else:
        return str(value)  # uuid.UUID and other types with a canonical text form
    return int(value) if finite and value == int(value) else str(value)


def _cursor_key(cursor: Cursor) -> tuple[datetime, str, str]:
    # lead_id can be int or str in the warehouse; compare like with like, falling back to str,
    # in the stored form so that a cursor read now and one decoded from JSON agree.
    lead = json_lead_id(cursor.lead_id)
    return (cursor.ts, f"{lead:020d}" if isinstance(lead, int) else str(lead), cursor.stage)


def _event_key(event: Mapping[str, Any]) -> str:
    return str(event["event_id"])

"""One run of one destination: open → stage (extract, check, build, outbox) → push → commit.

Each step is a method that an Airflow task calls (``dags/``) and that tests and the CLI call
directly. Steps hand each other nothing but the run id and batch ids: every row, event and
outcome lives in the state store, so any step can be retried or run on another worker.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec
from sqlalchemy import Engine

from leadsync import quality
from leadsync.config import Config, DestinationConfig
from leadsync.delivery import BatchSender, DeliveryReport, summarize
from leadsync.destinations import get_destination
from leadsync.destinations.base import Destination, HttpRequest, Skip, derive_event_id
from leadsync.destinations.http import HttpClient, encode_event
from leadsync.faults import crash_point
from leadsync.hashing import sha256
from leadsync.monitor.coverage import Coverage
from leadsync.source import REQUIRED_COLUMNS, Source, UnreadableRow, Window, plan_window
from leadsync.state import (
    BATCH_HELD,
    DELIVERED,
    EXPIRED,
    FAILED,
    PENDING,
    REEVALUATE,
    SKIPPED,
    Batch,
    Cursor,
    LeaseBusyError,
    LedgerEntry,
    LedgerRecord,
    QuarantineRecord,
    StagedBatch,
    StateStore,
    utcnow,
)

if TYPE_CHECKING:
    from leadsync.stage_worker import RemoteStager

log = logging.getLogger(__name__)

# ls_runs.status of a run whose contract check is under way, failed its breaker, or never
# finished; stage refuses such a run and commit closes it without moving the watermark.
RUN_RUNNING = "running"
RUN_CHECKING = "checking"
RUN_CONTRACT_FAILED = "contract_failed"
RUN_CHECK_FAILED = "check_failed"
# ls_runs counter of identifiers the check found unusable (left out of their events, the rows
# sent on their other match keys), with one ``identifiers_dropped.<column>.<rule>`` each.
IDENTIFIERS_DROPPED = "identifiers_dropped"


# One of these is built per row: msgspec structs build in a third of a NamedTuple's time.
class Planned(msgspec.Struct, frozen=True, gc=False):
    """A row that becomes an event: the platform's event object and what the ledger keeps.

    Not tracked by the cyclic collector (``gc=False``): it only points to strings, a datetime
    and the body dict, which never point back.
    """

    event_id: str
    event_name: str
    event_time: datetime
    body: dict[str, Any]

    @property
    def envelope(self) -> dict[str, Any]:
        """The outbox envelope: ``{"event_id", "event_time"`` (Unix seconds), ``"body"}``."""
        return {"event_id": self.event_id, "event_time": int(self.event_time.timestamp()),
                "body": self.body}

    def stored_envelope(self) -> dict[str, Any]:
        """:attr:`envelope` with the body serialised (``msgspec.Raw``), as stage keeps it.

        Each event is encoded once, right after it is built: the batch then holds compact
        bytes instead of ~30 objects per event, the outbox payload is these bytes joined,
        and requests embed them without encoding them again.
        """
        return {"event_id": self.event_id, "event_time": int(self.event_time.timestamp()),
                "body": encode_event(self.body)}


class Rejected(msgspec.Struct, frozen=True):
    """A row that does not become an event, and why."""

    reason: str
    status: str  # SKIPPED, EXPIRED, or "quarantined"
    detail: str = ""
    event_id: str | None = None
    event_name: str | None = None
    event_time: datetime | None = None


def row_event_id(row: Mapping[str, Any]) -> str:
    """The row's own event id (shared with a browser pixel), else the derived one."""
    own = row.get("event_id")
    if own is not None and str(own).strip():
        return str(own).strip()[:128]
    return derive_event_id(row.get("lead_id"), str(row.get("stage")))


class Planner:
    """Decides what each source row becomes for one destination at one instant (pure).

    What does not change from row to row (the stage map, the oldest sendable event time, the
    module's functions) is looked up once: every row of every run goes through :meth:`plan`.
    """

    __slots__ = ("_build_event", "_check_event", "_check_row", "_oldest", "_stages",
                 "_tolerance", "dest", "module", "now")

    def __init__(self, dest: DestinationConfig, module: Destination, now: datetime) -> None:
        self.dest = dest
        self.module = module
        self.now = now
        max_age = dest.max_event_age or module.LIMITS.max_event_age
        self._oldest = None if max_age is None else now - max_age + module.LIMITS.stage_margin
        self._stages = dest.stages
        self._tolerance = dest.future_tolerance
        self._check_row = module.check_row
        self._build_event = module.build_event
        self._check_event = module.check_event

    def plan(self, row: Mapping[str, Any]) -> Planned | Rejected:
        """The row's outbox envelope, or why it does not become an event."""
        lead_id = row.get("lead_id")
        stage = row.get("stage")
        event_time = row.get("event_time")
        # quality.guard_row's common case inline (text ids, an aware UTC timestamp, nothing in
        # the future): the same checks; any other row goes through guard_row itself, which
        # then gives the same verdict as before.
        if (lead_id.__class__ is str and stage.__class__ is str
                and event_time.__class__ is datetime
                and (event_time.tzinfo is UTC or event_time.utcoffset() == _ZERO)
                and len(lead_id) <= _MAX_ID_LENGTH and (name := stage.strip())
                and lead_id.strip() and not _CONTROL_SEARCH(lead_id)
                and event_time - self.now <= self._tolerance):
            event_name = self._stages.get(name)
        else:
            event_time = quality.guard_row(row, self.now, self._tolerance)
            if isinstance(event_time, tuple):
                return Rejected(event_time[0], "quarantined", event_time[1])
            stage = row["stage"]  # the guard passed: present and text
            event_name = self._stages.get(stage.strip())
        if event_name is None:
            return Rejected("stage_not_mapped", SKIPPED)
        own = row.get("event_id")
        if own is None:
            # derive_event_id, inline (it runs for most rows): the same text, the same hash.
            # (The first 16 bytes in hex are the first 32 hex digits.)
            event_id = "ls_" + _sha256(f"leadsync|{row['lead_id']}|{stage}".encode()
                                       ).digest()[:16].hex()
        else:
            event_id = row_event_id(row)
        dest = self.dest
        skip = self._check_row(row, dest)
        if skip is None:
            if self._oldest is not None and event_time < self._oldest:
                skip = _TOO_OLD
            else:
                body = self._build_event(row, dest, event_name, event_id, event_time)
                skip = self._check_event(body, dest)
                if skip is None:
                    return Planned(event_id, event_name, event_time, body)
                if skip.reason == _NO_MATCH_KEYS:
                    # What the contract quarantines too (rows committed after the check, or
                    # keys only the module can judge, such as a malformed fbc).
                    return Rejected(_NO_MATCH_KEYS, "quarantined", _NO_MATCH_KEYS_DETAIL)
        return Rejected(skip.reason, EXPIRED if skip.expired else SKIPPED, "", event_id,
                        event_name, event_time)


_ZERO = timedelta(0)
_MAX_ID_LENGTH = quality.MAX_ID_LENGTH
_CONTROL_SEARCH = quality._CONTROL_SEARCH
_sha256 = sha256
_TOO_OLD = Skip("event_too_old", expired=True)
_NO_MATCH_KEYS = "no_match_keys"
_NO_MATCH_KEYS_DETAIL = "no match key the destination needs holds a usable value"


def plan_row(
    row: Mapping[str, Any], dest: DestinationConfig, module: Destination, now: datetime
) -> Planned | Rejected:
    """Decides what one source row becomes for one destination (pure: render uses it too).

    For many rows, build one :class:`Planner` and call its ``plan``.
    """
    return Planner(dest, module, now).plan(row)


def batch_size(dest: DestinationConfig, module: Destination) -> int:
    """Events per outbox batch (and request): the destination's ``batch_size``, capped by the
    platform's limit. Stage, reprocess, render and the benchmarks all batch with this."""
    limit = module.LIMITS.max_batch_events
    return min(dest.batch_size or limit, limit)


# What stage does with one planned row, given what the ledger knows of its event.
STAGE = "stage"
TERMINAL = "terminal"  # recorded in the ledger as skipped or expired, never sent
QUARANTINE = "quarantine"
DROP = "drop"  # nothing to write: only counted


class Decision(msgspec.Struct, frozen=True, gc=False):
    """Stage's verdict on one row: what to do (:data:`STAGE`, :data:`TERMINAL`,
    :data:`QUARANTINE` or :data:`DROP`) and the counters it adds to."""

    action: str
    counts: tuple[str, ...]


_DECISIONS: dict[tuple[str, ...], Decision] = {}


def _decision(action: str, *counts: str) -> Decision:
    key = (action, *counts)
    found = _DECISIONS.get(key)
    if found is None:
        found = _DECISIONS[key] = Decision(action, counts)
    return found


def decide(plan: Planned | Rejected, entry: LedgerEntry | None, source_ts: datetime,
           in_batch: bool) -> Decision:
    """What stage does with one row (pure): its plan, the ledger's entry for its event id
    (None: never seen), the row's ``updated_at`` and whether the batch being filled already
    holds its event id.

    A delivered or dead-lettered event is never staged again (G2); a pending one is in flight;
    a skipped or expired one whose row has not changed since is not re-recorded.
    """
    if isinstance(plan, Rejected):
        if plan.status == "quarantined":
            return _decision(QUARANTINE, "quarantined", f"quarantined.{plan.reason}")
        if plan.event_id is None:
            return _decision(DROP, "skipped", f"skipped.{plan.reason}")
    if in_batch or (entry is not None and entry.status == PENDING):
        return _decision(DROP, "in_flight")
    if entry is not None:
        if entry.status in (DELIVERED, FAILED):
            return _decision(DROP, f"already_{entry.status}")
        if entry.status in REEVALUATE and source_ts <= entry.source_ts:
            return _decision(DROP, "unchanged")
    if isinstance(plan, Rejected):
        bucket = "expired" if plan.status == EXPIRED else "skipped"
        return _decision(TERMINAL, bucket, f"{bucket}.{plan.reason}")
    return _decision(STAGE, "staged")


def settled(entry: LedgerEntry | None, source_ts: datetime) -> str | None:
    """The counter of a row the ledger already settled and that has not changed since (it
    costs a key lookup, no validation and no planning), else None."""
    if entry is None or source_ts > entry.source_ts:
        return None
    if entry.status in (DELIVERED, FAILED):
        return f"already_{entry.status}"
    if entry.status in REEVALUATE:
        return "unchanged"
    return None


def render_requests(
    rows: Iterable[Mapping[str, Any]],
    dest: DestinationConfig,
    creds: Any,
    now: datetime,
    *,
    config: Config | None = None,
) -> Iterator[dict[str, Any]]:
    """What a run would send for these rows: one line per request, one per skipped row.

    Same planning code as the DAG; no state, no network. Secrets are masked. Given the
    ``config``, the data contract (the same Great Expectations suite as the DAG's
    check_contract, run in memory) comes first, unless ``contract.enabled`` is false: a row
    it rejects is reported as skipped with the rule code as its reason.
    """
    verdicts: list[quality.Failure | None] | None = None
    if config is not None and config.contract.enabled:
        rows = list(rows)
        verdicts = quality.check_rows(rows, config, dest, now)
    module = get_destination(dest.type)
    size = batch_size(dest, module)
    batch: list[dict[str, Any]] = []
    seen: set[str] = set()

    def flush() -> Iterator[dict[str, Any]]:
        if batch:
            request = module.build_request(list(batch), creds, dest)
            batch.clear()  # the request holds its own copy, so a kept line stays whole
            yield {"destination": dest.name, **_render(request)}

    plan = Planner(dest, module, now).plan
    for i, row in enumerate(rows):
        failure = verdicts[i] if verdicts is not None else None
        if failure is not None:
            yield {"skipped": {"lead_id": _str(row.get("lead_id")), "stage": _str(row.get("stage")),
                               "reason": failure.rule, "detail": failure.detail}}
            continue
        planned = plan(row)
        if isinstance(planned, Rejected):
            yield {"skipped": {"lead_id": _str(row.get("lead_id")), "stage": _str(row.get("stage")),
                               "reason": planned.reason}}
            continue
        if planned.event_id in seen:
            yield {"skipped": {"lead_id": _str(row.get("lead_id")), "stage": _str(row.get("stage")),
                               "reason": "duplicate_event_id"}}
            continue
        seen.add(planned.event_id)
        batch.append(planned.body)
        if len(batch) >= size:
            yield from flush()
    yield from flush()


def _render(request: HttpRequest) -> dict[str, Any]:
    masked = request.masked()
    return {"method": masked["method"], "url": masked["url"], "body": masked["body"]}


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


# Counters one pass over the window sets (a retried pass replaces them, never adds to them).
_PASS_COUNTERS = ("read", "staged", "batches", "skipped", "expired", "in_flight", "already_",
                  "unchanged", "quarantined", "quarantine_resolved", "checked",
                  "checked_outside_window", "identifiers_dropped")


_NO_BODY: dict[str, Any] = {}  # a waiting row's plan keeps its encoded envelope instead
# Held outbox batches written per transaction by the check pass (see _StagePass.write).
_BATCHES_PER_COMMIT = 25


class _Item(msgspec.Struct, gc=False):
    """A planned row awaiting the contract's verdict: what stage needs of it, no raw values
    (the event body is already hashed and encoded)."""

    position: int
    cursor: Cursor
    prev: Cursor | None
    lead_id: str
    stage: str
    qkey: tuple[str, str]
    plan: Planned | Rejected
    envelope: dict[str, Any] | None
    keys: frozenset[str] = frozenset()  # identifier names the event carries (coverage)


class _Timed:
    """Wall time per phase of a pass (``seconds``), added to by :meth:`timer` blocks."""

    seconds: dict[str, float]

    @contextmanager
    def timer(self, phase: str) -> Iterator[None]:
        """Adds the block's wall time to ``phase``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class _Stager(_Timed):
    """Decides each planned row once the contract's verdict on it is in, and writes what the
    pass stages: held outbox batches with their pending ledger rows, terminal ledger rows and
    quarantine entries.

    Rows wait (hashed and encoded, a few hundred bytes each) for the verdict on their
    validation batch; then each is decided (:func:`decide`) in the order it was read, and
    written in bulk: up to ten outbox batches and their ledger rows per transaction, terminal
    ledger rows and quarantine entries per group. It runs in the check task's process, or, for
    a large window, in a process of its own beside it (:mod:`leadsync.stage_worker`): it is
    then the only writer of the pass, and gets the same calls, in the same order, over a pipe.
    """

    def __init__(self, state: StateStore, name: str, run_id: str, size: int,
                 destination_type: str) -> None:
        self.state = state
        self.name = name
        self.run_id = run_id
        self.size = size
        self.counts: Counter[str] = Counter()
        self.seconds: dict[str, float] = {}
        self.waiting: deque[_Item] = deque()
        self.failed: set[int] = set()  # positions the contract turned away
        self.open_quarantine = state.open_quarantine_keys(name)
        self.passed: set[tuple[str, str]] = set()
        self.envelopes: list[dict[str, Any]] = []
        self.records: list[LedgerRecord] = []
        self.ids: set[str] = set()
        self.existing: set[str] = set()  # ids of the batch being filled the ledger holds
        self.staged: list[StagedBatch] = []  # full batches not written yet (see write)
        self.staged_existing: set[str] = set()  # their ids the ledger holds
        self.group_ids: set[str | None] = set()  # ids decided in the current group
        self.prev: Cursor | None = None
        self.seq = 0
        self.coverage = Coverage(destination_type)  # identifier names of staged events

    def add(self, items: list[_Item]) -> None:
        """Rows planned, in the order read, awaiting their verdict."""
        self.waiting.extend(items)

    def quarantine(self, records: list[QuarantineRecord]) -> None:
        """Writes quarantine entries (the contract's failures, counted by its report)."""
        if records:
            with self.timer("state"):
                self.state.quarantine_rows(self.name, self.run_id, records)

    def verdicts(self, records: list[QuarantineRecord], failed: list[int], upto: int) -> None:
        """Takes the contract's verdicts up to position ``upto``: the failing rows (their
        quarantine entries and positions), and decides the rows before ``upto``."""
        self.quarantine(records)
        self.failed.update(failed)
        self.decide(upto)

    def decide(self, upto: int) -> None:
        """Decides and writes every waiting row before position ``upto``."""
        group: list[_Item] = []
        while self.waiting and self.waiting[0].position < upto:
            item = self.waiting.popleft()
            if item.position in self.failed:
                self.failed.discard(item.position)  # quarantined, counted by the contract
            else:
                group.append(item)
        if not group:
            return
        # Events this group decides are not in the ledger yet when it is looked up below:
        # with the batch being filled, they are what "in flight" means within the group.
        self.group_ids = set()
        ids = [item.plan.event_id for item in group if item.plan.event_id]
        with self.timer("state"):
            # Looked up again now: earlier groups of this run may have written these events.
            known = self.state.ledger_lookup(self.name, ids) if ids else {}
        terminal: list[LedgerRecord] = []
        quarantined: list[QuarantineRecord] = []
        counts = self.counts
        for item in group:
            plan = item.plan
            event_id = plan.event_id
            decision = decide(plan, known.get(event_id) if event_id else None, item.cursor.ts,
                              event_id in self.ids or event_id in self.group_ids)
            if event_id is not None:
                self.group_ids.add(event_id)
            for name in decision.counts:
                counts[name] += 1
            action = decision.action
            if action == QUARANTINE:
                assert isinstance(plan, Rejected)
                quarantined.append(QuarantineRecord(item.qkey[0], item.qkey[1], plan.reason,
                                                    plan.detail, item.cursor.ts))
                continue
            if item.qkey in self.open_quarantine:
                self.passed.add(item.qkey)
            if action == TERMINAL:
                assert event_id is not None and isinstance(plan, Rejected)
                terminal.append(LedgerRecord(
                    event_id, item.lead_id, item.stage, plan.event_name, plan.status,
                    item.cursor.ts, plan.event_time, reason=plan.reason))
            elif action == STAGE:
                assert event_id is not None and item.envelope is not None
                if not self.envelopes:
                    self.prev = item.prev
                self.envelopes.append(item.envelope)
                self.coverage.add_keys(item.keys)
                self.ids.add(event_id)
                if known.get(event_id) is not None:
                    self.existing.add(event_id)
                self.records.append(LedgerRecord(
                    event_id, item.lead_id, item.stage, plan.event_name, PENDING,
                    item.cursor.ts, plan.event_time))
                if len(self.envelopes) >= self.size:
                    self.flush()
        # Before the next group's lookup: it must find what this group staged.
        self.write()
        with self.timer("state"):
            if terminal:
                self.state.record_terminal(self.name, self.run_id, terminal)
            if quarantined:
                self.state.quarantine_rows(self.name, self.run_id, quarantined)

    def flush(self) -> None:
        """Queues the batch being filled as a held outbox batch with its pending ledger rows
        (written by :meth:`write`, at the latest when the group being decided ends)."""
        if not self.envelopes:
            return
        self.seq += 1
        self.staged.append(StagedBatch(uuid.uuid4().hex, self.seq, self.envelopes, self.records,
                                       self.prev))
        self.staged_existing |= self.existing
        self.counts["batches"] += 1
        self.envelopes, self.records, self.ids, self.prev = [], [], set(), None
        self.existing = set()
        if len(self.staged) >= _BATCHES_PER_COMMIT:
            self.write()

    def write(self) -> None:
        """Writes the queued batches in one transaction.

        They are held: nothing of them is sent before the verdict, and a check that dies
        before it discards what it staged, so how many batches share a commit changes no
        guarantee (it saves SQLite rewriting the ledger's index pages once per batch).
        """
        if not self.staged:
            return
        with self.timer("state"):
            # The ledger was looked up when these rows were decided, under the lease.
            self.state.stage_batches(self.name, self.run_id, self.staged, status=BATCH_HELD,
                                     existing=self.staged_existing)
        seqs = [batch.seq for batch in self.staged]
        self.staged, self.staged_existing = [], set()
        if any(seq % 50 == 0 and (seq // 50) & (seq // 50 - 1) == 0 for seq in seqs):
            # A backfill outgrows the planner's statistics: refreshed after 50, 100, 200, 400…
            # batches, so they never lag the ledger by more than half while it grows, without
            # an ANALYZE (~0.1 s each, sampling a fixed number of rows) every 50 batches.
            with self.timer("state"):
                self.state.analyze()
        crash_point("after_stage_batch")

    def close(self, decide: bool = True) -> StageResult:
        """Decides what still waits (all validated by now) and writes the last batch, unless
        the check failed (``decide`` false: what waits is dropped); gives what the pass
        counted."""
        if decide:
            self.decide(self.waiting[-1].position + 1 if self.waiting else 0)
            self.flush()
            self.write()
        return self.result()

    def result(self) -> StageResult:
        """What the pass counted, the coverage of its staged events, the open quarantine
        entries whose rows passed, and the time spent writing."""
        return StageResult(dict(self.counts), self.coverage.events, dict(self.coverage.keys),
                           self.passed, dict(self.seconds))


class StageResult(msgspec.Struct, frozen=True):
    """What a :class:`_Stager` hands back when its pass ends."""

    counts: dict[str, int]
    coverage_events: int
    coverage_keys: dict[str, int]
    passed: set[tuple[str, str]]
    seconds: dict[str, float]


# Planned rows per message to a stage worker.
_HAND_OVER_ROWS = 2_000
# A window this large (rows read by the time its first rows are decided) is staged by a
# process of its own (state.writer_process); a smaller one in the task's process, where a
# worker's start (a second of CPU) would cost more than it saves.
WRITER_PROCESS_MIN_ROWS = 10_000


class _StagePass(_Timed):
    """One pass of :meth:`Pipeline.check`: settled rows, planning, and the stager.

    Rows are planned as they are read and handed, with the contract's verdicts, to a
    :class:`_Stager` (in this process, or in a stage worker process for a large window): it
    decides them in the order they were read and writes the held outbox batches. Until the
    first rows are decided, what the stager would be told is kept here, and given to it in
    order once it starts.
    """

    def __init__(self, pipeline: Pipeline, run_id: str, now: datetime,
                 watermark: Cursor | None) -> None:
        self.state = pipeline.state
        # Rows past the watermark are new to every run that committed: only the lookback's
        # rows (at or before it) can have been settled, so only they are looked up.
        self.settled_until = watermark.ts if watermark is not None else None
        self.name = pipeline.dest.name
        self.dest_type = pipeline.dest.type
        self.run_id = run_id
        self.planner = Planner(pipeline.dest, pipeline.module, now)
        self.size = batch_size(pipeline.dest, pipeline.module)
        self.counts: Counter[str] = Counter()
        self.seconds: dict[str, float] = {}
        self.position = 0  # rows handed to the contract (and planned) so far
        self.last: Cursor | None = None  # the last row read
        self.coverage = Coverage(pipeline.dest.type)  # identifier names of staged events
        self.passed: set[tuple[str, str]] = set()  # open quarantine entries whose rows passed
        self.writer_process = pipeline.config.state.writer_process and _shareable(self.state)
        self.stager: _Stager | RemoteStager | None = None
        self.queued: list[tuple[Any, ...]] = []  # calls for the stager, until it starts
        self.items: list[_Item] = []  # planned rows not handed to the stager yet
        self.verdicts_upto = 0  # rows before this position have their verdict

    def _hand_over(self) -> None:
        items, self.items = self.items, []
        # In parts: rows planned before the stager started (a contract batch or two) would
        # otherwise cross the pipe as one message, held twice over on both sides.
        for start in range(0, len(items), _HAND_OVER_ROWS):
            self._send("add", items[start:start + _HAND_OVER_ROWS])

    def _call(self, method: str, *args: Any) -> None:
        """Tells the stager what to do next, after the rows planned meanwhile."""
        self._hand_over()
        self._send(method, *args)

    def _send(self, method: str, *args: Any) -> None:
        if self.stager is None:
            self.queued.append((method, *args))
            if method in ("verdicts", "decide"):  # rows are to be decided: it starts
                self._start()
            return
        if isinstance(self.stager, _Stager):
            getattr(self.stager, method)(*args)  # it times its own writes
        else:
            with self.timer("state"):  # handing over (the writes are the worker's)
                getattr(self.stager, method)(*args)

    def _start(self) -> None:
        if self.writer_process and self.position >= WRITER_PROCESS_MIN_ROWS:
            from leadsync.stage_worker import RemoteStager

            with self.timer("state"):
                self.stager = RemoteStager(self.state, self.name, self.run_id, self.size,
                                           self.dest_type)
        else:
            self.stager = _Stager(self.state, self.name, self.run_id, self.size,
                                  self.dest_type)
        queued, self.queued = self.queued, []
        for method, *args in queued:
            self._send(method, *args)

    def take(self, chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Counts a chunk as read, skips its settled rows, plans the rest; returns the rest
        (for the contract), in order."""
        self.counts["read"] += len(chunk)
        until = self.settled_until
        known: dict[str, LedgerEntry] = {}
        if until is not None and chunk[0]["_cursor"].ts <= until:
            # Only a chunk that reaches back into the lookback can hold settled rows.
            ids = [row_event_id(row) if row["_cursor"].ts <= until else None for row in chunk]
            with self.timer("state"):
                known = self.state.ledger_lookup(self.name, [i for i in ids if i is not None])
        else:
            ids = [None] * len(chunk)
        fresh: list[dict[str, Any]] = []
        counts = self.counts
        plan = self.planner.plan
        prev = self.last
        items = self.items
        with self.timer("plan"):
            for row, event_id in zip(chunk, ids, strict=True):
                cursor: Cursor = row["_cursor"]
                done = settled(known.get(event_id), cursor.ts) if known and event_id else None
                if done is not None:
                    counts[done] += 1
                else:
                    planned = plan(row)
                    envelope = None
                    keys: frozenset[str] = frozenset()
                    if isinstance(planned, Planned):
                        # Encoded now; the event's dict (~30 objects) is not kept waiting.
                        envelope = planned.stored_envelope()
                        keys = self.coverage.names(planned.body)
                        planned = Planned(planned.event_id, planned.event_name,
                                          planned.event_time, _NO_BODY)
                    items.append(_Item(
                        self.position, cursor, prev, str(row.get("lead_id"))[:128],
                        str(row.get("stage"))[:64], quality.quarantine_key(row), planned,
                        envelope, keys))
                    self.position += 1
                    fresh.append(row)
                prev = cursor
        self.last = prev
        if (self.stager is None and self.writer_process
                and self.position >= WRITER_PROCESS_MIN_ROWS):
            # A large window: its worker starts now, not at the first verdict (seconds of
            # GX import away), so that the rows read meanwhile wait there, not here.
            self._start()
        if self.stager is not None:
            self._hand_over()
        return fresh

    def unreadable(self, marker: UnreadableRow,
                   session: quality.ContractSession | None, new: bool) -> None:
        """A row the driver could not read: quarantined on its own (``unreadable_row``), in its
        place in the order, so that the watermark can move past it; the pass goes on."""
        self.counts["read"] += 1
        if session is not None:
            failure = session.add_unreadable(marker, is_new=new)  # counted by its report
        else:
            failure = quality.unreadable_failure(marker)
            self.counts["quarantined"] += 1
            self.counts[f"quarantined.{failure.rule}"] += 1
        self.quarantine_failures([failure])
        if marker.cursor is not None:
            self.last = marker.cursor

    def quarantine_failures(self, failures: list[quality.Failure]) -> None:
        """Quarantines the contract's failures (counted by its report)."""
        if failures:
            self._call("quarantine", [f.record() for f in failures])

    def verdicts(self, failures: list[quality.Failure], validated: int) -> None:
        """Takes the contract's verdicts up to position ``validated``; the rows before it are
        decided."""
        if not failures and validated <= self.verdicts_upto:
            return  # nothing new (the contract validates whole batches)
        self.verdicts_upto = validated
        self._call("verdicts", [f.record() for f in failures],
                   [f.position for f in failures], validated)

    def decide(self, upto: int) -> None:
        """Decides and writes every waiting row before position ``upto``."""
        self._call("decide", upto)

    def close(self, decide: bool = True) -> None:
        """Decides what still waits (all validated by now) and writes the last batch, unless
        the check failed (``decide`` false); takes what the stager counted."""
        if self.stager is None:
            if not self.queued and not (decide and self.items):
                self.items = []
                return
            if decide:
                self._call("decide", self.position)
            else:
                # Quarantine entries the stager was told of (unreadable rows) are written
                # even when the check stopped before any row was decided.
                self.items = []
                self._start()
        elif decide:
            self._hand_over()
        stager, self.stager = self.stager, None
        assert stager is not None
        if isinstance(stager, _Stager):
            result = stager.close(decide)
        else:
            with self.timer("state"):
                result = stager.close(decide)
        self.counts.update(result.counts)
        self.coverage.events += result.coverage_events
        self.coverage.keys.update(result.coverage_keys)
        self.passed = result.passed
        for phase, seconds in result.seconds.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def kill(self) -> None:
        """Stops a stage worker at once (the check is unwinding: what it staged stays held,
        never sendable, and the next attempt discards it)."""
        stager, self.stager = self.stager, None
        if stager is not None and not isinstance(stager, _Stager):
            stager.kill()

    def resolve_quarantine(self) -> int:
        """Resolves the open quarantine entries whose rows passed this time; returns how many."""
        if not self.passed:
            return 0
        with self.timer("state"):
            return self.state.resolve_quarantine(self.name, sorted(self.passed))


_GC_LOCK = threading.Lock()
_GC_PASSES = 0  # passes running in this process (threads of one test process)
_GC_SAVED: tuple[int, int, int] | None = None
_GC_FROZEN_BEFORE = False


@contextmanager
def _pass_gc() -> Iterator[None]:
    """The cyclic collector's settings for a pass over a window (and a push lane's drain).

    A pass builds a few objects per row that it drops again by reference count (row dicts,
    cursors, plans; a lane, each batch's decoded events and outcomes): none forms a cycle,
    yet each makes the collector run more often, and
    every full collection walks the process's whole heap (Airflow, SQLAlchemy, pydantic…).
    For the pass, that heap is frozen (left out of collections) and the youngest generation
    collected every 10,000 new objects instead of 700: ~1 s of CPU less for 200k rows
    (measured 11.7–13.1 s → 9.9–11.7 s), ~0.4 s of a 200k-row push (3.9–4.6 → 3.7–4.1 s).
    Both are undone when the last pass ends. A heap frozen for good before (a process that
    imported Great Expectations itself, see :func:`leadsync.quality.import_gx`) is left as
    it is: freezing it again would park for good whatever became garbage since (engines and
    their connections, in a long-lived process such as a test run), never to be collected.
    """
    global _GC_PASSES, _GC_SAVED, _GC_FROZEN_BEFORE
    with _GC_LOCK:
        if _GC_PASSES == 0:
            _GC_SAVED = gc.get_threshold()
            _GC_FROZEN_BEFORE = gc.get_freeze_count() > 0
            if not _GC_FROZEN_BEFORE:
                gc.freeze()
            gc.set_threshold(max(_GC_SAVED[0], 10_000), _GC_SAVED[1], _GC_SAVED[2])
        _GC_PASSES += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_PASSES -= 1
            if _GC_PASSES == 0 and _GC_SAVED is not None:
                gc.set_threshold(*_GC_SAVED)
                if not _GC_FROZEN_BEFORE:
                    gc.unfreeze()


def _shareable(state: StateStore) -> bool:
    """Whether another process can open the state store (not an in-memory SQLite)."""
    url = state.engine.url
    return not (url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"))


class _Contract:
    """The contract of one pass, its Great Expectations session opened on first use.

    A window whose rows the ledger all settled (a run with nothing new) validates nothing, so
    it never imports GX (seconds): its report counts no rows and passes, without Data Docs.
    A source missing a required column opens the session at once, for the structural report.
    """

    def __init__(self, spec: quality.ContractSpec, run_id: str, now: datetime,
                 columns: list[str], pass_: _StagePass, *, separate_process: bool) -> None:
        self.spec = spec
        self.separate_process = separate_process
        self.run_id = run_id
        self.now = now
        self.columns = columns
        self.pass_ = pass_
        self.session: quality.ContractSession | None = None
        self.columns_ok = all(c in columns for c in REQUIRED_COLUMNS)
        if not self.columns_ok:
            self.open()  # its structural failures are the report

    def open(self) -> quality.ContractSession:
        """The session (created, and the source's columns checked, on first call)."""
        if self.session is None:
            with self.pass_.timer("gx_setup"):
                # GX is imported once per process (seconds): the heartbeat keeps the lease.
                # In a worker process, this pass waits for it only at the first verdict.
                self.session = quality.ContractSession(
                    self.spec, self.run_id, self.now, separate_process=self.separate_process)
                # A missing column is known here; GX's own structure check, for the report,
                # is waited for only when it decides something.
                self.session.check_columns(self.columns, wait=not self.columns_ok)
        return self.session

    def close(self) -> None:
        """Frees the session's validator (a worker process goes back to the idle pool)."""
        if self.session is not None:
            self.session.close()

    def finish(self, aborted: str | None) -> quality.ContractReport:
        """The verdict; an empty, passing report when nothing was validated."""
        if self.session is None and aborted is None:
            spec = self.spec
            return quality.ContractReport(spec.destination, self.run_id,
                                          threshold=spec.failure_threshold,
                                          min_rows=spec.failure_min_rows,
                                          max_quarantined_rows=spec.max_quarantined_rows)
        return self.open().finish(aborted=aborted)


class Pipeline:
    """The steps of one destination's run, over the state store and the warehouse."""

    def __init__(
        self,
        config: Config,
        dest: DestinationConfig,
        state: StateStore,
        warehouse: Engine,
        *,
        credentials: Callable[[], Any] | None = None,
        clock: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self.dest = dest
        self.state = state
        self.warehouse = warehouse
        self.module = get_destination(dest.type)
        self._credentials = credentials
        self.clock = clock
        self.sleep = sleep

    # -- lease ----------------------------------------------------------------------------

    def _hold(self, run_id: str) -> None:
        if not self.state.acquire_lease(self.dest.name, run_id, self.config.state.lease_ttl):
            raise LeaseBusyError(
                f"run {run_id} lost the lease on {self.dest.name!r} to "
                f"{self.state.lease_holder(self.dest.name)}; stopping so runs never interleave"
            )

    # -- steps ----------------------------------------------------------------------------

    def open_run(self, run_id: str) -> dict[str, Any]:
        """Takes the destination's lease, plans the window and records the run."""
        self.state.migrate()
        cfg = self.config.state
        self.state.wait_for_lease(self.dest.name, run_id, cfg.lease_ttl, cfg.lease_wait)
        watermark = self.state.get_watermark(self.dest.name)
        window = plan_window(watermark, self.clock(), self.config.source.lookback,
                             self.config.source.settle_lag)
        self.state.start_run(run_id, self.dest.name, window.lo.ts if window.lo else None,
                             window.hi, watermark)
        crash_point("after_open")
        log.info("run %s of %s: window (%s, %s], watermark %s", run_id, self.dest.name,
                 window.lo.ts.isoformat() if window.lo else "start", window.hi.isoformat(),
                 watermark.as_dict() if watermark else None)
        return {"run_id": run_id, "window_lo": window.lo.ts.isoformat() if window.lo else None,
                "window_hi": window.hi.isoformat()}

    def _source(self) -> Source:
        src = self.config.source
        return Source(self.warehouse, src.read_query(), src.chunk_size, src.page_size)

    def _opened(self, run_id: str) -> dict[str, Any]:
        run = self.state.get_run(run_id, self.dest.name)
        if run is None:
            raise RuntimeError(f"run {run_id} was not opened for {self.dest.name}")
        return run

    def _window(self, run: Mapping[str, Any]) -> Window:
        # The window open_run planned: check and stage read exactly the same rows.
        return plan_window(run["watermark_before"],
                           run["window_hi"] + self.config.source.settle_lag,
                           self.config.source.lookback, self.config.source.settle_lag)

    def check(self, run_id: str) -> dict[str, Any]:
        """Reads the run's window once: checks it against the data contract and stages it.

        Each chunk of the window is streamed once. Rows the ledger already settled, whose
        ``updated_at`` has not changed since, cost a key lookup and nothing else. The others go
        through the Great Expectations suite batch by batch (memory stays flat) and are planned
        meanwhile; failing rows go to quarantine with their rule code and a fixed detail, keyed
        by lead_id + stage, and the rows that pass are written to outbox batches *held* for
        this run. Only when the whole window passed are the held batches released (they become
        pending, for push), in the transaction that records the verdict. When the circuit
        breaker trips, the held batches and this run's ledger rows are discarded in the
        transaction that marks the run ``contract_failed``, and
        :class:`~leadsync.quality.ContractViolation` is raised: nothing of the run is sent,
        and commit keeps the watermark where it was and frees the lease.

        Returns the contract report's counts (the task's XCom).
        """
        self._hold(run_id)
        run = self._opened(run_id)
        name = self.dest.name
        # An earlier attempt of this step, or a run that died before its verdict, may have
        # left held batches and ledger rows: never sendable, and this pass re-reads the rows.
        self.state.discard_held(name, run_id if run["status"] == RUN_CHECKING else None)
        if run["status"] == RUN_RUNNING:
            # This check passed before and released its batches: those no lane took yet are
            # taken back and staged again by this pass, which counts afresh.
            self.state.take_back_unsent(name, run_id)
        self.state.update_run(run_id, name, status=RUN_CHECKING)
        source = self._source()
        window = self._window(run)
        contract = self.config.contract
        pass_ = _StagePass(self, run_id, self.clock(), run["watermark_before"])
        report: quality.ContractReport | None = None
        with self.state.heartbeat(name, run_id, self.config.state.lease_ttl), _pass_gc():
            try:
                if contract.enabled:
                    spec = quality.ContractSpec.from_config(self.config, self.dest)
                    columns = quality.source_columns(self.warehouse, source.query)
                    lazy = _Contract(spec, run_id, self.clock(), columns, pass_,
                                     separate_process=contract.separate_process)
                    try:
                        aborted: str | None = None
                        if lazy.columns_ok:
                            aborted = self._read_window(pass_, lazy, source, window,
                                                        run["watermark_before"])
                        with pass_.timer("verdict"):  # the last batch, breaker, Data Docs
                            report = lazy.finish(aborted)
                    finally:
                        lazy.close()
                else:
                    source.check_columns()
                    self._read_window(pass_, None, source, window, run["watermark_before"])
                # The last rows decided and the last batch written (held), unless the breaker
                # tripped; the stager's counts either way.
                pass_.close(decide=report is None or report.passed)
            finally:
                pass_.kill()  # a stage worker left running by an error stops here
        counts = pass_.counts
        if report is not None:
            counts["checked"] = report.rows
            counts["quarantined"] += sum(report.quarantined.values())
            for rule, n in report.quarantined.items():
                counts[f"quarantined.{rule}"] += n
            if report.outside_window_rows:
                counts["checked_outside_window"] = report.outside_window_rows
            if report.identifiers_dropped:
                counts[IDENTIFIERS_DROPPED] = sum(report.identifiers_dropped.values())
                counts.update({f"{IDENTIFIERS_DROPPED}.{k}": n
                               for k, n in report.identifiers_dropped.items()})
        else:
            counts["checked"] = 0
        self.state.set_run_counts(run_id, name, counts, replace_prefixes=_PASS_COUNTERS)
        passed = report is None or report.passed
        self.state.set_coverage(name, run_id, pass_.coverage.events if passed else 0,
                                pass_.coverage.keys)
        if report is not None and not report.passed:
            self.state.discard_held(name, run_id, status=RUN_CONTRACT_FAILED)
            log.error("%s", report.describe())
            raise quality.ContractViolation(report)
        crash_point("after_stage")
        resolved = pass_.resolve_quarantine()
        with pass_.timer("state"):
            self.state.release_held(name, run_id, window_max=pass_.last,
                                    counts={"quarantine_resolved": resolved} if resolved
                                    else None)
            if counts["batches"]:
                self.state.analyze()  # the ledger grew: keep the planner's statistics current
        log.info("read %s once: %s; phases (s): %s", name, dict(counts),
                 {k: round(v, 3) for k, v in pass_.seconds.items()})
        if report is None:
            log.info("data contract disabled (contract.enabled: false): nothing checked")
            return {"destination": name, "run_id": run_id, "enabled": False}
        log.info("%s", report.describe())
        if report.data_docs:
            log.info("Data Docs of this check: %s", report.data_docs)
        return report.as_dict()

    def _read_window(self, pass_: _StagePass, contract: _Contract | None, source: Source,
                     window: Window, run_watermark: Cursor | None) -> str | None:
        """Streams the window once through the settled-row lookup, the contract and the
        planner; returns why it stopped early, if it did.

        The contract's scan for rows without a cursor (``contract.scan_null_cursor``) reads
        the whole table, as the window's query does on SQLite (``strftime`` of every row):
        it runs beside the window's read, in a thread on a connection of its own (sqlite3 and
        psycopg2 give Python's lock back while the database works), and its rows are judged
        once the window is (a no-op run over 1M rows: two scans of ~0.9 s each, one after
        the other before).
        """
        if contract is None or not self.config.contract.scan_null_cursor:
            return self._stream_window(pass_, contract, source, window, run_watermark, None)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="null-cursor scan") as pool:
            scan = pool.submit(quality.null_cursor_rows, source,
                               contract.spec.max_quarantined_rows + 1)
            return self._stream_window(pass_, contract, source, window, run_watermark, scan)

    def _stream_window(self, pass_: _StagePass, contract: _Contract | None, source: Source,
                       window: Window, run_watermark: Cursor | None,
                       scan: Future[list[dict[str, Any]]] | None) -> str | None:
        same_key_rows: Callable[[Mapping[str, Any]], int] | None = None
        counted = contract is None  # the window's duplicated keys, counted once needed

        def count_keys() -> str | None:
            """Counts the window's duplicated (lead_id, stage) keys, for the contract's
            duplicate rule: only once a row is to be validated (a window the ledger all
            settled never needs it, and the count scans the whole window)."""
            nonlocal counted, same_key_rows
            if counted:
                return None
            counted = True
            assert contract is not None
            cap = contract.spec.max_quarantined_rows
            with pass_.timer("check"):
                duplicated = quality.window_key_counts(source, window, cap)
            if len(duplicated) > cap:
                return (f"more than {cap} (lead_id, stage) keys occur more than once in the "
                        "window: the source query probably fans out (a join)")
            if duplicated:
                def same_key_rows(row: Mapping[str, Any]) -> int:
                    return duplicated.get(
                        quality.duplicate_key(row.get("lead_id"), row.get("stage")), 1)
            return None

        watermark = run_watermark

        def is_new(row: Mapping[str, Any]) -> bool:
            # Rows the lookback re-reads were judged by the run that moved the watermark.
            return watermark is None or row["_cursor"].ts > watermark.ts

        stream = source.stream(window)
        try:
            while True:
                with pass_.timer("read"):
                    chunk = next(stream, None)
                if chunk is None:
                    break
                if isinstance(chunk, UnreadableRow):
                    cursor = chunk.cursor
                    if (stop := count_keys()) is not None:
                        return stop
                    session = contract.open() if contract is not None else None
                    pass_.unreadable(chunk, session, cursor is None or watermark is None
                                     or cursor.ts > watermark.ts)
                    if session is not None and session.over_limit:
                        return "stopped reading the window"
                    continue
                fresh = pass_.take(chunk)
                if contract is None:
                    pass_.decide(pass_.position)
                elif fresh:
                    if (stop := count_keys()) is not None:
                        return stop
                    session = contract.open()
                    with pass_.timer("check"):
                        failures = session.add(fresh, same_key_rows, is_new=is_new)
                    pass_.verdicts(failures, session.validated)
                    if session.over_limit:
                        return "stopped reading the window"
                crash_point("after_stage_chunk")
        finally:
            close = getattr(stream, "close", None)  # a generator holding a DB cursor
            if close is not None:
                close()
        if contract is None:
            return None
        if contract.session is not None:
            with pass_.timer("check"):
                failures = contract.session.flush()
            pass_.verdicts(failures, pass_.position)
        if scan is not None:
            with pass_.timer("check"):
                outside = scan.result()
                if outside:
                    session = contract.open()
                    pass_.quarantine_failures(session.add(outside, outside_window=True)
                                              + session.flush())
        return None

    def stage(self, run_id: str) -> dict[str, Any]:
        """The batches to push: every pending batch of the destination (older runs' first),
        the counts of this run's pass, and the push lanes to start (``lanes``: one per batch,
        at most ``push_lanes``; none when nothing is pending).

        Staging itself happens in :meth:`check`, in the same pass over the window as the
        contract; this step refuses a run whose check has not passed.
        """
        self._hold(run_id)
        run = self._opened(run_id)
        if run["status"] in (RUN_CHECKING, RUN_CONTRACT_FAILED):
            raise RuntimeError(f"run {run_id} of {self.dest.name}: the data contract check has "
                               "not passed (see check_contract); nothing is staged")
        batch_ids = self.state.pending_batch_ids(self.dest.name)
        counts = {k: v for k, v in run["counts"].items() if k.startswith(_PASS_COUNTERS)}
        # The identifiers this run's events go without (counted by the check, which judged
        # them with the same normalisation): reported here too, not added to the run twice.
        dropped = {k: v for k, v in run["counts"].items() if k.startswith(IDENTIFIERS_DROPPED)}
        log.info("staged %s: %s; %d batch(es) to push", self.dest.name, counts, len(batch_ids))
        if dropped:
            log.warning("staged %s without unusable identifiers (the rows are sent on their "
                        "other match keys): %s", self.dest.name, dropped)
        # As many push lanes as there are batches, up to push_lanes: a run with nothing to send
        # maps push_lane over no lane, and Airflow starts no task process for it.
        lanes = list(range(min(self.dest.push_lanes, len(batch_ids))))
        return {"batch_ids": batch_ids, "counts": {**counts, **dropped}, "lanes": lanes}

    def push_lane(self, run_id: str, lane: int = 0,
                  client: HttpClient | None = None) -> dict[str, int]:
        """Drains the destination's pending outbox batches, oldest first, in one lane.

        A run pushes with ``push_lanes`` lanes (one task each) whatever the backlog. Each lane
        claims one batch at a time atomically (no two lanes or workers ever send one batch at
        once), sends it through one HTTP session and records its outcome, until no batch is
        left that it may take: batches claimed by a live lane of this run are theirs, and a
        batch this run already sent and got an answer for (events the platform deferred)
        waits for the next run. A claim expires with the lease's ttl unless its lane keeps
        renewing it, so a batch whose lane died is taken by the next lane or run (G4).

        Returns the lane's counters. A transient error that outlasts the retries stops the
        lane with :class:`~leadsync.delivery.TransientExhaustedError` (the batch stays
        pending, free for a retry of the task); a fatal one raises
        :class:`~leadsync.destinations.base.FatalDestinationError`.
        """
        return self._drain(run_id, f"lane {lane}", None, client)

    def push(self, run_id: str, batch_id: str, client: HttpClient | None = None) -> dict[str, int]:
        """Sends one given outbox batch (the reprocess DAG's own batches) under a claim.

        Returns ``{}`` when the batch is done already or another lane holds it: nothing is
        sent twice.
        """
        return self._drain(run_id, "single", batch_id, client)

    def _drain(self, run_id: str, name: str, batch_id: str | None,
               client: HttpClient | None) -> dict[str, int]:
        self._hold(run_id)
        if self._credentials is None:
            raise RuntimeError("no credentials provider given to the pipeline")
        raw = getattr(self.module, "RAW_EVENT_BODIES", False)
        ttl = self.config.state.lease_ttl
        # Unique per attempt: a retried task never mistakes its dead predecessor's claim
        # for its own; that claim expires instead.
        holder = f"{run_id} {name} {uuid.uuid4().hex[:8]}"
        creds = self._credentials()
        own_client = client is None
        http = client or HttpClient(timeout=self.dest.retry.timeout.total_seconds())
        sender = BatchSender(self.module, creds, self.dest, http, sleep=self.sleep or time.sleep)
        # Requests in flight: claims and outcomes stay in this thread (the state store's
        # transactions), only the sending (HTTP, retries) runs in the pool's threads.
        width = 1 if batch_id is not None else self.dest.requests_in_flight
        pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix=f"{name} send")
        flying: deque[tuple[Batch, Future[DeliveryReport]]] = deque()
        totals: Counter[str] = Counter()
        error: Exception | None = None
        crashed = True  # until the loop ends normally: do not wait for requests in flight
        try:
            def renew() -> None:
                self.state.renew_claims(self.dest.name, holder, ttl)

            # Claims and outcomes go through one connection (see StateStore.pinned); the
            # heartbeat's thread and releases after an error use the pool.
            with self.state.heartbeat(self.dest.name, run_id, ttl, also=renew), _pass_gc(), \
                    self.state.pinned() as lane_state:
                while True:
                    while error is None and len(flying) < width:
                        lease_of = None  # held: checked at the start of the step
                        if totals["claimed"]:
                            if batch_id is not None:
                                break
                            if totals["batches"]:
                                crash_point("between_batches")
                            # A run that lost its lease stops here: the lease is checked
                            # (as by _hold) in the claim's own transaction.
                            lease_of = run_id
                        batch = lane_state.claim_batch(self.dest.name, run_id, holder, ttl,
                                                       batch_id=batch_id, raw_bodies=raw,
                                                       lease_of=lease_of)
                        if batch is None:
                            break
                        totals["claimed"] += 1
                        crash_point("before_send")
                        flying.append((batch, pool.submit(sender.deliver, batch.events,
                                                          self.clock())))
                    if not flying:
                        break
                    batch, sending = flying[0]  # outcomes are recorded in claim order
                    try:
                        counts = self._record(lane_state, run_id, batch, sending.result(),
                                              holder)
                    except Exception as exc:  # noqa: BLE001 - raised once the others are in
                        # The batch is free again at once (recorded outcomes ended the claim
                        # already); the requests still in flight are answered and recorded
                        # before the error is raised, and nothing more is claimed.
                        flying.popleft()
                        self._release(batch.batch_id, holder)
                        error = error or exc
                        continue
                    flying.popleft()
                    totals.update(counts)
                    totals["batches"] += 1
            crashed = False
        finally:
            # Unwinding without an answer (a crash, a task killed by Airflow): what was
            # claimed and not recorded is free again at once, not when its claim expires.
            pool.shutdown(wait=not crashed, cancel_futures=crashed)
            for batch, _ in flying:
                self._release(batch.batch_id, holder)
            if own_client:
                http.close()
        del totals["claimed"]
        if error is not None:
            raise error
        if batch_id is None:
            log.info("%s of %s drained: %s", name, self.dest.name, dict(totals))
        return dict(totals) if totals["batches"] else {}

    def _release(self, batch_id: str, holder: str) -> None:
        try:
            self.state.release_claim(batch_id, holder)
        except Exception:  # the error being raised matters more; the claim expires anyway
            log.warning("could not release the claim on batch %s; it expires instead",
                        batch_id, exc_info=True)

    def _record(self, state: StateStore, run_id: str, batch: Batch, report: DeliveryReport,
                holder: str) -> dict[str, int]:
        """Records the answer to one batch's request (every event's outcome)."""
        counts = dict(summarize(report))
        crash_point("after_send_before_record")
        state.record_outcomes(batch, report.outcomes, run_id, counts, holder=holder,
                                   answered=report.error is None)
        log.info("batch %s of %s: %s", batch.batch_id, self.dest.name, counts)
        if report.error is not None:
            raise report.error
        return counts

    def commit(self, run_id: str) -> dict[str, Any]:
        """Advances the watermark past terminal rows only, closes the run, frees the lease.

        After a failed (or unfinished) contract check nothing was staged by this run: the
        watermark stays where it was, the run is closed as ``contract_failed`` (or
        ``check_failed``) and the lease is freed.
        """
        self._hold(run_id)
        run = self.state.get_run(run_id, self.dest.name)
        if run is not None and run["status"] in (RUN_CHECKING, RUN_CONTRACT_FAILED):
            return self._close_unchecked(run_id, run)
        pending = self.state.pending_batch_ids(self.dest.name)
        status = "success" if not pending else "partial"
        crash_point("before_watermark_commit")
        before, after = self.state.commit_run(run_id, self.dest.name, status)
        crash_point("before_lease_release")
        self.state.release_lease(self.dest.name, run_id)
        # The run's rewritten ledger rows and deleted payloads, on a Postgres that does not
        # reclaim them itself (after the lease: the next run need not wait for it).
        self.state.vacuum_dead()
        run = self.state.get_run(run_id, self.dest.name) or {}
        summary = {
            "destination": self.dest.name,
            "run_id": run_id,
            "status": status,
            "pending_batches": len(pending),
            "watermark_before": before.as_dict() if before else None,
            "watermark_after": after.as_dict() if after else None,
            "counts": run.get("counts", {}),
        }
        log.info("committed %s: %s", self.dest.name, summary)
        return summary

    def _close_unchecked(self, run_id: str, run: Mapping[str, Any]) -> dict[str, Any]:
        status = RUN_CONTRACT_FAILED if run["status"] == RUN_CONTRACT_FAILED else RUN_CHECK_FAILED
        # A check that never reached its verdict may have left held batches: they go, with
        # the ledger rows of this run, in the transaction that closes it.
        self.state.discard_held(self.dest.name, run_id, status=status)
        self.state.release_lease(self.dest.name, run_id)
        self.state.vacuum_dead()
        watermark = self.state.get_watermark(self.dest.name)
        mark = watermark.as_dict() if watermark else None
        summary = {
            "destination": self.dest.name,
            "run_id": run_id,
            "status": status,
            "pending_batches": len(self.state.pending_batch_ids(self.dest.name)),
            "watermark_before": mark,
            "watermark_after": mark,
            "counts": run.get("counts", {}),
        }
        log.warning("closed %s without staging (the data contract check did not pass); the "
                    "watermark stays at %s", self.dest.name, mark)
        return summary

    def run(self, run_id: str | None = None) -> dict[str, Any]:
        """All steps in this process (CLI, benchmarks); the DAG runs the same steps as tasks.

        A tripped contract breaker closes the run (watermark kept, lease freed) and re-raises
        :class:`~leadsync.quality.ContractViolation`.
        """
        run_id = run_id or f"local__{utcnow().strftime('%Y%m%dT%H%M%S')}_{uuid.uuid4().hex[:6]}"
        self.open_run(run_id)
        try:
            self.check(run_id)
        except Exception:
            self.commit(run_id)
            raise
        self.stage(run_id)
        errors: list[Exception] = []
        try:
            self.push_lane(run_id, 0)
        except RuntimeError as exc:  # transient errors outlasted the retries: the run is partial
            errors.append(exc)
        summary = self.commit(run_id)
        if errors:
            summary["errors"] = [str(e) for e in errors]
        return summary


__all__ = ["DELIVERED", "DROP", "FAILED", "QUARANTINE", "STAGE", "TERMINAL", "Decision",
           "Pipeline", "Planned", "Planner", "Rejected", "batch_size", "decide", "plan_row",
           "render_requests", "row_event_id", "settled"]

"""One run of one destination: open → stage (extract, check, build, outbox) → push → commit.

Each step is a method that an Airflow task calls (``dags/``) and that tests and the CLI call
directly. Steps hand each other nothing but the run id and batch ids: every row, event and
outcome lives in the state store, so any step can be retried or run on another worker.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import Engine

from leadsync import quality
from leadsync.config import Config, DestinationConfig
from leadsync.delivery import BatchSender, summarize
from leadsync.destinations import get_destination
from leadsync.destinations.base import Destination, HttpRequest, Skip, derive_event_id
from leadsync.destinations.http import HttpClient, encode_event
from leadsync.faults import crash_point
from leadsync.source import Source, Window, plan_window
from leadsync.state import (
    DELIVERED,
    EXPIRED,
    FAILED,
    PENDING,
    REEVALUATE,
    SKIPPED,
    Batch,
    Cursor,
    LeaseBusyError,
    LedgerRecord,
    QuarantineRecord,
    StateStore,
    utcnow,
)

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


# Stage's marker for a row this run's contract check quarantined (skipped, already counted).
_CHECKED_OUT = Rejected("contract", "quarantined")


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
        event_time = quality.guard_row(row, self.now, self._tolerance)
        if isinstance(event_time, tuple):
            return Rejected(event_time[0], "quarantined", event_time[1])
        stage = row["stage"]  # the guard passed: present and text
        event_name = self._stages.get(stage.strip())
        if event_name is None:
            return Rejected("stage_not_mapped", SKIPPED)
        own = row.get("event_id")
        if own is None:
            event_id = derive_event_id(row["lead_id"], stage)
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
    size = min(dest.batch_size or module.LIMITS.max_batch_events, module.LIMITS.max_batch_events)
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


@dataclass
class _Buffer:
    envelopes: list[dict[str, Any]] = field(default_factory=list)
    records: list[LedgerRecord] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    prev: Cursor | None = None


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
        """Checks the run's window against the data contract, before anything is staged.

        Streams the same window as :meth:`stage` and validates it with the Great Expectations
        suite batch by batch (memory stays flat); failing rows go to quarantine with their rule
        code and a fixed detail, keyed by lead_id + stage. Returns the report's counts (the
        task's XCom). When the circuit breaker trips, the run is marked ``contract_failed`` and
        :class:`~leadsync.quality.ContractViolation` is raised: stage refuses to run, and
        commit keeps the watermark where it was and frees the lease.
        """
        self._hold(run_id)
        run = self._opened(run_id)
        contract = self.config.contract
        if not contract.enabled:
            self.state.set_run_counts(run_id, self.dest.name, {"checked": 0})
            self.state.update_run(run_id, self.dest.name, status=RUN_RUNNING)
            log.info("data contract disabled (contract.enabled: false): nothing checked")
            return {"destination": self.dest.name, "run_id": run_id, "enabled": False}
        # Until the check finishes, stage refuses and commit keeps the watermark.
        self.state.update_run(run_id, self.dest.name, status=RUN_CHECKING)
        source = self._source()
        window = self._window(run)
        spec = quality.ContractSpec.from_config(self.config, self.dest)
        aborted: str | None = None
        with self.state.heartbeat(self.dest.name, run_id, self.config.state.lease_ttl):
            # Importing great_expectations takes seconds: keep the lease alive meanwhile.
            session = quality.ContractSession(spec, run_id, self.clock())
            if session.check_columns(quality.source_columns(self.warehouse, source.query)):
                aborted = self._check_rows(run_id, session, source, window,
                                           run["watermark_before"])
            report = session.finish(aborted=aborted)
        counts = {"checked": report.rows, "quarantined": sum(report.quarantined.values()),
                  **{f"quarantined.{rule}": n for rule, n in report.quarantined.items()}}
        if report.outside_window_rows:
            counts["checked_outside_window"] = report.outside_window_rows
        if report.identifiers_dropped:
            counts[IDENTIFIERS_DROPPED] = sum(report.identifiers_dropped.values())
            counts.update({f"{IDENTIFIERS_DROPPED}.{k}": n
                           for k, n in report.identifiers_dropped.items()})
        self.state.set_run_counts(run_id, self.dest.name, counts,
                                  replace_prefixes=("quarantined.", "checked_outside_window",
                                                    IDENTIFIERS_DROPPED))
        if not report.passed:
            self.state.update_run(run_id, self.dest.name, status=RUN_CONTRACT_FAILED)
            log.error("%s", report.describe())
            raise quality.ContractViolation(report)
        self.state.update_run(run_id, self.dest.name, status=RUN_RUNNING)
        log.info("%s", report.describe())
        if report.data_docs:
            log.info("Data Docs of this check: %s", report.data_docs)
        return report.as_dict()

    def _check_rows(self, run_id: str, session: quality.ContractSession, source: Source,
                    window: Window, run_watermark: Cursor | None) -> str | None:
        """Streams the window through the session, quarantining as it goes; returns why it
        stopped early, if it did."""
        spec = session.spec
        duplicated = quality.window_key_counts(source, window, spec.max_quarantined_rows)
        if len(duplicated) > spec.max_quarantined_rows:
            return (f"more than {spec.max_quarantined_rows} (lead_id, stage) keys occur more "
                    "than once in the window: the source query probably fans out (a join)")

        def same_key_rows(row: Mapping[str, Any]) -> int:
            return duplicated.get(quality.duplicate_key(row.get("lead_id"), row.get("stage")), 1)

        def quarantine(failures: list[quality.Failure]) -> None:
            if failures:
                self.state.quarantine_rows(self.dest.name, run_id,
                                           [f.record() for f in failures])

        watermark = run_watermark

        def is_new(row: Mapping[str, Any]) -> bool:
            # Rows the lookback re-reads were judged by the run that moved the watermark.
            return watermark is None or row["_cursor"].ts > watermark.ts

        stream = source.stream(window)
        try:
            for chunk in stream:
                quarantine(session.add(chunk, same_key_rows if duplicated else None,
                                       is_new=is_new))
                if session.over_limit:
                    return "stopped reading the window"
        finally:
            close = getattr(stream, "close", None)  # a generator holding a DB cursor
            if close is not None:
                close()
        quarantine(session.flush())
        if self.config.contract.scan_null_cursor and not session.over_limit:
            outside = quality.null_cursor_rows(source, spec.max_quarantined_rows + 1)
            quarantine(session.add(outside, outside_window=True) + session.flush())
        return None

    def stage(self, run_id: str) -> dict[str, Any]:
        """Reads the window, applies eligibility, writes outbox batches.

        Rows the contract check of this run quarantined are skipped by key (no second
        validation); the rest pass a guard (:func:`leadsync.quality.check_row`) for rows that
        were committed after the check. Returns the ids of every pending batch of the
        destination (older runs' first) and the counts. Identifiers are hashed in memory; only
        hashed payloads reach the outbox.
        """
        self._hold(run_id)
        run = self._opened(run_id)
        if run["status"] in (RUN_CHECKING, RUN_CONTRACT_FAILED):
            raise RuntimeError(f"run {run_id} of {self.dest.name}: the data contract check has "
                               "not passed (see check_contract); nothing is staged")
        source = self._source()
        source.check_columns()
        window = self._window(run)
        checked_out = self.state.quarantine_keys_for_run(self.dest.name, run_id)
        now = self.clock()
        size = min(self.dest.batch_size or self.module.LIMITS.max_batch_events,
                   self.module.LIMITS.max_batch_events)
        counts: Counter[str] = Counter()
        open_quarantine = self.state.open_quarantine_keys(self.dest.name)
        buf = _Buffer()
        seq = 0
        prev_row: Cursor | None = None
        last: Cursor | None = None

        def flush() -> None:
            nonlocal seq
            if not buf.envelopes:
                return
            seq += 1
            batch_id = uuid.uuid4().hex
            records = [
                LedgerRecord(r.event_id, r.lead_id, r.stage, r.event_name, PENDING, r.source_ts,
                             r.event_time, batch_id=batch_id)
                for r in buf.records
            ]
            self.state.stage_batch(self.dest.name, run_id, batch_id, seq, buf.envelopes,
                                   records, buf.prev)
            counts["staged"] += len(buf.envelopes)
            counts["batches"] += 1
            buf.envelopes, buf.records, buf.ids, buf.prev = [], [], set(), None
            if seq % 50 == 0:
                self.state.analyze()  # a backfill outgrows the planner's statistics
            crash_point("after_stage_batch")

        planner = Planner(self.dest, self.module, now)
        with self.state.heartbeat(self.dest.name, run_id, self.config.state.lease_ttl):
            for chunk in source.stream(window):
                plans: list[tuple[dict[str, Any], Cursor | None, Planned | Rejected]] = []
                for row in chunk:
                    if checked_out and quality.quarantine_key(row) in checked_out:
                        plans.append((row, prev_row, _CHECKED_OUT))
                    else:
                        plans.append((row, prev_row, planner.plan(row)))
                    prev_row = row["_cursor"]
                counts["read"] += len(chunk)
                last = prev_row
                ids = [p.event_id for _, _, p in plans if p.event_id]
                known = self.state.ledger_lookup(self.dest.name, ids)
                terminal: list[LedgerRecord] = []
                quarantined: list[QuarantineRecord] = []
                passed: list[tuple[str, str]] = []
                for row, prev, plan in plans:
                    cursor: Cursor = row["_cursor"]
                    key = (str(row.get("lead_id")), str(row.get("stage")))
                    if plan is _CHECKED_OUT:
                        continue  # quarantined and counted by this run's check
                    qkey = quality.quarantine_key(row)
                    if isinstance(plan, Rejected) and plan.status == "quarantined":
                        quarantined.append(QuarantineRecord(qkey[0], qkey[1], plan.reason,
                                                            plan.detail, cursor.ts))
                        counts["quarantined"] += 1
                        counts[f"quarantined.{plan.reason}"] += 1
                        continue
                    if qkey in open_quarantine:
                        passed.append(qkey)
                    if isinstance(plan, Rejected) and plan.event_id is None:
                        counts["skipped"] += 1
                        counts[f"skipped.{plan.reason}"] += 1
                        continue
                    event_id = plan.event_id
                    assert event_id is not None
                    entry = known.get(event_id)
                    if event_id in buf.ids or (entry and entry.status == PENDING):
                        counts["in_flight"] += 1
                        continue
                    if entry and entry.status in (DELIVERED, FAILED):
                        counts[f"already_{entry.status}"] += 1
                        continue
                    if entry and entry.status in REEVALUATE and cursor.ts <= entry.source_ts:
                        counts["unchanged"] += 1
                        continue
                    if isinstance(plan, Rejected):
                        terminal.append(LedgerRecord(
                            event_id, key[0][:128], key[1][:64], plan.event_name, plan.status,
                            cursor.ts, plan.event_time, reason=plan.reason))
                        bucket = "expired" if plan.status == EXPIRED else "skipped"
                        counts[bucket] += 1
                        counts[f"{bucket}.{plan.reason}"] += 1
                        continue
                    if not buf.envelopes:
                        buf.prev = prev
                    buf.envelopes.append(plan.stored_envelope())
                    buf.ids.add(event_id)
                    buf.records.append(LedgerRecord(
                        event_id, key[0][:128], key[1][:64], plan.event_name, PENDING, cursor.ts,
                        plan.event_time))
                    if len(buf.envelopes) >= size:
                        flush()
                if terminal:
                    self.state.record_terminal(self.dest.name, run_id, terminal)
                if quarantined:
                    self.state.quarantine_rows(self.dest.name, run_id, quarantined)
                if passed:
                    counts["quarantine_resolved"] += self.state.resolve_quarantine(
                        self.dest.name, passed)
                crash_point("after_stage_chunk")
            flush()
        crash_point("after_stage")
        if counts["batches"]:
            self.state.analyze()
        self.state.update_run(run_id, self.dest.name, counts=counts, window_max=last)
        batch_ids = self.state.pending_batch_ids(self.dest.name)
        # The identifiers this run's events go without (counted by the check, which judged
        # them with the same normalisation): reported here too, not added to the run twice.
        dropped = {k: v for k, v in run["counts"].items() if k.startswith(IDENTIFIERS_DROPPED)}
        log.info("staged %s: %s; %d batch(es) to push", self.dest.name, dict(counts),
                 len(batch_ids))
        if dropped:
            log.warning("staged %s without unusable identifiers (the rows are sent on their "
                        "other match keys): %s", self.dest.name, dropped)
        return {"batch_ids": batch_ids, "counts": {**counts, **dropped}}

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
        totals: Counter[str] = Counter()
        try:
            def renew() -> None:
                self.state.renew_claims(self.dest.name, holder, ttl)

            with self.state.heartbeat(self.dest.name, run_id, ttl, also=renew):
                while True:
                    if totals["batches"]:
                        crash_point("between_batches")
                        self._hold(run_id)  # a run that lost its lease stops here
                    batch = self.state.claim_batch(self.dest.name, run_id, holder, ttl,
                                                   batch_id=batch_id, raw_bodies=raw)
                    if batch is None:
                        break
                    try:
                        counts = self._send_claimed(run_id, batch, sender, holder)
                    finally:
                        # Unwinding (an error, a task killed by Airflow): the batch is free
                        # again at once. Outcomes already recorded released the claim.
                        self.state.release_claim(batch.batch_id, holder)
                    totals.update(counts)
                    totals["batches"] += 1
                    if batch_id is not None:
                        break
        finally:
            if own_client:
                http.close()
        if batch_id is None:
            log.info("%s of %s drained: %s", name, self.dest.name, dict(totals))
        return dict(totals) if totals["batches"] else {}

    def _send_claimed(self, run_id: str, batch: Batch, sender: BatchSender,
                      holder: str) -> dict[str, int]:
        crash_point("before_send")
        report = sender.deliver(batch.events, self.clock())
        counts = dict(summarize(report))
        crash_point("after_send_before_record")
        self.state.record_outcomes(batch, report.outcomes, run_id, counts, holder=holder,
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
        self.state.update_run(run_id, self.dest.name, status=status)
        self.state.release_lease(self.dest.name, run_id)
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


__all__ = ["DELIVERED", "FAILED", "Pipeline", "Planned", "Planner", "Rejected", "plan_row",
           "render_requests", "row_event_id"]

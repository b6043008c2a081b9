"""Reprocessing: resend dead letters or a window of events after a fix, with the same ids.

Modes:

- ``failed``: replay the destination's dead letters (ledger status ``failed``), re-read from
  the warehouse so that a fix made upstream or in the config is applied;
- ``window``: resend every eligible event whose ``event_time`` is in [start, end] (or whose lead
  is in ``lead_ids``), delivered ones included — with the same event ids, so the platform
  deduplicates what it already has;
- ``dry_run``: plan and count only; nothing is written or sent.

A reprocess run holds the destination's lease like a normal run (the two never interleave),
never moves the watermark, and never sends an event outside the platform's age window.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text

from leadsync import quality
from leadsync.pipeline import Pipeline, Planned, Planner, Rejected, batch_size
from leadsync.redact import clean_error
from leadsync.source import SourceError, to_utc
from leadsync.state import FAILED, FAILED_REASONS, PENDING, Cursor, LedgerRecord, ledger

log = logging.getLogger(__name__)

MODES = ("failed", "window", "dry_run")
_IN_CHUNK = 500


class ReprocessParamsError(ValueError):
    """The reprocess parameters are invalid (the message names the parameter)."""


@dataclass(frozen=True)
class ReprocessRequest:
    """What to reprocess."""

    mode: str
    start: datetime | None = None
    end: datetime | None = None
    lead_ids: tuple[str, ...] = ()
    test_event_code: str | None = None

    def describe(self) -> str:
        """One line for logs (lead ids are counted, not listed)."""
        parts = [f"mode={self.mode}"]
        if self.start or self.end:
            parts.append(f"event_time in [{self.start.isoformat() if self.start else '…'}, "
                         f"{self.end.isoformat() if self.end else '…'}]")
        if self.lead_ids:
            parts.append(f"{len(self.lead_ids)} lead id(s)")
        if self.test_event_code:
            parts.append("with a test event code")
        return ", ".join(parts)


def _parse_time(name: str, value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    parsed = to_utc(value)
    if parsed is None:
        raise ReprocessParamsError(f"{name}: {value!r} is not an ISO-8601 date-time")
    return parsed


def parse_request(params: Mapping[str, Any]) -> ReprocessRequest:
    """Validates the DAG's Params (or the CLI's options) into a request."""
    mode = str(params.get("mode") or "dry_run")
    if mode not in MODES:
        raise ReprocessParamsError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    start = _parse_time("window_start", params.get("window_start"))
    end = _parse_time("window_end", params.get("window_end"))
    if start and end and start > end:
        raise ReprocessParamsError("window_start is after window_end")
    raw_ids = params.get("lead_ids") or ()
    if isinstance(raw_ids, str):
        raw_ids = raw_ids.replace("\n", ",").split(",")
    lead_ids = tuple(dict.fromkeys(str(i).strip() for i in raw_ids if str(i).strip()))
    if mode == "window" and not (start or end or lead_ids):
        raise ReprocessParamsError(
            "mode 'window' needs window_start/window_end or lead_ids (refusing to resend "
            "everything)"
        )
    code = params.get("test_event_code") or None
    return ReprocessRequest(mode, start, end, lead_ids, str(code) if code else None)


class Reprocessor:
    """Runs one reprocess request for one destination, reusing the pipeline's steps."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.dest = pipeline.dest
        self.state = pipeline.state

    # -- selection ------------------------------------------------------------------------

    def _failed_keys(self, req: ReprocessRequest) -> list[tuple[str, str]]:
        query = select(ledger.c.lead_id, ledger.c.stage, ledger.c.event_time).where(
            ledger.c.destination == self.dest.name, ledger.c.status == FAILED,
            ledger.c.reason.in_(FAILED_REASONS),  # the index of dead letters (Postgres)
        )
        keys = []
        wanted = set(req.lead_ids)
        with self.state.engine.connect() as conn:
            for lead_id, stage, event_time in conn.execute(query):
                if wanted and lead_id not in wanted:
                    continue
                if req.start and (event_time is None or event_time < req.start):
                    continue
                if req.end and (event_time is None or event_time > req.end):
                    continue
                keys.append((lead_id, stage))
        return keys

    def _rows(self, conditions: list[str], params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        pipeline = self.pipeline
        src = pipeline.config.source
        sqlite = pipeline.warehouse.dialect.name == "sqlite"
        ts = ("strftime('%Y-%m-%d %H:%M:%f', src.updated_at)" if sqlite
              else "src.updated_at")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        sql = (f"SELECT src.*, {ts} AS _ls_ts FROM ({src.read_query()}) src {where} "
               "ORDER BY _ls_ts, src.lead_id, src.stage")
        try:
            with pipeline.warehouse.connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=src.chunk_size
                                                ).execute(text(sql), params)
                for mapping in result.mappings():
                    row = dict(mapping)
                    cursor_ts = to_utc(row.pop("_ls_ts")) or datetime.now(UTC)
                    row["_cursor"] = Cursor(cursor_ts, row.get("lead_id"),
                                            str(row.get("stage")))
                    yield row
        except Exception as exc:  # noqa: BLE001 - a driver's message can quote a row's value
            raise SourceError(f"reading the source failed: {clean_error(exc)}") from None

    def _event_time_conditions(self, req: ReprocessRequest) -> tuple[list[str], dict[str, Any]]:
        sqlite = self.pipeline.warehouse.dialect.name == "sqlite"
        col = "strftime('%Y-%m-%d %H:%M:%f', src.event_time)" if sqlite else "src.event_time"
        conds: list[str] = []
        params: dict[str, Any] = {}
        for name, value, op in (("start", req.start, ">="), ("end", req.end, "<=")):
            if value is not None:
                conds.append(f"{col} {op} :{name}")
                params[name] = (value.strftime("%Y-%m-%d %H:%M:%S.%f")[:23] if sqlite
                                else value)
        return conds, params

    def select(self, req: ReprocessRequest) -> Iterator[dict[str, Any]]:
        """The warehouse rows the request covers, in cursor order per lookup."""
        conds, params = self._event_time_conditions(req)
        if req.mode == "failed":
            keys = self._failed_keys(req)
            wanted = set(keys)
            leads = sorted({k[0] for k in keys})
            for i in range(0, len(leads), _IN_CHUNK):
                part = leads[i : i + _IN_CHUNK]
                names = {f"l{j}": lead for j, lead in enumerate(part)}
                in_clause = f"src.lead_id IN ({', '.join(':' + n for n in names)})"
                for row in self._rows([in_clause], names):
                    if (str(row.get("lead_id")), str(row.get("stage"))) in wanted:
                        yield row
            return
        if req.lead_ids:
            for i in range(0, len(req.lead_ids), _IN_CHUNK):
                names = {f"l{j}": lead for j, lead in enumerate(req.lead_ids[i : i + _IN_CHUNK])}
                in_clause = f"src.lead_id IN ({', '.join(':' + n for n in names)})"
                yield from self._rows([*conds, in_clause], {**params, **names})
            return
        yield from self._rows(conds, params)

    def _delivered_at(self, event_ids: Sequence[str]) -> dict[str, datetime]:
        found: dict[str, datetime] = {}
        with self.state.engine.connect() as conn:
            for i in range(0, len(event_ids), _IN_CHUNK):
                for event_id, delivered_at in conn.execute(
                    select(ledger.c.event_id, ledger.c.delivered_at).where(
                        ledger.c.destination == self.dest.name,
                        ledger.c.event_id.in_(event_ids[i : i + _IN_CHUNK]),
                        ledger.c.delivered_at.is_not(None),
                    )
                ):
                    found[event_id] = delivered_at
        return found

    # -- steps ----------------------------------------------------------------------------

    def run(self, req: ReprocessRequest, run_id: str | None = None) -> dict[str, Any]:
        """Open, stage, push and close a reprocess run; returns its report."""
        run_id = run_id or f"reprocess__{uuid.uuid4().hex[:12]}"
        pipeline = self.pipeline
        cfg = pipeline.config.state
        pipeline.state.migrate()
        if req.mode != "dry_run":
            self.state.wait_for_lease(self.dest.name, run_id, cfg.lease_ttl, cfg.lease_wait)
            self.state.start_run(run_id, self.dest.name, req.start, req.end or pipeline.clock(),
                                 self.state.get_watermark(self.dest.name))
        counts: Counter[str] = Counter()
        batch_ids: list[str] = []
        try:
            batch_ids = self._stage(run_id, req, counts)
            if req.mode != "dry_run":
                self.state.update_run(run_id, self.dest.name, counts=counts)
                if req.test_event_code:
                    pipeline = self._with_test_code(req.test_event_code)
                errors = []
                for batch_id in batch_ids:
                    try:
                        for key, value in pipeline.push(run_id, batch_id).items():
                            counts[key] += value
                    except RuntimeError as exc:
                        errors.append(str(exc))
                if errors:
                    counts["push_errors"] = len(errors)
        finally:
            if req.mode != "dry_run":
                pending = set(self.state.pending_batch_ids(self.dest.name)) & set(batch_ids)
                self.state.update_run(run_id, self.dest.name,
                                      status="success" if not pending else "partial")
                self.state.release_lease(self.dest.name, run_id)
        report = {"destination": self.dest.name, "run_id": run_id, "request": req.describe(),
                  "batches": len(batch_ids), "counts": dict(sorted(counts.items()))}
        log.info("reprocess %s: %s", self.dest.name, report)
        return report

    def _with_test_code(self, code: str) -> Pipeline:
        base = self.pipeline._credentials

        def creds() -> Any:
            current = base() if base else None
            if current is not None and dataclasses.is_dataclass(current) and hasattr(
                    current, "test_event_code"):
                return dataclasses.replace(current, test_event_code=code)  # type: ignore[type-var]
            return current

        clone = Pipeline(self.pipeline.config, self.dest, self.state, self.pipeline.warehouse,
                         credentials=creds, clock=self.pipeline.clock, sleep=self.pipeline.sleep)
        return clone

    def _stage(self, run_id: str, req: ReprocessRequest, counts: Counter[str]) -> list[str]:
        pipeline = self.pipeline
        module = pipeline.module
        now = pipeline.clock()
        size = batch_size(self.dest, module)
        envelopes: list[dict[str, Any]] = []
        records: list[LedgerRecord] = []
        seen: set[str] = set()
        batch_ids: list[str] = []

        def flush() -> None:
            if not envelopes:
                return
            batch_id = uuid.uuid4().hex
            if req.mode != "dry_run":
                self.state.stage_batch(self.dest.name, run_id, batch_id, len(batch_ids) + 1,
                                       list(envelopes), list(records), None)
            batch_ids.append(batch_id)
            counts["staged"] += len(envelopes)
            envelopes.clear()
            records.clear()

        dedup_window = module.LIMITS.dedup_window
        contract = pipeline.config.contract.enabled
        planner = Planner(self.dest, module, now)
        for chunk in _chunks(self.select(req), 500):
            # The same data contract as a normal run (run in memory, like render): a row it
            # rejects is not resent, whatever it was before.
            verdicts = (quality.check_rows(chunk, pipeline.config, self.dest, now)
                        if contract else [None] * len(chunk))
            plans: list[tuple[dict[str, Any], Planned | Rejected]] = [
                (row, Rejected(v.rule, "quarantined", v.detail) if v is not None
                 else planner.plan(row))
                for row, v in zip(chunk, verdicts, strict=True)
            ]
            known = self._delivered_at([p.event_id for _, p in plans if p.event_id])
            for row, plan in plans:
                counts["read"] += 1
                if isinstance(plan, Rejected):
                    bucket = "quarantined" if plan.status == "quarantined" else "skipped"
                    counts[f"{bucket}.{plan.reason}"] += 1
                    counts[bucket] += 1
                    continue
                if plan.event_id in seen:
                    counts["skipped.duplicate_event_id"] += 1
                    counts["skipped"] += 1
                    continue
                delivered_at = known.get(plan.event_id)
                if delivered_at is not None:
                    if dedup_window is not None and delivered_at < now - dedup_window:
                        # The platform would count it again: resending would double count.
                        counts["skipped.outside_platform_dedup_window"] += 1
                        counts["skipped"] += 1
                        continue
                    counts["previously_delivered"] += 1
                seen.add(plan.event_id)
                cursor: Cursor = row["_cursor"]
                envelopes.append(plan.stored_envelope())
                records.append(LedgerRecord(plan.event_id, str(row["lead_id"])[:128],
                                            str(row["stage"])[:64], plan.event_name, PENDING,
                                            cursor.ts, plan.event_time))
                if len(envelopes) >= size:
                    flush()
        flush()
        if req.mode == "dry_run":
            counts["would_send"] = counts.pop("staged", 0)
            return []
        return batch_ids


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def reprocess(pipelines: Sequence[Pipeline], req: ReprocessRequest,
              run_id: str | None = None) -> list[dict[str, Any]]:
    """Reprocesses each destination in turn (each under its own lease)."""
    return [Reprocessor(p).run(req, run_id) for p in pipelines]

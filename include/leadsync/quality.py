"""The data contract: a Great Expectations suite built in code, row quarantine, a breaker.

The contract is the source contract (the columns documented in the header of
``include/sql/converted_leads.sql``; see ``docs/architecture.md``) as a GX Core 1.x Expectation
Suite, built from the config for one destination (its stage map, its match keys, its future
tolerance). Every expectation carries a stable rule code in its ``meta``; a row that breaks one
is quarantined with that code and a short, fixed detail, never with the value that broke it.

How it runs (one run of one destination, :class:`ContractSession`):

1. **Structure**: the source query's column names (a zero-row query) against the required
   columns (``expect_column_to_exist``). A missing column stops the run before any row is read.
2. **Rows**, streamed: rows are projected, as they arrive, onto the few columns the rules look
   at (timestamps parsed, blanks as nulls, each identifier the destination sends judged usable
   or not by its own normalisation, usable match keys counted; no raw identifier is kept) and
   validated by GX in batches of ``contract.batch_rows``, so memory stays flat. A batch is
   validated for its counts, then again with only the expectations some row failed, whose
   ``unexpected_index_list`` names the failing rows; a row's reason is the first rule it
   breaks, in the order of :data:`RULES`. Identifier rules (``bad_email``, ``bad_phone``,
   ``bad_country``) are expectations of severity ``warning``: an unusable identifier is left
   out of the event and counted (:attr:`ContractReport.identifiers_dropped`), the row is not
   quarantined unless no usable match key is left (``no_match_keys``).
3. **Window-level facts** that a batch cannot see are pushed down to the warehouse: the number
   of rows sharing each (lead_id, stage) in the whole window (one ``GROUP BY``), which GX then
   checks per row; and rows whose ``updated_at`` is null, which the incremental window can never
   see (one filtered query), validated like the others so that they are quarantined, not lost.
4. **Breaker** (:meth:`ContractSession.finish`): a structural failure (a missing column, or a
   column without a single usable value), more failing rows than
   ``contract.max_quarantined_rows``, or a failing share above ``contract.failure_threshold``
   among the rows new since the watermark (judged once there are ``failure_min_rows`` of them;
   rows the lookback re-reads were judged by the run that moved the watermark) stops the run:
   the caller raises :class:`ContractViolation` before anything is staged. The per-batch GX
   results are summed into one validation result per run, stripped of every unexpected value,
   and rendered as Data Docs (HTML) under ``contract.data_docs_dir``.

``leadsync render`` runs the very same suite on its rows in memory (:func:`check_rows`), so the
reason codes are identical by construction. :func:`check_row` is not a second contract: it is
the stage step's crash guard for rows that reach it without having been checked (committed
late, between the check and the stage), covering only what planning needs, with the same codes
(a unit test holds it to agree with GX).

``great_expectations`` and ``pandas`` are imported lazily, inside the functions that validate:
never when a DAG file is parsed.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import os
import re
import threading
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leadsync.redact import clean_error, clean_message
from leadsync.source import REQUIRED_COLUMNS, UNREADABLE_RULE, UnreadableRow, to_utc
from leadsync.state import QuarantineRecord

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy import Engine

    from leadsync.config import Config, DestinationConfig
    from leadsync.identity import FieldRule
    from leadsync.source import Source, Window

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from leadsync.contract_worker import WorkerValidator

# Batches handed to the worker process and still without a verdict, at most (memory bound:
# their rows wait, hashed and encoded). Measured at 200k rows: with 1 the pass waited ~3 s
# for the worker's GX import and the task peaked at 350 MB; with 4 it did not wait and
# peaked at 418 MB. Two: most of the gain, under 400 MB.
MAX_BATCHES_IN_FLIGHT = 2

MAX_ID_LENGTH = 128  # ls_quarantine.lead_id / ls_ledger.lead_id
MAX_STAGE_LENGTH = 64  # ls_quarantine.stage / ls_ledger.stage
_MAX_VALUE = 1e15  # larger deal values are a unit error (cents in a currency column, ...)


# -- rules -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A rule of the contract, by its stable code (what quarantine entries and counts show).

    ``kind`` says what breaking it does: ``row`` quarantines the row, ``structural`` stops the
    run, ``identifier`` drops one unusable identifier from the event and counts it (a warning:
    the row is sent on its other match keys, or quarantined ``no_match_keys`` if none is left).
    """

    code: str
    summary: str
    kind: str = "row"

    @property
    def structural(self) -> bool:
        """Breaking it stops the run (it cannot be disabled)."""
        return self.kind == "structural"

    @property
    def identifier(self) -> bool:
        """Breaking it drops an identifier, not the row (a warning)."""
        return self.kind == "identifier"


# Order matters: a row that breaks several rules is quarantined under the first one.
RULES: dict[str, Rule] = {
    rule.code: rule
    for rule in (
        Rule("missing_column", "a required column is missing from the source query",
             "structural"),
        Rule("unreadable_row", "the warehouse driver cannot read the row (undecodable text, "
             "a value out of Python's range)"),
        Rule("missing_lead_id", "lead_id is null or blank"),
        Rule("missing_stage", "stage is null or blank"),
        Rule("missing_event_time", "event_time is null or blank"),
        Rule("missing_updated_at", "updated_at is null or blank"),
        Rule("bad_type", "a value of an unusable type; a column with no usable value at all "
             "is structural", "structural"),
        Rule("bad_lead_id", "lead_id is longer than 128 characters or has control characters"),
        Rule("unknown_stage", "stage is in no destination's stage map nor in "
             "contract.known_stages"),
        Rule("duplicate_lead_stage", "(lead_id, stage) occurs more than once in the window"),
        Rule("future_event_time", "event_time is in the future beyond future_tolerance"),
        Rule("event_after_updated_at", "event_time is after updated_at beyond "
             "future_tolerance"),
        Rule("bad_value", "value is not a finite number >= 0"),
        Rule("bad_currency", "currency is not an ISO-4217 code, or a value has no currency"),
        Rule("no_match_keys", "no match key the destination needs holds a usable value"),
        # Identifier rules: the value is dropped from the event and counted, the row is sent.
        Rule("bad_email", "email is not usable (nor a SHA-256 hex digest): dropped", "identifier"),
        Rule("bad_phone", "phone cannot be made E.164 (nor is a SHA-256 hex digest): dropped",
             "identifier"),
        Rule("bad_country", "country is no ISO-3166-1 country (nor a SHA-256 hex digest): "
             "dropped", "identifier"),
    )
}
_RULE_RANK = {code: rank for rank, code in enumerate(RULES)}

#: The identifier rules by the source column they judge. Each destination judges the columns
#: its events carry (its module's ``IDENTIFIER_RULES``), with the very normalisation that
#: builds them (:func:`leadsync.identity.is_usable`): what is counted is what is dropped.
IDENTIFIER_RULE_CODES: dict[str, str] = {"email": "bad_email", "phone": "bad_phone",
                                         "country": "bad_country"}

# Match keys of a destination type whose module declares none (MATCH_KEY_GROUPS in the module,
# see leadsync.destinations.meta): every column any destination matches on.
_ANY_MATCH_KEY: tuple[tuple[str, ...], ...] = (
    ("email",), ("phone",), ("external_id",), ("first_name",), ("last_name",),
    ("meta_lead_id",), ("tiktok_lead_id",), ("fbc",), ("fbp",), ("ttclid",), ("ttp",),
    ("gclid",), ("gbraid",), ("wbraid",), ("client_ip", "user_agent"))

# ISO 4217 currencies in circulation (funds, metals and test codes left out).
ISO_4217: frozenset[str] = frozenset("""
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND BOB BRL BSD BTN BWP BYN BZD
CAD CDF CHF CLP CNY COP CRC CUC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS
GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW
KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD
NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD
SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS
VED VES VND VUV WST XAD XAF XCD XCG XOF XPF YER ZAR ZMW ZWG ZWL
""".split())

_CONTROL_REGEX = r"[\x00-\x1f\x7f]"
_CONTROL_SEARCH = re.compile(_CONTROL_REGEX).search
_ZERO = timedelta(0)


# -- pure helpers (shared by the suite's projection and the stage step's guard) ----------------


def parse_timestamp(value: Any) -> datetime | None:
    """A timestamp the contract accepts, as aware UTC: a datetime, a date or ISO-8601 text.

    Numbers are refused: an epoch column is ambiguous (seconds? milliseconds?).
    """
    if value is None or isinstance(value, bool | int | float | Decimal):
        return None
    try:
        return to_utc(value)
    except (OverflowError, ValueError):  # "0001-01-01T00:00+14:00" has no UTC year
        return None


def _present(value: Any) -> Any:
    """The value, or None when it is null, NaN or a blank string (a blank counts as absent)."""
    cls = value.__class__
    if cls is str:
        return value if value.strip() else None
    if value is None or (cls is float and math.isnan(value)):
        return None
    return value


def _epoch(value: Any) -> float:
    """:func:`parse_timestamp` as epoch seconds (NaN when not a usable timestamp)."""
    if value is None:
        return math.nan
    if value.__class__ is datetime and value.tzinfo is not None:
        return value.timestamp()  # the common case (Postgres), without a conversion
    parsed = parse_timestamp(value)
    return parsed.timestamp() if parsed is not None else math.nan


def _number(value: Any) -> float:
    """A deal value as float (NaN when absent or not a number; may be negative or infinite)."""
    if value is None or isinstance(value, bool):
        return math.nan
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(Decimal(str(value).strip()))
    except (InvalidOperation, ValueError, OverflowError):
        return math.nan


def _key_text(value: Any, limit: int) -> str:
    # NUL cannot be stored in Postgres text; the same mapping on both sides keeps lookups exact.
    return ("" if value is None else str(value)).replace("\x00", "\ufffd")[:limit]


def quarantine_key(row: Mapping[str, Any]) -> tuple[str, str]:
    """(lead_id, stage) as the quarantine table keys a row (truncated to its columns)."""
    return _key_text(row.get("lead_id"), MAX_ID_LENGTH), _key_text(row.get("stage"),
                                                                   MAX_STAGE_LENGTH)


def duplicate_key(lead_id: Any, stage: Any) -> tuple[str, str]:
    """(lead_id, stage) as the duplicate rule compares them: text, spaces trimmed.

    It is what SQL's ``TRIM(CAST(x AS VARCHAR))`` gives, so the warehouse's ``GROUP BY`` and
    an in-memory count agree; ``"00Q1"`` and ``"00Q1 "`` are one lead twice.
    """
    return ("" if lead_id is None else str(lead_id)).strip(" "), (
        "" if stage is None else str(stage)).strip(" ")


def check_row(
    row: Mapping[str, Any], now: datetime, future_tolerance: timedelta = timedelta(seconds=60)
) -> tuple[str, str] | None:
    """The stage step's guard: the first guarded rule a row breaks, as (code, detail).

    Covers what planning needs to be safe (ids, stage, event_time); the full contract is the
    GX suite, which the check step runs before stage. Same codes and precedence as the suite.
    """
    verdict = guard_row(row, now, future_tolerance)
    return verdict if isinstance(verdict, tuple) else None


def guard_row(
    row: Mapping[str, Any], now: datetime, future_tolerance: timedelta = timedelta(seconds=60)
) -> tuple[str, str] | datetime:
    """:func:`check_row`, returning the parsed event_time when the row passes (so planning
    does not parse it twice: this runs once per row of every run)."""
    lead_id = row.get("lead_id")
    stage = row.get("stage")
    raw_time = row.get("event_time")
    # The common case (text ids, an aware UTC timestamp from Postgres) without conversions;
    # anything else takes the general path below, with the same verdicts.
    if (lead_id.__class__ is str and stage.__class__ is str and raw_time.__class__ is datetime
            and raw_time.utcoffset() == _ZERO and lead_id.strip() and stage.strip()
            and len(lead_id) <= MAX_ID_LENGTH and not _CONTROL_SEARCH(lead_id)):
        if raw_time - now > future_tolerance:
            return "future_event_time", f"event_time is more than {_duration(future_tolerance)} " \
                                        "in the future"
        return raw_time
    lead_id = _present(lead_id)
    stage = _present(stage)
    raw_time = _present(raw_time)
    if lead_id is None:
        return "missing_lead_id", "lead_id is null or blank"
    if stage is None:
        return "missing_stage", "stage is null or blank"
    if raw_time is None:
        return "missing_event_time", "event_time is null or blank"
    if isinstance(lead_id, bool) or not isinstance(lead_id, str | int):
        return "bad_type", "lead_id is neither text nor an integer"
    if not isinstance(stage, str):
        return "bad_type", "stage is not text"
    event_time = parse_timestamp(raw_time)
    if event_time is None:
        return "bad_type", "event_time is not a timestamp"
    text = str(lead_id)
    if len(text) > MAX_ID_LENGTH:
        return "bad_lead_id", f"lead_id is longer than {MAX_ID_LENGTH} characters"
    if _CONTROL_SEARCH(text):
        return "bad_lead_id", "lead_id contains control characters"
    if event_time - now > future_tolerance:
        return "future_event_time", f"event_time is more than {_duration(future_tolerance)} " \
                                    "in the future"
    return event_time


def _duration(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# -- the suite, as data ------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One expectation of the suite and the rule it enforces."""

    rule: str
    detail: str  # what a quarantine entry says (fixed text, never a value)
    expectation: str  # GX expectation class name
    kwargs: Mapping[str, Any]
    identifier: str | None = None  # the source column an identifier rule judges

    @property
    def warning(self) -> bool:
        """An identifier rule: a failing value is dropped and counted, the row is not."""
        return self.identifier is not None

    @property
    def severity(self) -> str:
        """GX's severity of the expectation (``warning`` or ``critical``)."""
        return "warning" if self.warning else "critical"

    @property
    def label(self) -> str:
        """``expect_column_values_to_be_between(column=x, max_value=1)``, for messages."""
        parts = []
        for key, value in self.kwargs.items():
            if isinstance(value, list | tuple | set | frozenset):
                value = f"<{len(value)} values>"
            parts.append(f"{key}={value}")
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", self.expectation).lower()
        return f"{snake}({', '.join(parts)})"


@dataclass(frozen=True)
class ContractSpec:
    """Everything the suite of one destination depends on (built from the config)."""

    destination: str
    destination_type: str
    known_stages: frozenset[str]
    future_tolerance: timedelta
    match_key_groups: tuple[tuple[str, ...], ...]
    disabled: frozenset[str] = frozenset()
    # The destination's identifier rules (leadsync.identity), judged per column.
    identifier_rules: tuple[FieldRule, ...] = ()
    failure_threshold: float = 0.2
    failure_min_rows: int = 20
    max_quarantined_rows: int = 10_000
    batch_rows: int = 10_000
    data_docs_dir: Path | None = None
    data_docs_keep: int = 100

    @classmethod
    def from_config(cls, config: Config, dest: DestinationConfig, *,
                    data_docs: bool | None = None) -> ContractSpec:
        """The spec of ``dest``'s contract; ``data_docs=False`` renders no HTML (render)."""
        contract = config.contract
        stages = {s.strip() for d in config.destinations for s in d.stages}
        stages |= {s.strip() for s in contract.known_stages}
        docs = contract.data_docs if data_docs is None else data_docs
        return cls(
            destination=dest.name,
            destination_type=dest.type,
            known_stages=frozenset(stages),
            future_tolerance=dest.future_tolerance,
            match_key_groups=match_key_groups(dest.type),
            disabled=frozenset(contract.disabled_rules),
            identifier_rules=identifier_rules(dest.type),
            failure_threshold=contract.failure_threshold,
            failure_min_rows=contract.failure_min_rows,
            max_quarantined_rows=contract.max_quarantined_rows,
            batch_rows=contract.batch_rows,
            data_docs_dir=contract.data_docs_path() if docs else None,
            data_docs_keep=contract.data_docs_keep,
        )

    @property
    def judged_identifiers(self) -> tuple[tuple[str, FieldRule], ...]:
        """(rule code, identity rule) of each identifier rule this destination checks."""
        out = []
        for rule in self.identifier_rules:
            code = IDENTIFIER_RULE_CODES.get(rule.column)
            if code is not None and code not in self.disabled:
                out.append((code, rule))
        return tuple(out)

    @property
    def suite_name(self) -> str:
        """The suite's name in GX and in the Data Docs."""
        return f"leadsync_{self.destination}_contract"

    def structure_checks(self) -> list[Check]:
        """Columns the source query must return."""
        return [Check("missing_column", f"column {c} is missing", "ExpectColumnToExist",
                      {"column": c}) for c in REQUIRED_COLUMNS]

    def row_checks(self) -> list[Check]:
        """The row-level expectations, on the projected batch (see :class:`_Projection`)."""
        tol = self.future_tolerance.total_seconds()
        ahead = _duration(self.future_tolerance)
        keys = " / ".join("+".join(g) for g in self.match_key_groups)
        checks = [
            Check("missing_lead_id", "lead_id is null or blank", "ExpectColumnValuesToNotBeNull",
                  {"column": "lead_id"}),
            Check("missing_stage", "stage is null or blank", "ExpectColumnValuesToNotBeNull",
                  {"column": "stage"}),
            Check("missing_event_time", "event_time is null or blank",
                  "ExpectColumnValuesToNotBeNull", {"column": "event_time"}),
            Check("missing_updated_at", "updated_at is null or blank",
                  "ExpectColumnValuesToNotBeNull", {"column": "updated_at"}),
            # Python type names, judged with in_set: GX's in_type_list breaks on object
            # columns that mix dicts and booleans, which a loosely typed source can hold.
            Check("bad_type", "lead_id is neither text nor an integer",
                  "ExpectColumnValuesToBeInSet", {"column": "lead_id_type",
                                                  "value_set": ["int", "str"]}),
            Check("bad_type", "stage is not text", "ExpectColumnValuesToBeInSet",
                  {"column": "stage_type", "value_set": ["str"]}),
            Check("bad_type", "event_time is not a timestamp", "ExpectColumnValuesToBeInSet",
                  {"column": "event_time_type", "value_set": ["timestamp"]}),
            Check("bad_type", "updated_at is not a timestamp", "ExpectColumnValuesToBeInSet",
                  {"column": "updated_at_type", "value_set": ["timestamp"]}),
            Check("bad_lead_id", f"lead_id is longer than {MAX_ID_LENGTH} characters",
                  "ExpectColumnValueLengthsToBeBetween",
                  {"column": "lead_id_text", "max_value": MAX_ID_LENGTH}),
            Check("bad_lead_id", "lead_id contains control characters",
                  "ExpectColumnValuesToNotMatchRegex",
                  {"column": "lead_id_text", "regex": _CONTROL_REGEX}),
            Check("unknown_stage", "stage is in no destination's stage map",
                  "ExpectColumnValuesToBeInSet",
                  {"column": "stage_name", "value_set": sorted(self.known_stages)}),
            Check("duplicate_lead_stage", "(lead_id, stage) occurs more than once in the window",
                  "ExpectColumnValuesToBeBetween",
                  {"column": "rows_with_same_lead_stage", "max_value": 1}),
            Check("future_event_time", f"event_time is more than {ahead} in the future",
                  "ExpectColumnValuesToBeBetween",
                  {"column": "event_time_seconds_ahead_of_now", "max_value": tol}),
            Check("event_after_updated_at", f"event_time is more than {ahead} after updated_at",
                  "ExpectColumnValuesToBeBetween",
                  {"column": "event_time_seconds_after_updated_at", "max_value": tol}),
            Check("bad_value", "value is not a number", "ExpectColumnValuesToBeInSet",
                  {"column": "value_type", "value_set": ["number"]}),
            Check("bad_value", "value is negative or not finite", "ExpectColumnValuesToBeBetween",
                  {"column": "value_number", "min_value": 0, "max_value": _MAX_VALUE}),
            # A value without a currency reads as currency "(none)": not a code either.
            Check("bad_currency", "currency is missing for a value, or not an ISO-4217 code",
                  "ExpectColumnValuesToBeInSet",
                  {"column": "currency_code", "value_set": sorted(ISO_4217)}),
            Check("no_match_keys", f"none of the match keys ({keys}) holds a usable value",
                  "ExpectColumnValuesToBeBetween", {"column": "match_keys_present",
                                                    "min_value": 1, "max_value": 1}),
        ]
        checks = [c for c in checks if c.rule not in self.disabled]
        # Warnings, last: the verdict of the destination's own normalisation per identifier.
        for code, rule in self.judged_identifiers:
            checks.append(Check(
                code, f"{rule.column} is unusable: left out of the event",
                "ExpectColumnValuesToBeInSet",
                {"column": _verdict_column(rule.column), "value_set": [_USABLE]},
                identifier=rule.column))
        return checks


def _module_attribute(destination_type: str, name: str) -> Any:
    try:
        from leadsync.destinations import get_destination

        return getattr(get_destination(destination_type), name, None)
    except (ImportError, KeyError, ValueError):
        return None


def match_key_groups(destination_type: str) -> tuple[tuple[str, ...], ...]:
    """The match-key column groups of a destination type (its module's ``MATCH_KEY_GROUPS``;
    every column any platform matches on when the module declares none)."""
    declared = _module_attribute(destination_type, "MATCH_KEY_GROUPS")
    if declared:
        return tuple(tuple(group) for group in declared)
    return _ANY_MATCH_KEY


def identifier_rules(destination_type: str) -> tuple[FieldRule, ...]:
    """The identity rules the events of a destination type are built with (its module's
    ``IDENTIFIER_RULES``; email and E.164 phone when the module declares none)."""
    from leadsync import identity

    declared = _module_attribute(destination_type, "IDENTIFIER_RULES")
    if isinstance(declared, identity.Ruleset):
        return declared.rules
    return identity.TIKTOK_RULES.rules[:2]  # email, phone (E.164) under their own names


# -- projection: the batch as the suite sees it --------------------------------------------------

_OBJECT_COLUMNS = ("lead_id", "lead_id_type", "lead_id_text", "stage", "stage_type",
                   "stage_name", "event_time", "event_time_type", "updated_at",
                   "updated_at_type", "value", "value_type", "currency_code")
_FLOAT_COLUMNS = ("event_time_seconds_ahead_of_now", "event_time_seconds_after_updated_at",
                  "value_number")
_INT_COLUMNS = ("rows_with_same_lead_stage", "match_keys_present")


_USABLE = "usable"
_VERDICT = {None: None, True: _USABLE, False: "unusable"}


def _verdict_column(column: str) -> str:
    """The projected column holding the verdicts on an identifier (never the value)."""
    return f"{column}_verdict"


def _type_name(value: Any) -> str | None:
    return None if value is None else value.__class__.__name__


def _timestamp_type(value: Any, epoch: float) -> str | None:
    """"timestamp" when usable, else the Python type of what is there (None when absent)."""
    if value is None:
        return None
    return "timestamp" if epoch == epoch else value.__class__.__name__  # NaN != NaN


class _Projection:
    """Rows projected onto the columns the rules read, chunk by chunk as they arrive.

    No raw identifier is kept: each identifier the destination's rules judge becomes a verdict
    (``usable``, ``unusable``, or null when absent), from the destination's own normalisation
    (:func:`leadsync.identity.is_usable`), and a row's match keys become one number (0 or 1: is
    any of the destination's match-key groups present and usable). Types become their names,
    so that GX judges them with ``in_set`` (its ``in_type_list`` breaks on object columns that
    mix, say, dicts and booleans). This runs for every row of every window: it is written
    column by column, for speed.

    ``event_time``, ``updated_at`` and ``value`` hold only whether the value is there (True or
    null): their rules ask only that (their types and numbers are columns of their own), and a
    datetime or Decimal costs about a microsecond to pickle for the validating worker (2 s of
    the task's time per million rows, for two timestamp columns).
    """

    def __init__(self, spec: ContractSpec, now: datetime) -> None:
        from leadsync.identity import usability_column, usability_judge

        self.now_ts = now.timestamp()
        self.groups = spec.match_key_groups
        # Identifiers judged for every row (warnings), and the match-key columns whose value
        # must pass the destination's normalisation (judged only while looking for a key).
        self.judged = [(rule.column, usability_column(rule))
                       for _, rule in spec.judged_identifiers]
        self.key_judges = {rule.column: usability_judge(rule) for rule in spec.identifier_rules
                           if any(rule.column in group for group in self.groups)}
        self.ids: list[tuple[Any, Any]] = []  # raw (lead_id, stage): keys of failing rows
        self.cursors: list[datetime | None] = []
        self.positions: list[int] = []
        self.new: list[bool] = []
        self.verdict_columns = [_verdict_column(column) for column, _ in self.judged]
        self.cols: dict[str, list[Any]] = {
            c: [] for c in (*_OBJECT_COLUMNS, *self.verdict_columns, *_FLOAT_COLUMNS,
                            *_INT_COLUMNS)}

    def __len__(self) -> int:
        return len(self.ids)

    def key(self, i: int) -> tuple[str, str]:
        lead_id, stage = self.ids[i]
        return _key_text(lead_id, MAX_ID_LENGTH), _key_text(stage, MAX_STAGE_LENGTH)

    def extend(self, rows: Sequence[Mapping[str, Any]], same_key_rows: Sequence[int],
               cursors: Sequence[datetime | None], start: int, new: Sequence[bool]) -> None:
        """Projects ``rows`` (one source chunk at most: they are read column by column)."""
        c = self.cols
        now_ts = self.now_ts
        raw_leads = [r.get("lead_id") for r in rows]
        raw_stages = [r.get("stage") for r in rows]
        leads = [_present(v) for v in raw_leads]
        stages = [_present(v) for v in raw_stages]
        events = [_present(r.get("event_time")) for r in rows]
        updates = [_present(r.get("updated_at")) for r in rows]
        event_ts = [_epoch(v) for v in events]
        updated_ts = [_epoch(v) for v in updates]
        values = [_present(r.get("value")) for r in rows]
        numbers = [math.nan if v is None else _number(v) for v in values]
        self.ids.extend(zip(raw_leads, raw_stages, strict=True))
        self.cursors.extend(cursors)
        self.positions.extend(range(start, start + len(rows)))
        self.new.extend(new)
        c["lead_id"].extend(leads)
        c["lead_id_type"].extend(_type_name(v) for v in leads)
        c["lead_id_text"].extend(v if v.__class__ is str or v is None else str(v) for v in leads)
        c["stage"].extend(stages)
        c["stage_type"].extend(_type_name(v) for v in stages)
        c["stage_name"].extend(v.strip() if v.__class__ is str else None for v in stages)
        c["event_time"].extend([v is not None or None for v in events])  # presence only
        c["event_time_type"].extend(map(_timestamp_type, events, event_ts))
        c["updated_at"].extend([v is not None or None for v in updates])  # presence only
        c["updated_at_type"].extend(map(_timestamp_type, updates, updated_ts))
        c["event_time_seconds_ahead_of_now"].extend(e - now_ts for e in event_ts)
        c["event_time_seconds_after_updated_at"].extend(
            e - u for e, u in zip(event_ts, updated_ts, strict=True))
        c["rows_with_same_lead_stage"].extend(same_key_rows)
        c["value"].extend([v is not None or None for v in values])  # presence only
        c["value_number"].extend(numbers)
        c["value_type"].extend(
            None if v is None else "number" if n == n else v.__class__.__name__
            for v, n in zip(values, numbers, strict=True))
        currencies = [_present(r.get("currency")) for r in rows]
        c["currency_code"].extend(
            str(cur).strip().upper() if cur is not None else "(none)" if n == n else None
            for cur, n in zip(currencies, numbers, strict=True))
        judged: dict[str, list[bool | None]] = {}
        for (column, judge), name in zip(self.judged, self.verdict_columns, strict=True):
            verdicts = judge(rows)
            judged[column] = verdicts
            c[name].extend(_VERDICT[v] for v in verdicts)
        c["match_keys_present"].extend(self._has_match_key(r, i, judged)
                                       for i, r in enumerate(rows))

    def _has_match_key(self, row: Mapping[str, Any], i: int,
                       judged: Mapping[str, Sequence[bool | None]]) -> int:
        get = row.get
        key_judges = self.key_judges
        for group in self.groups:
            for column in group:
                judge = key_judges.get(column)
                if judge is None:  # sent as it is (click ids, IP): present is enough
                    v = get(column)
                    if v is None or (v.__class__ is str and not v.strip()):
                        break
                    continue
                verdicts = judged.get(column)
                if not (verdicts[i] if verdicts is not None else judge(row)):
                    break
            else:
                return 1
        return 0

    def columns(self) -> _Columns:
        """The projected batch as plain lists, with the dtype of each column (what
        :func:`_frame` turns into the DataFrame GX validates, in whichever process runs it)."""
        c = self.cols
        data: _Columns = {}
        for name in (*_OBJECT_COLUMNS, *self.verdict_columns):
            data[name] = ("object", c[name])
        for name in _FLOAT_COLUMNS:
            data[name] = ("float64", c[name])
        for name in _INT_COLUMNS:
            data[name] = ("int64", c[name])
        return data


_Columns = dict[str, tuple[str, list[Any]]]


def _frame(columns: _Columns) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({name: pd.Series(values, dtype=dtype)
                         for name, (dtype, values) in columns.items()})


# -- Great Expectations runtime ------------------------------------------------------------------

_GX_LOCK = threading.Lock()
_GX_CONTEXTS: dict[str, Any] = {}
_RESULT_FORMAT = {"result_format": "COMPLETE", "return_unexpected_index_query": False,
                  "partial_unexpected_count": 0}
# A batch of rows is validated with BASIC first (counts: no failing row's position), and again
# with COMPLETE only for the expectations some row failed, which then name those rows: on
# 25,000 rows 0.19 s instead of 0.26 s when no row fails, 0.24 instead of 0.28 s with three
# failing expectations (GX's COMPLETE computes the positions' metrics for every expectation).
_COUNTS_FORMAT = {**_RESULT_FORMAT, "result_format": "BASIC"}
# Only counts survive into stored results and Data Docs: every unexpected *value* is dropped
# (lead ids are the CRM's; identifiers are projected as verdicts, never as values).
_KEPT_RESULT_KEYS = ("element_count", "unexpected_count", "unexpected_percent", "missing_count",
                     "missing_percent", "unexpected_percent_total",
                     "unexpected_percent_nonmissing")


def _defer_scipy_stats() -> None:
    """Makes ``scipy.stats`` load on first use instead of at GX's import.

    GX imports it at module level for three distribution expectations the contract never
    uses (KL divergence, two KS tests); loading it is ~30 % of ``import great_expectations``
    (measured 2.75 s → 1.95 s of CPU), paid once per validating process. The module is
    bound as a :class:`importlib.util.LazyLoader` module, also as ``scipy``'s attribute (so
    that ``from scipy import stats`` does not go through scipy's own lazy ``__getattr__``,
    whose import looks at the module and would load it at once): any attribute access loads
    the real module, so an expectation that does use it still works.
    """
    import importlib.util
    import sys

    if "scipy.stats" in sys.modules:
        return
    try:
        import scipy
    except ImportError:  # GX without scipy: nothing to defer
        return
    spec = importlib.util.find_spec("scipy.stats")
    if spec is None or spec.loader is None:
        return
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["scipy.stats"] = module
    loader.exec_module(module)
    scipy.stats = module


def import_gx() -> Any:
    """``great_expectations``, imported quietly (its import logs hundreds of INFO lines)."""
    logging.getLogger("great_expectations._docs_decorators").setLevel(logging.ERROR)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _defer_scipy_stats()
        import great_expectations as gx
        from great_expectations.execution_engine import pandas_execution_engine

    # GX fingerprints every pandas batch smaller than HASH_THRESHOLD bytes with an MD5 over
    # the whole frame (a batch marker nothing here reads), twice per validation: more than half
    # of the check's time on 20k rows. Turning it off changes no result. (GX is pinned.)
    if hasattr(pandas_execution_engine, "HASH_THRESHOLD"):
        pandas_execution_engine.HASH_THRESHOLD = 0
    # GX and pandas leave a large heap of long-lived objects; every full garbage collection
    # would walk it again (measured: ~20 % of a 1M-row run's CPU). Park them for good.
    gc.collect()
    gc.freeze()
    return gx


def _gx_context(docs_dir: Path | None) -> Any:
    """One ephemeral GX context per process and Data Docs directory.

    Without Data Docs everything lives in memory. With them, the suites and the validation
    results (counts only) are kept in hidden directories next to the HTML (``.suites``,
    ``.results``), so that the index lists every destination and every kept run, not only
    this process's.
    """
    key = str(docs_dir or "")
    with _GX_LOCK:
        if key in _GX_CONTEXTS:
            return _GX_CONTEXTS[key]
        gx = import_gx()
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        defaults = InMemoryStoreBackendDefaults()
        stores = dict(defaults.stores)
        sites: dict[str, Any] = {}
        if docs_dir is not None:
            # The index lists (and keeps the pages of) what these stores hold: on disk, so
            # that every destination's suite and every kept run stay in the Data Docs.
            stores[defaults.validation_results_store_name] = {
                "class_name": "ValidationResultsStore",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(docs_dir / ".results")},
            }
            stores[defaults.expectations_store_name] = {
                "class_name": "ExpectationsStore",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(docs_dir / ".suites")},
            }
            sites["leadsync"] = {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder",
                                       "show_cta_footer": False},
            }
        config = DataContextConfig(
            stores=stores,
            expectations_store_name=defaults.expectations_store_name,
            validation_results_store_name=defaults.validation_results_store_name,
            checkpoint_store_name=defaults.checkpoint_store_name,
            data_docs_sites=sites,
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        )
        context = gx.get_context(mode="ephemeral", project_config=config)
        asset = context.data_sources.add_pandas("leadsync").add_dataframe_asset("window")
        asset.add_batch_definition_whole_dataframe("batch")
        _GX_CONTEXTS[key] = context
        return context


_WARNING_TEXT = ("Warning, not a failure ({rule}): {column} must be usable by this "
                 "destination's normalisation, or a SHA-256 hex digest; an unusable {column} "
                 "is left out of the event and the row sent on its other match keys.")
_WARNING_NOTE = ("Counted in the run's identifiers_dropped.{column}.{rule} (ls_runs, the "
                 "check's XCom and log). A row left with no usable match key is quarantined "
                 "no_match_keys.")


class _Suite:
    """The GX objects of one contract: suites in the context and the batch definition."""

    def __init__(self, spec: ContractSpec) -> None:
        gx = import_gx()
        import great_expectations.expectations as gxe

        self.context = _gx_context(spec.data_docs_dir)
        self.template: Any = None  # the last GX result (its meta is reused in the Data Docs)
        self._failing: dict[tuple[int, ...], Any] = {}  # see _failing_suite
        self.batches = (self.context.data_sources.get("leadsync").get_asset("window")
                        .get_batch_definition("batch"))

        def build(checks: Sequence[Check], offset: int) -> list[Any]:
            out = []
            for i, check in enumerate(checks, start=offset):
                kwargs: dict[str, Any] = dict(check.kwargs)
                kwargs["meta"] = {"rule": check.rule, "check": i, "detail": check.detail}
                if check.warning:
                    # Rendered in place of the expectation's own sentence on both pages.
                    kwargs["severity"] = check.severity
                    kwargs["description"] = _WARNING_TEXT.format(column=check.identifier,
                                                                 rule=check.rule)
                    kwargs["notes"] = _WARNING_NOTE.format(column=check.identifier,
                                                           rule=check.rule)
                out.append(getattr(gxe, check.expectation)(**kwargs))
            return out

        self.structure_checks = spec.structure_checks()
        self.row_checks = spec.row_checks()
        self.checks = [*self.structure_checks, *self.row_checks]
        n = len(self.structure_checks)
        with _GX_LOCK:
            suites = self.context.suites
            for name in (spec.suite_name, f"{spec.suite_name}_structure",
                         f"{spec.suite_name}_rows"):
                try:
                    suites.delete(name)
                except Exception:  # noqa: BLE001, S110 - absent: nothing to replace
                    pass
            # The whole contract, for the Data Docs suite page; validation runs its two parts.
            self.suite = suites.add(gx.ExpectationSuite(
                name=spec.suite_name,
                expectations=build(self.structure_checks, 0) + build(self.row_checks, n)))
            self.structure = suites.add(gx.ExpectationSuite(
                name=f"{spec.suite_name}_structure",
                expectations=build(self.structure_checks, 0)))
            self.rows = suites.add(gx.ExpectationSuite(
                name=f"{spec.suite_name}_rows", expectations=build(self.row_checks, n)))

    def validate(self, frame: pd.DataFrame, suite: Any,
                 result_format: Mapping[str, Any] = _RESULT_FORMAT) -> list[Any]:
        batch = self.batches.get_batch(batch_parameters={"dataframe": frame})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = batch.validate(suite, result_format=dict(result_format))
        for item in result.results:
            info = item.exception_info or {}
            if info.get("raised_exception"):
                check = self.checks[int(item.expectation_config.meta["check"])]
                # Quoted parts of a pandas/GX message can be row values: never log them.
                message = clean_message(str(info.get("exception_message")), 300)
                raise ContractError(f"Great Expectations could not evaluate {check.label}: "
                                    f"{message}")
        self.template = result
        return list(result.results)

    def run(self, which: str, columns: _Columns) -> list[_Result]:
        """Validates a batch with the ``structure`` or the ``rows`` suite; plain results.

        The rows suite runs in two steps (see ``_COUNTS_FORMAT``): every expectation for its
        counts, then those some row failed for the failing rows' positions.
        """
        frame = _frame(columns)
        if which == "structure":
            items = self.validate(frame, self.structure)
        else:
            items = self.validate(frame, self.rows, _COUNTS_FORMAT)
        failing = tuple(sorted(_check_of(item) for item in items
                               if not item.success or (item.result or {}).get("unexpected_count")))
        positions: dict[int, list[int]] = {}
        if which != "structure" and failing:
            for item in self.validate(frame, self._failing_suite(failing)):
                positions[_check_of(item)] = [
                    int(i) for i in (item.result or {}).get("unexpected_index_list") or ()]
        out = []
        for item in items:
            result = item.result or {}
            check = _check_of(item)
            unexpected = positions[check] if check in positions else [
                int(i) for i in result.get("unexpected_index_list") or ()]
            out.append(_Result(
                check, bool(item.success),
                int(result.get("element_count") or 0), int(result.get("unexpected_count") or 0),
                int(result.get("missing_count") or 0), unexpected))
        return out

    def _failing_suite(self, checks: tuple[int, ...]) -> Any:
        """A suite of the rows suite's expectations ``checks`` (copies: an expectation belongs
        to one suite), kept for the next batch that fails the same ones. Not stored in the
        context: only the whole contract's suites are."""
        suite = self._failing.get(checks)
        if suite is None:
            gx = import_gx()
            wanted = set(checks)
            suite = gx.ExpectationSuite(
                name=f"{self.rows.name}_failing",
                expectations=[copy.copy(e) for e in self.rows.expectations
                              if int(e.meta["check"]) in wanted])
            self._failing[checks] = suite
        return suite

    def docs(self, spec: ContractSpec, report: ContractReport, tallies: Sequence[_Tally],
             now: datetime) -> str | None:
        """Renders the run's Data Docs from its summed counts; returns the page's path."""
        from great_expectations.core.expectation_validation_result import (
            ExpectationSuiteValidationResult,
            ExpectationValidationResult,
        )
        from great_expectations.core.run_identifier import RunIdentifier
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        results = []
        for gx_exp, check, tally in zip(self.suite.expectations, self.checks, tallies,
                                        strict=True):
            if not tally.evaluated:
                continue
            total = tally.element_count
            counts: dict[str, Any] = {}
            if check.rule != "missing_column":
                nonmissing = max(total - tally.missing_count, 0)
                counts = {
                    "element_count": total,
                    "unexpected_count": tally.unexpected_count,
                    "missing_count": tally.missing_count,
                    "unexpected_percent": 100.0 * tally.unexpected_count / nonmissing
                    if nonmissing else 0.0,
                    "missing_percent": 100.0 * tally.missing_count / total if total else 0.0,
                    "unexpected_percent_total": 100.0 * tally.unexpected_count / total
                    if total else 0.0,
                    "unexpected_percent_nonmissing": 100.0 * tally.unexpected_count / nonmissing
                    if nonmissing else 0.0,
                    "partial_unexpected_list": [],
                }
            # A warning (a dropped identifier) is not a failing expectation: its counts show.
            results.append(ExpectationValidationResult(
                success=check.warning or (tally.success and tally.unexpected_count == 0),
                expectation_config=gx_exp.configuration, result=counts))
        failed = sum(1 for r in results if not r.success)
        run = RunIdentifier(run_name=_safe_name(report.run_id), run_time=now)
        meta = {k: v for k, v in (self.template or _Empty()).meta.items()
                if k in ("great_expectations_version", "active_batch_definition")}
        meta["run_id"] = run
        meta["leadsync"] = {k: v for k, v in report.as_dict().items() if k != "data_docs"}
        suite_result = ExpectationSuiteValidationResult(
            success=report.passed, results=results, suite_name=spec.suite_name,
            statistics={"evaluated_expectations": len(results),
                        "successful_expectations": len(results) - failed,
                        "unsuccessful_expectations": failed,
                        "success_percent": 100.0 * (len(results) - failed) / len(results)
                        if results else 100.0},
            meta=meta)
        context = self.context
        key = ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=spec.suite_name),
            run_id=run, batch_identifier=f"{spec.destination}_window")
        with _GX_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _prune_docs(spec.data_docs_dir, spec.suite_name, spec.data_docs_keep - 1)
            context.validation_results_store.set(key, suite_result)
            context.build_data_docs(site_names=["leadsync"], resource_identifiers=[
                key, ExpectationSuiteIdentifier(name=spec.suite_name)])
            urls = context.get_docs_sites_urls(resource_identifier=key, site_name="leadsync")
        url = urls[0]["site_url"] if urls else None
        return str(url).removeprefix("file://") if url else None


def _check_of(item: Any) -> int:
    """The contract's check (index) an expectation's result belongs to."""
    return int(item.expectation_config.meta["check"])


@dataclass(frozen=True)
class _Result:
    """One expectation's result on one batch, as plain data (crosses the process pipe)."""

    check: int  # index into the contract's checks
    success: bool
    element_count: int
    unexpected_count: int
    missing_count: int
    unexpected: list[int]  # positions of the failing rows within the batch


class _InlineValidator:
    """Great Expectations in this process: each batch is validated when it is submitted."""

    def __init__(self, spec: ContractSpec) -> None:
        self.suite = _Suite(spec)
        self.done: deque[list[_Result]] = deque()

    def submit(self, which: str, columns: _Columns) -> None:
        self.done.append(self.suite.run(which, columns))

    def ready(self) -> bool:
        return bool(self.done)

    def take(self) -> list[_Result]:
        return self.done.popleft()

    def docs(self, spec: ContractSpec, report: ContractReport, tallies: Sequence[_Tally],
             now: datetime) -> str | None:
        return self.suite.docs(spec, report, tallies, now)

    def close(self) -> None:
        pass


# -- one run of the contract ---------------------------------------------------------------------


class ContractError(RuntimeError):
    """The contract could not be evaluated at all (a bug or an environment problem)."""


@dataclass
class _Tally:
    element_count: int = 0
    unexpected_count: int = 0
    missing_count: int = 0
    evaluated: bool = False
    success: bool = True


@dataclass(frozen=True)
class Failure:
    """A row that breaks the contract: its quarantine key, rule and fixed detail."""

    lead_id: str
    stage: str
    rule: str
    detail: str
    source_ts: datetime | None
    position: int = -1  # the row's ordinal among the rows given to the session

    def record(self) -> QuarantineRecord:
        """As a quarantine entry."""
        return QuarantineRecord(self.lead_id, self.stage, self.rule, self.detail, self.source_ts)


@dataclass
class ContractReport:
    """What one run's check found: counts per rule and expectation, and the breaker's verdict.

    JSON-serialisable via :meth:`as_dict` (the check task's XCom): counts, never identifiers.
    """

    destination: str
    run_id: str
    rows: int = 0
    failing_rows: int = 0
    new_rows: int = 0  # rows past the watermark: what the breaker's share is judged on
    new_failing_rows: int = 0
    outside_window_rows: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    # "<column>.<rule>" -> rows whose identifier is unusable (left out of their event)
    identifiers_dropped: dict[str, int] = field(default_factory=dict)
    expectations: list[dict[str, Any]] = field(default_factory=list)
    structural: list[str] = field(default_factory=list)
    threshold: float = 0.2
    min_rows: int = 20
    max_quarantined_rows: int = 10_000
    tripped: str | None = None
    data_docs: str | None = None
    aborted: bool = False

    @property
    def passed(self) -> bool:
        """No breaker tripped: the run may stage (failing rows stay quarantined)."""
        return self.tripped is None

    @property
    def failing_share(self) -> float:
        """Failing rows over rows, among the rows new since the watermark.

        Rows the lookback re-reads (at or before the watermark) were judged by an earlier run
        that passed, and their failures accepted into quarantine: they are validated and
        quarantined again, but do not count twice against the window.
        """
        return self.new_failing_rows / self.new_rows if self.new_rows else 0.0

    @property
    def failing_expectations(self) -> list[dict[str, Any]]:
        """Expectations some row failed, warnings (identifier rules) left out."""
        return [e for e in self.expectations if e["unexpected"] and e["severity"] != "warning"]

    def as_dict(self) -> dict[str, Any]:
        """Counts for XCom and logs."""
        return {
            "destination": self.destination,
            "run_id": self.run_id,
            "passed": self.passed,
            "rows": self.rows,
            "failing_rows": self.failing_rows,
            "new_rows": self.new_rows,
            "new_failing_rows": self.new_failing_rows,
            "failing_share": round(self.failing_share, 6),
            "outside_window_rows": self.outside_window_rows,
            "threshold": self.threshold,
            "quarantined": dict(sorted(self.quarantined.items())),
            "identifiers_dropped": dict(sorted(self.identifiers_dropped.items())),
            "failing_expectations": self.failing_expectations,
            "structural": list(self.structural),
            "tripped": self.tripped,
            "data_docs": self.data_docs,
        }

    def describe(self) -> str:
        """A readable account, modelled on the GX Airflow provider's ``GXValidationFailed``."""
        head = (f"Data contract {'passed' if self.passed else 'FAILED'} for destination "
                f"{self.destination!r}, run {self.run_id}: {self.rows} rows checked, "
                f"{self.failing_rows} failing; of the {self.new_rows} rows new since the "
                f"watermark, {self.new_failing_rows} fail ({self.failing_share:.1%}; the "
                f"limit is {self.threshold:.0%} once at least {self.min_rows} new rows are "
                "checked)")
        lines = [head + "."]
        if self.tripped:
            lines.append(f"Stopped: {self.tripped}")
            lines.append("Nothing was staged or sent, and the watermark stays where it was.")
        for problem in self.structural:
            lines.append(f"Structural: {problem}")
        failing = self.failing_expectations
        if failing:
            lines.append(f"Failing expectations ({len(failing)}), as rule: expectation: rows:")
            lines.extend(f"  - {e['rule']}: {e['expectation']}: {e['unexpected']}"
                         for e in failing)
        if self.quarantined:
            lines.append("Quarantined rows by rule: " + ", ".join(
                f"{k}={v}" for k, v in sorted(self.quarantined.items())))
        if self.identifiers_dropped:
            lines.append("Warnings: unusable identifiers left out of their events (the rows "
                         "are sent on their other match keys), as identifier.rule=rows: "
                         + ", ".join(f"{k}={v}"
                                     for k, v in sorted(self.identifiers_dropped.items())))
        if self.outside_window_rows:
            lines.append(f"{self.outside_window_rows} row(s) have no usable updated_at and can "
                         "never enter the incremental window (quarantined, outside the share).")
        evaluated = len(self.expectations)
        warned = sum(1 for e in self.expectations if e["unexpected"] and
                     e["severity"] == "warning")
        lines.append(f"Statistics: {evaluated} expectations evaluated, "
                     f"{evaluated - len(failing)} successful ({warned} with warnings), "
                     f"{len(failing)} unsuccessful.")
        if self.data_docs:
            lines.append(f"Full validation result (Data Docs): {self.data_docs}")
        if self.tripped:
            lines.append("Quarantined rows (lead_id + stage + rule) are in the state store's "
                         "ls_quarantine table (`leadsync state show`). Fix the source rows or "
                         "query, then clear check_contract to run again.")
        return "\n".join(lines)


class ContractViolation(RuntimeError):
    """The circuit breaker tripped: the window is broken, nothing may be staged or sent."""

    def __init__(self, report: ContractReport) -> None:
        self.report = report
        super().__init__(report.describe())


class ContractSession:
    """One run's check: structure, then rows batch by batch, then the breaker and Data Docs.

    With ``separate_process``, Great Expectations runs in a worker process
    (:mod:`leadsync.contract_worker`): a full batch is handed over and the caller goes on
    projecting (and planning, and staging) the next rows while it is validated on another
    core; its failures come back from a later :meth:`add` or from :meth:`flush`, and
    :attr:`validated` says up to which row the verdicts are in. At most
    :data:`MAX_BATCHES_IN_FLIGHT` batches wait for their verdict, so memory stays bounded.
    Without it, each batch is validated in this process when it fills.
    """

    def __init__(self, spec: ContractSpec, run_id: str, now: datetime, *,
                 separate_process: bool = False) -> None:
        self.spec = spec
        self.run_id = run_id
        self.now = now
        self.checks = [*spec.structure_checks(), *spec.row_checks()]  # as the suite numbers them
        self.validator: _InlineValidator | WorkerValidator
        if separate_process:
            from leadsync.contract_worker import WorkerValidator

            self.validator = WorkerValidator(spec)
            log.info("validating with Great Expectations in worker process %d",
                     self.validator.pid)
        else:
            self.validator = _InlineValidator(spec)
        self.tallies = [_Tally() for _ in self.checks]
        self.report = ContractReport(spec.destination, run_id, threshold=spec.failure_threshold,
                                     min_rows=spec.failure_min_rows,
                                     max_quarantined_rows=spec.max_quarantined_rows)
        self._batch = _Projection(spec, now)
        self._batch_outside = False
        # Submitted, no verdict yet: (rows, what to do with the results), in order.
        self._in_flight: deque[tuple[int, Callable[[list[_Result]], list[Failure]]]] = deque()
        self._quarantined: Counter[str] = Counter()
        self._position = 0

    def close(self) -> None:
        """Ends the session's use of its validator (a worker goes back to the idle pool)."""
        self.validator.close()

    # structure

    def check_columns(self, columns: Iterable[str], *, wait: bool = True) -> bool:
        """Validates the source's column names; False (and structural failures) if any lack.

        ``wait=False`` hands the check over and returns at once (GX may still be importing
        in the worker): the result says whether the required columns are there, and GX's own
        verdict joins the report with the first batch's.
        """
        names = [str(c) for c in columns]

        def verdict(results: list[_Result]) -> list[Failure]:
            self._tally(results)
            for item in results:
                if not item.success:
                    check = self.checks[item.check]
                    self.report.structural.append(
                        f"{check.label} failed: the source query returns {', '.join(names)}")
            return []

        self.validator.submit("structure", {name: ("object", []) for name in names})
        self._in_flight.append((0, verdict))
        if wait:
            self._collect(None)
            return not self.report.structural
        return all(c in names for c in REQUIRED_COLUMNS)

    # rows

    def add(self, rows: Iterable[Mapping[str, Any]], same_key_rows: Callable[
            [Mapping[str, Any]], int] | None = None, *, outside_window: bool = False,
            is_new: Callable[[Mapping[str, Any]], bool] | None = None) -> list[Failure]:
        """Projects rows; submits each full batch. Returns the failures of the batches whose
        verdict is in (all submitted ones, in this process).

        ``same_key_rows(row)`` is the number of rows of the window sharing the row's
        (lead_id, stage) (1 when not given). ``is_new(row)`` says whether the row is past the
        watermark (all are, when not given); only new rows count in the breaker's share. Rows
        ``outside_window`` (no usable cursor) are validated and quarantined but never count in
        the share.
        """
        failures: list[Failure] = []
        if outside_window != self._batch_outside and len(self._batch):
            self._submit()
        self._batch_outside = outside_window
        rows = rows if isinstance(rows, Sequence) else list(rows)
        done = 0
        while done < len(rows):
            room = self.spec.batch_rows - len(self._batch)
            part = rows[done:done + room]
            self._batch.extend(
                part,
                [same_key_rows(r) for r in part] if same_key_rows else [1] * len(part),
                [getattr(r.get("_cursor"), "ts", None) for r in part],
                self._position,
                [False] * len(part) if outside_window else
                [True] * len(part) if is_new is None else [is_new(r) for r in part])
            self._position += len(part)
            done += len(part)
            if len(self._batch) >= self.spec.batch_rows:
                self._submit()
                failures += self._collect(MAX_BATCHES_IN_FLIGHT)
        return failures + self._collect(MAX_BATCHES_IN_FLIGHT)

    def flush(self) -> list[Failure]:
        """Validates the rows projected so far and waits for every verdict."""
        self._submit()
        return self._collect(None)

    def _submit(self) -> None:
        batch, self._batch = self._batch, _Projection(self.spec, self.now)
        if len(batch):
            self.validator.submit("rows", batch.columns())
            batch.cols = {}  # the verdicts need the keys and positions, not the values
            outside = self._batch_outside
            self._in_flight.append(
                (len(batch), lambda results: self._verdicts(batch, outside, results)))

    def _collect(self, keep: int | None) -> list[Failure]:
        """Takes verdicts in order: every one that is in, and waits until at most ``keep``
        batches of rows are left without one (None: until every verdict is in)."""
        failures: list[Failure] = []
        while self._in_flight and (
                keep is None or sum(1 for rows, _ in self._in_flight if rows) > keep
                or self.validator.ready()):
            _, verdict = self._in_flight.popleft()
            failures += verdict(self.validator.take())
        return failures

    def _verdicts(self, batch: _Projection, outside: bool,
                  results: list[_Result]) -> list[Failure]:
        """The failing rows of one validated batch (each with the first rule it breaks)."""
        self._tally(results)
        n = len(batch)
        first: list[tuple[int, int] | None] = [None] * n  # (rank, check index) per row
        for item in results:
            check = self.checks[item.check]
            if check.warning:
                continue  # the identifier is dropped from the event, the row goes on
            rank = (_RULE_RANK[check.rule], item.check)
            for i in item.unexpected:
                current = first[i]
                if current is None or rank < current:
                    first[i] = rank
        failures = []
        for i, found in enumerate(first):
            if found is None:
                continue
            check = self.checks[found[1]]
            lead, stage = batch.key(i)
            failures.append(Failure(lead, stage, check.rule, check.detail, batch.cursors[i],
                                    batch.positions[i]))
            self._quarantined[check.rule] += 1
        report = self.report
        if outside:
            report.outside_window_rows += n
        else:
            report.rows += n
            report.failing_rows += len(failures)
            report.new_rows += sum(batch.new)
            report.new_failing_rows += sum(1 for i, f in enumerate(first)
                                           if f is not None and batch.new[i])
        return failures

    def add_unreadable(self, marker: UnreadableRow, *, is_new: bool = True) -> Failure:
        """Counts a row the driver could not read as a failing row of the window (rule
        ``unreadable_row``); GX never sees it: there is nothing to project."""
        report = self.report
        report.rows += 1
        report.failing_rows += 1
        report.new_rows += is_new
        report.new_failing_rows += is_new
        self._quarantined[UNREADABLE_RULE] += 1
        # No position: positions number the rows given to :meth:`add` (the caller's plans).
        return unreadable_failure(marker)

    @property
    def validated(self) -> int:
        """How many of the rows given so far have their verdict (their failures returned):
        the rows before this position."""
        waiting = sum(rows for rows, _ in self._in_flight)
        return self._position - len(self._batch) - waiting

    @property
    def over_limit(self) -> bool:
        """More failing rows than ``max_quarantined_rows``: no need to read further."""
        return self.report.failing_rows > self.spec.max_quarantined_rows

    def _tally(self, results: Sequence[_Result]) -> None:
        for item in results:
            tally = self.tallies[item.check]
            tally.evaluated = True
            tally.success = tally.success and item.success
            tally.element_count += item.element_count
            tally.unexpected_count += item.unexpected_count
            tally.missing_count += item.missing_count

    # verdict

    def finish(self, *, aborted: str | None = None) -> ContractReport:
        """Evaluates the breaker, writes the Data Docs; returns the report (raises nothing).

        ``aborted`` says why the caller stopped reading early (which trips the breaker).
        """
        self.flush()
        report = self.report
        report.aborted = aborted is not None
        report.quarantined = dict(self._quarantined)
        report.expectations = []
        report.identifiers_dropped = {}
        for check, tally in zip(self.checks, self.tallies, strict=True):
            if not tally.evaluated:
                continue
            unexpected = tally.unexpected_count
            if check.rule == "missing_column" and not tally.success:
                unexpected = max(unexpected, 1)
            report.expectations.append({"rule": check.rule, "expectation": check.label,
                                        "severity": check.severity, "unexpected": unexpected,
                                        "element_count": tally.element_count})
            if check.warning and unexpected:
                key = f"{check.identifier}.{check.rule}"
                report.identifiers_dropped[key] = report.identifiers_dropped.get(key, 0) + \
                    unexpected
            nonnull = tally.element_count - tally.missing_count
            if check.rule == "bad_type" and tally.unexpected_count and \
                    tally.unexpected_count >= nonnull:
                report.structural.append(
                    f"{check.label}: no value of the column is usable ({nonnull} non-null "
                    "values, all of an unusable type): the column's type is wrong")
        spec = self.spec
        if report.structural:
            report.tripped = "the source breaks a structural rule (" + "; ".join(
                report.structural) + ")"
        elif report.failing_rows > spec.max_quarantined_rows:
            stopped = f"; {aborted}" if aborted else ""
            report.tripped = (f"more than {spec.max_quarantined_rows} rows fail the contract "
                              f"(contract.max_quarantined_rows){stopped}")
        elif aborted:
            report.tripped = aborted
        elif (report.new_rows >= spec.failure_min_rows
              and report.failing_share > spec.failure_threshold):
            report.tripped = (f"{report.new_failing_rows} of {report.new_rows} new rows "
                              f"({report.failing_share:.1%}) fail the contract, above the "
                              f"threshold of {spec.failure_threshold:.0%} "
                              "(contract.failure_threshold)")
        if spec.data_docs_dir is not None:
            try:
                report.data_docs = self.validator.docs(spec, report, self.tallies, self.now)
            except Exception as exc:  # noqa: BLE001 - docs are a view; never fail the run on them
                log.warning("could not build the Data Docs in %s: %s", spec.data_docs_dir,
                            clean_error(exc))
        peak = getattr(self.validator, "peak_rss_mb", None)
        if peak:
            busy = {k: round(v, 3) for k, v in getattr(self.validator, "seconds", {}).items()}
            log.info("the contract worker process peaked at %.0f MB of memory; its busy "
                     "time (s): %s", peak, busy)
        self.close()
        return report


class _Empty:
    meta: Mapping[str, Any] = {}


def _prune_docs(docs_dir: Path | None, suite: str, keep: int) -> None:
    """Keeps the ``keep`` newest runs of a suite in the Data Docs (result JSON and HTML page).

    The index is rebuilt from every stored result on each run, so an unbounded history would
    make each run slower than the last. Paths follow GX's filesystem store layout:
    ``<suite>/<run name>/<run time>/<batch>.json`` under ``.results`` and ``.html`` under
    ``validations``.
    """
    if docs_dir is None:
        return
    results = docs_dir / ".results" / suite
    found = sorted(results.glob("*/*/*.json"), key=lambda p: (p.parent.name, str(p)))
    for old in found[:max(len(found) - keep, 0)]:
        relative = old.relative_to(docs_dir / ".results")
        page = (docs_dir / "validations" / relative).with_suffix(".html")
        for path in (old, page):
            path.unlink(missing_ok=True)
            for parent in (path.parent, path.parent.parent):
                try:
                    parent.rmdir()  # only when empty
                except OSError:
                    break


def _safe_name(run_id: str) -> str:
    # Airflow run ids hold ':' and '+', which make awkward file names in the Data Docs tree.
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id)[:200]


# -- warehouse pushdown ------------------------------------------------------------------------


def source_columns(engine: Engine, query: str) -> list[str]:
    """The column names the source query returns (a zero-row query)."""
    from sqlalchemy import text

    from leadsync.source import SourceError

    try:
        with engine.connect() as conn:
            return list(conn.execute(text(f"SELECT * FROM ({query}) src WHERE 1=0")).keys())
    except Exception as exc:  # noqa: BLE001 - any driver error becomes one clear message
        raise SourceError(f"the source query failed: {clean_error(exc)}") from None


def window_key_counts(source: Source, window: Window, cap: int) -> dict[tuple[str, str], int]:
    """(lead_id, stage) keys that occur more than once in the window, with their row counts.

    One ``GROUP BY`` in the warehouse over the same rows the stream reads (the same keyset
    bounds, binds and SQL, less the order and the page limit: an aggregate needs neither, and
    sorting the window's rows cost more than counting them), returning only the duplicated
    keys, at most ``cap + 1`` of them.
    """
    from sqlalchemy import LargeBinary, String, cast, column, func, select, text

    from leadsync.source import SourceError

    lo = window.lo
    exact = lo is not None and lo.lead_id is not None
    params = source._params(window, lo, exact)
    del params["page"]
    rows = (text(source._sql(lo, exact, ordered=False))
            .columns(column("lead_id"), column("stage")).subquery("d"))
    lead_key = func.trim(cast(rows.c.lead_id, String))
    stage_key = func.trim(cast(rows.c.stage, String))
    query = (select(lead_key, stage_key, func.count())
             .group_by(lead_key, stage_key).having(func.count() > 1).limit(cap + 1))
    if source.engine.dialect.name == "sqlite":
        # Text that is not UTF-8 cannot be fetched as text: keys come back as their bytes.
        query = (select(cast(lead_key, LargeBinary), cast(stage_key, LargeBinary), func.count())
                 .group_by(lead_key, stage_key).having(func.count() > 1).limit(cap + 1))
    try:
        with source.engine.connect() as conn:
            result = conn.execute(query, params)
            return {(_text(k), _text(s)): int(n) for k, s, n in result}
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"counting duplicate (lead_id, stage) in the window failed: "
                          f"{clean_error(exc)}") from None


def unreadable_failure(marker: UnreadableRow) -> Failure:
    """The quarantine verdict on a row the warehouse driver could not read."""
    return Failure(marker.lead_id[:MAX_ID_LENGTH], marker.stage[:MAX_STAGE_LENGTH],
                   UNREADABLE_RULE, marker.detail, marker.cursor.ts if marker.cursor else None)


def _text(value: Any) -> str:
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


def null_cursor_rows(source: Source, limit: int) -> list[dict[str, Any]]:
    """Rows whose ``updated_at`` is null or unreadable: the keyset window never sees them."""
    from sqlalchemy import text

    from leadsync.source import SourceError

    ts = ("strftime('%Y-%m-%d %H:%M:%f', src.updated_at)"
          if source.engine.dialect.name == "sqlite" else "src.updated_at")
    sql = f"SELECT * FROM ({source.query}) src WHERE {ts} IS NULL LIMIT :n"
    try:
        with source.engine.connect() as conn:
            return [dict(m) for m in conn.execute(text(sql), {"n": limit}).mappings()]
    except Exception:  # noqa: BLE001, S110 - a value the driver cannot read: read it as null
        pass
    try:
        return source.read_leniently(sql, {"n": limit})
    except Exception as exc:  # noqa: BLE001
        raise SourceError("looking for rows without updated_at failed: "
                          f"{clean_error(exc)}") from None


# -- in memory (render, tests) -------------------------------------------------------------------


def check_rows(rows: Sequence[Mapping[str, Any]], config: Config, dest: DestinationConfig,
               now: datetime, *, run_id: str = "render") -> list[Failure | None]:
    """The contract on rows in memory, one verdict per row (None = passes). No Data Docs.

    The whole input is one window: duplicates are counted across all of it. A structural
    failure (a required column absent from every row) fails every row with that rule.
    """
    spec = ContractSpec.from_config(config, dest, data_docs=False)
    session = ContractSession(spec, run_id, now)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    if not session.check_columns(columns):
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        return [Failure(*quarantine_key(row), "missing_column",
                        f"column {', '.join(missing)} is missing", None, i)
                for i, row in enumerate(rows)]
    counts = Counter(duplicate_key(r.get("lead_id"), r.get("stage")) for r in rows)

    def same(row: Mapping[str, Any]) -> int:
        return counts[duplicate_key(row.get("lead_id"), row.get("stage"))]

    failed = {f.position: f for f in session.add(rows, same) + session.flush()}
    return [failed.get(i) for i in range(len(rows))]


__all__ = ["IDENTIFIER_RULE_CODES", "ISO_4217", "RULES", "Check", "ContractError",
           "ContractReport", "ContractSession", "ContractSpec", "ContractViolation", "Failure",
           "Rule", "check_row", "check_rows", "duplicate_key", "identifier_rules", "import_gx",
           "match_key_groups", "null_cursor_rows", "parse_timestamp", "quarantine_key",
           "source_columns", "window_key_counts"]

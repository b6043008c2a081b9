"""Warehouse extraction: keyset pagination on (updated_at, lead_id, stage), streamed in chunks.

The user's SQL (``include/sql/converted_leads.sql``) is wrapped as a subquery; leadsync adds the
cursor bounds, the order and the page limit. Each page is one query streamed with a server-side
cursor (Postgres) so that memory stays flat however large the window is; the next page starts
strictly after the last row of the previous one. On SQLite the whole window is one query by
default (``source.page_size`` unset): each page there computes the cursor of every row of the
table again, and SQLite's sorter keeps memory flat by itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, CursorResult, Engine, text

from leadsync.redact import clean_error
from leadsync.state import Cursor

REQUIRED_COLUMNS = ("lead_id", "stage", "event_time", "updated_at")


class SourceError(RuntimeError):
    """The source query failed or does not follow the contract (the message says how)."""


UNREADABLE_RULE = "unreadable_row"


@dataclass(frozen=True)
class UnreadableRow:
    """A row of the window the driver could not read: where it is and which columns failed.

    It carries no value: ``lead_id`` and ``stage`` are the quarantine key (undecodable bytes
    replaced by U+FFFD), ``cursor`` its position (None when ``updated_at`` itself is
    unreadable, so the row has no place in the keyset order), ``columns`` the unreadable ones.
    """

    lead_id: str
    stage: str
    cursor: Cursor | None
    columns: tuple[str, ...]

    @property
    def detail(self) -> str:
        """The quarantine entry's fixed text (column names, never values)."""
        return ("the warehouse driver cannot read column(s) " + ", ".join(self.columns)
                + " (undecodable text, or a value out of Python's range)")


class _Unconvertible:
    """What the lenient Postgres casters return for a value the driver cannot convert."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<unconvertible>"


UNCONVERTIBLE = _Unconvertible()


class _Undecodable(str):
    """Text that is not valid UTF-8, decoded with ``surrogateescape`` (SQLite, lenient)."""

    __slots__ = ()


def _lenient_text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return _Undecodable(raw.decode("utf-8", "surrogateescape"))


def _safe_text(value: Any) -> str:
    """A key value as storable text: undecodable bytes become U+FFFD."""
    text_ = "" if value is None or value is UNCONVERTIBLE else str(value)
    try:
        text_.encode()
    except UnicodeEncodeError:
        try:  # the bytes SQLite held, each bad one shown as U+FFFD
            text_ = text_.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:  # lone surrogates of another origin
            text_ = text_.encode("utf-8", "replace").decode()
    return text_


@dataclass(frozen=True)
class Window:
    """The slice of the source one run reads: cursor in (lo, hi]."""

    lo: Cursor | None  # exclusive; None = from the beginning
    hi: datetime  # inclusive upper bound on updated_at (run start minus the settle lag)


def plan_window(
    watermark: Cursor | None, now: datetime, lookback: timedelta, settle_lag: timedelta
) -> Window:
    """The window of one run: from the watermark minus the lookback to now minus the lag.

    With a lookback the lower bound drops the tie-breakers (re-reading a little more is free:
    the ledger filters what was already handled); without one it is an exact keyset bound.
    """
    hi = now - settle_lag
    if watermark is None:
        return Window(None, hi)
    if lookback > timedelta(0):
        return Window(Cursor(watermark.ts - lookback, None, ""), hi)
    return Window(watermark, hi)


_NAIVE_EPOCH = datetime(1970, 1, 1)
_UTC_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _naive_as_utc(value: datetime) -> datetime:
    """``value.replace(tzinfo=UTC)`` for a naive datetime with ``fold`` 0: the same instant
    exactly (integer day, second and microsecond arithmetic) at a seventh of the CPU, as
    ``replace``'s keyword parsing costs more than reading the text it came from."""
    return _UTC_EPOCH + (value - _NAIVE_EPOCH)


def _iso_spelled(value: str) -> datetime | None:
    """The general reading of ISO text: surrounding space ignored, a 'Z' or 'z' suffix read
    as UTC; None when it is not a timestamp."""
    raw = value.strip()
    if not raw:
        return None
    if raw[-1] in "Zz":
        raw = raw[:-1] + "+00:00"
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        return None


def _iso_to_utc(value: str) -> datetime | None:
    # The usual spelling reads in one call (Python 3.11 takes 'Z', a space and any fraction):
    # where fromisoformat accepts the text as it is, the general reading gives the same value;
    # tests/unit/test_source_time.py holds the two to that.
    try:
        parsed: datetime | None = datetime.fromisoformat(value)
    except ValueError:
        parsed = _iso_spelled(value)
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        return _naive_as_utc(parsed)  # fromisoformat never sets fold
    return parsed.astimezone(UTC)


def to_utc(value: Any) -> datetime | None:
    """Coerces a warehouse timestamp (datetime, date or ISO text) to an aware UTC datetime."""
    if value is None:
        return None
    cls = value.__class__
    if cls is datetime:  # the usual cases first: a datetime, or text (SQLite)
        tz = value.tzinfo
        if tz is UTC:
            return value
        if tz is None:  # Postgres' timestamp without time zone
            return value.replace(tzinfo=UTC) if value.fold else _naive_as_utc(value)
        return value.astimezone(UTC)
    if cls is str:
        return _iso_to_utc(value)
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        return _iso_to_utc(value)
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(float(value), tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def _sqlite_ts(value: Any) -> datetime | None:
    """:func:`to_utc` of SQLite's cursor text, ``strftime('%Y-%m-%d %H:%M:%f')`` (UTC): read
    in one call, the offset appended (the general path costs several times more per row)."""
    try:
        return datetime.fromisoformat(value + "+00:00")
    except (TypeError, ValueError):  # NULL, or a year fromisoformat refuses (0000)
        return to_utc(value)


_TIME_COLUMNS = ("event_time", "updated_at")


def _text_time(value: str) -> Any:
    """SQLite's text timestamp as the aware UTC datetime Postgres would give; text that is not
    a timestamp stays as it is (the data contract judges it ``bad_type``)."""
    try:
        parsed = _iso_to_utc(value)
    except (OverflowError, ValueError):
        return value
    return value if parsed is None else parsed


# SQLite: a condition on the raw updated_at that every row whose cursor (strftime of it) is at
# or after the window's lower bound meets. SQLite orders NULL < numbers < text < blobs, and reads
# as a time: text starting 'YYYY-MM-DD' (any separator and time after it, an offset of at most
# ±14:59), a number or numeric text (a Julian day, '+2461013.5', ' 2461013.5' and '0…' too),
# 'now', and a bare time (a day of the year 2000). The condition drops only text from '1~' up
# to the day of (lower bound - 15 h): dates of earlier days, Julian days before the year 1035
# ('1…' sorts below '1~'; later ones start '2' then a digit above the year's), and text that
# reads as no time; it keeps numbers, text before '1~' (spaces, signs, '0' and '1' first) and
# from that day on ('now', letters), and blobs. '1~' is not a number to SQLite, so a column of
# NUMERIC affinity (DATETIME) compares it as text too ('2' would become the number 2).
# tests/unit/test_source.py holds the condition to the read without it.
_SQLITE_FLOOR = "(src.updated_at < '1~' OR src.updated_at >= :lo_day)"
_SQLITE_FLOOR_MARGIN = timedelta(hours=15)


def _sqlite_floor_day(lo: datetime) -> str:
    day = (lo - _SQLITE_FLOOR_MARGIN).date()
    return f"{day.year:04d}-{day.month:02d}-{day.day:02d}"


_PAGE_ROWS = 100_000  # rows per page on Postgres and other servers, unless configured
_UNPAGED = 2**62  # a LIMIT no window reaches


class Source:
    """Reads the user's query in cursor order between a window's bounds.

    SQLite has no timestamp type: there, ``event_time`` and ``updated_at`` text that reads as
    a timestamp is returned as an aware UTC datetime, as Postgres returns its timestamps, so
    that the contract, the guard and the events parse it once, here.
    """

    def __init__(self, engine: Engine, query: str, chunk_size: int = 5000,
                 page_size: int | None = None) -> None:
        self.engine = engine
        self.query = query
        self.chunk_size = chunk_size
        self._sqlite = engine.dialect.name == "sqlite"
        if page_size is None:
            # SQLite computes the cursor of every row of the table for each page: one query.
            page_size = _UNPAGED if self._sqlite else _PAGE_ROWS
        self.page_size = max(page_size, chunk_size)
        # The column the keyset compares on: SQLite has no timestamp type, so its rows get one
        # normalised copy of updated_at, _ls_ts (see _ts_param); elsewhere, updated_at.
        self._ts_column = "_ls_ts" if self._sqlite else "updated_at"
        # A server-side cursor, read in chunks, keeps memory flat; SQLite has none (see _parts).
        self._streaming: dict[str, Any] = {} if self._sqlite else {
            "stream_results": True, "yield_per": chunk_size}

    def _parts(self, result: CursorResult[Any]) -> Iterator[Sequence[Sequence[Any]]]:
        """The result's rows in lists of ``chunk_size``.

        On SQLite, the driver's tuples straight from its cursor: with no server-side cursor,
        SQLAlchemy holds no row ahead of it, and its Row per row cost ~4% of the read's CPU and
        a quarter of its garbage collections. Elsewhere through SQLAlchemy, which buffers the
        first rows of a server-side cursor itself.
        """
        if not self._sqlite:
            yield from result.partitions(self.chunk_size)
            return
        with result:  # closes the driver's cursor, read to its end or not
            fetch = result.cursor.fetchmany
            while part := fetch(self.chunk_size):
                yield part

    def _ts_param(self, ts: datetime) -> Any:
        # SQLite has no timestamp type: rows hold text, compared through strftime so that
        # 'T'/'Z'/offset spellings all normalise to one sortable UTC form.
        if self._sqlite:
            return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:23]
        return ts

    def _sql(self, lo: Cursor | None, exact: bool, *, ordered: bool = True) -> str:
        """The page query; ``ordered=False``: the window's rows unordered and unlimited (for
        an aggregate over them: sorting every column of every row costs more than the rest)."""
        if self._sqlite:
            # The cursor column _ls_ts comes last: the stream relies on it. Above a lower
            # bound, the rows whose cursor cannot reach it are left out first on the raw
            # column (see _SQLITE_FLOOR), which an index on updated_at answers: the cursor is
            # an expression no index has, and computing it for every row of the table cost a
            # run with nothing new 1.5-2.6 s of its 12-14 s at 1M rows.
            floor = f" WHERE {_SQLITE_FLOOR}" if lo is not None else ""
            rows = (f"SELECT * FROM (SELECT src.*, strftime('%Y-%m-%d %H:%M:%f', src.updated_at)"
                    f" AS _ls_ts FROM ({self.query}) src{floor}) w")
        else:
            # updated_at itself is the cursor: a copy of it would be sent and parsed twice.
            rows = f"SELECT * FROM ({self.query}) w"
        ts = f"w.{self._ts_column}"
        # The lower bound is one BETWEEN with the upper one: SQLite computes its cursor (a
        # strftime) once for it, not once per comparison, on every row of the window, each page;
        # Postgres seeks its index to the lower bound instead of walking the earlier pages'
        # rows. Rows at exactly lo_ts are then ordered by the tie-breakers.
        where = f"{ts} <= :hi_ts"
        if lo is not None:
            where = f"{ts} BETWEEN :lo_ts AND :hi_ts"
            if exact:
                # An undecodable key (SQLite, read leniently) is bound as its raw bytes and
                # compared as text again, so that paging resumes exactly after it.
                lead = "CAST(:lo_lead AS TEXT)" if isinstance(lo.lead_id, _Undecodable) \
                    else ":lo_lead"
                stage = "CAST(:lo_stage AS TEXT)" if isinstance(lo.stage, _Undecodable) \
                    else ":lo_stage"
                where += (f" AND ({ts} > :lo_ts OR w.lead_id > {lead}"
                          f" OR (w.lead_id = {lead} AND w.stage > {stage}))")
        rows += f" WHERE {where}"
        if not ordered:
            return rows
        return f"{rows} ORDER BY {ts}, w.lead_id, w.stage LIMIT :page OFFSET :skip"

    def _params(self, window: Window, lo: Cursor | None, exact: bool,
                skip: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"hi_ts": self._ts_param(window.hi), "page": self.page_size,
                                  "skip": skip}
        if lo is not None:
            params["lo_ts"] = self._ts_param(lo.ts)
            if self._sqlite:
                params["lo_day"] = _sqlite_floor_day(lo.ts)
            if exact:
                params["lo_lead"] = _bindable(lo.lead_id)
                params["lo_stage"] = _bindable(lo.stage)
        return params

    def check_columns(self) -> list[str]:
        """Runs the query with no rows to list its columns; fails on missing ones."""
        try:
            with self.engine.connect() as conn:
                result = conn.execute(text(f"SELECT * FROM ({self.query}) src WHERE 1=0"))
                columns = list(result.keys())
        except Exception as exc:  # noqa: BLE001 - any driver error becomes one clear message
            raise SourceError(f"the source query failed: {clean_error(exc)}") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise SourceError(
                f"the source query lacks required column(s) {', '.join(missing)}; "
                f"it returns: {', '.join(columns)}"
            )
        return columns

    def stream(self, window: Window) -> Iterator[list[dict[str, Any]] | UnreadableRow]:
        """Yields chunks of rows (dicts) in cursor order; each row gets ``_cursor``.

        A row the driver cannot read (undecodable text on SQLite; on Postgres a value outside
        Python's range, like a year 10000 timestamp) does not stop the window: it is yielded,
        in its place in the order, as an :class:`UnreadableRow` between chunks. The happy path
        pays nothing for this: only after a read fails is the rest of that page read again,
        from the last row yielded, with lenient decoding (:meth:`_lenient`).

        A page (and a lenient re-read) resumes after the last row that has a cursor to resume
        from, skipping the rows yielded after it (``OFFSET``): rows without one (an
        ``updated_at`` Python cannot represent) are neither yielded twice nor, when a whole
        page holds nothing else, the end of the window.
        """
        lo = window.lo
        exact = lo is not None and lo.lead_id is not None
        skip = 0  # rows after lo already yielded (they have no cursor to resume after)
        lenient = False
        parse_ts = _sqlite_ts if self._sqlite else to_utc
        while True:
            params = self._params(window, lo, exact, skip)
            n_page = 0
            last: Cursor | None = None  # the last row yielded that paging can resume after
            since = 0  # rows yielded after it (or, with none yet, in this page)
            failed: Exception | None = None
            try:
                with self.engine.connect() as conn:
                    if lenient:
                        self._lenient(conn)
                    try:
                        result = conn.execution_options(**self._streaming).execute(
                            text(self._sql(lo, exact)), params)
                        # Plain tuples zipped with the column names: a RowMapping per row,
                        # turned into a dict, cost more than the rest of the read in Python.
                        names = tuple(result.keys())
                        if self._sqlite:  # _ls_ts, the last column (see _sql), stays out
                            keys, at = names[:-1], len(names) - 1
                        else:
                            keys, at = names, names.index(self._ts_column)
                        times = tuple(c for c in _TIME_COLUMNS if c in keys) \
                            if self._sqlite else ()
                        for part in self._parts(result):
                            n_page += len(part)
                            chunk: list[dict[str, Any]] = []
                            for values in part:
                                if not lenient:
                                    # The cursor is the value the warehouse compares on
                                    # (SQLite: millisecond text), so resuming after it is exact.
                                    # (zip's strict= keyword alone costs ~1% of the read)
                                    row = dict(zip(keys, values))  # noqa: B905 - _ls_ts comes last
                                    for column in times:
                                        value = row[column]
                                        if value.__class__ is str:
                                            row[column] = _text_time(value)
                                    ts = parse_ts(values[at])
                                    if ts is not None:
                                        row["_cursor"] = Cursor(ts, row.get("lead_id"),
                                                                str(row.get("stage")))
                                        chunk.append(row)
                                        continue
                                    marker = _marker(row, None, ("updated_at",))
                                else:
                                    row = dict(zip(names, values, strict=True))
                                    row.setdefault("_ls_ts", values[at])  # _unreadable's key
                                    found = self._unreadable(row)
                                    if found is None:
                                        cursor = _cursor(row)
                                        if cursor is not None:
                                            row["_cursor"] = cursor
                                            chunk.append(row)
                                            continue
                                        found = _marker(row, None, ("updated_at",))
                                    marker = found
                                if chunk:
                                    last, since = _resume_after(chunk, last, since)
                                    yield chunk
                                    chunk = []
                                raw = marker.cursor
                                if raw is not None and _pageable(raw):
                                    last, since = raw, 0
                                else:
                                    since += 1
                                yield _storable(marker)
                            if chunk:
                                last, since = _resume_after(chunk, last, since)
                                yield chunk
                    finally:
                        if lenient:
                            conn.invalidate()  # never hand the lenient casters to the pool
            except Exception as exc:  # noqa: BLE001
                failed = exc
            if failed is not None:
                if lenient:
                    raise SourceError(f"reading the source failed: {clean_error(failed)}") \
                        from None
                # Read the rest of this page again, leniently, from the last row yielded.
                lenient = True
                lo, exact, skip = _next_page(lo, exact, skip, last, since)
                continue
            if n_page < self.page_size:
                return
            if last is not None and lo is not None and exact and last == lo:
                # The database did not move past the bound it was given: paging again would
                # re-read the same page forever.
                raise SourceError(
                    "the source made no progress past updated_at "
                    f"{last.ts.isoformat()}; check that updated_at, lead_id and stage compare "
                    "consistently in the warehouse"
                )
            # Next page: strictly after the last row, in the warehouse's own ordering.
            lo, exact, skip = _next_page(lo, exact, skip, last, since)
            lenient = False

    def _lenient(self, conn: Connection) -> None:
        """Makes ``conn`` return a marker for values it cannot read, instead of raising.

        SQLite: text that is not UTF-8 decodes with ``surrogateescape`` into a marked string.
        psycopg2: every type caster is wrapped to return :data:`UNCONVERTIBLE` when the value
        is out of Python's range. The connection is invalidated after use.
        """
        dbapi = conn.connection.dbapi_connection
        if self._sqlite:
            dbapi.text_factory = _lenient_text  # type: ignore[union-attr]
            return
        if self.engine.dialect.driver == "psycopg2":
            from psycopg2 import extensions

            own = getattr(dbapi, "string_types", {}) or {}
            for oid, caster in {**extensions.string_types, **own}.items():
                extensions.register_type(
                    extensions.new_type((oid,), f"LEADSYNC_LENIENT_{oid}", _lenient_cast(caster)),
                    dbapi)

    def read_leniently(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """All rows of a small query, a value the driver cannot read given as None.

        For side queries whose rows are quarantined whatever they hold (rows without a
        cursor): the strict read failing must not stop the check.
        """
        with self.engine.connect() as conn:
            self._lenient(conn)
            try:
                return [{k: None if v is UNCONVERTIBLE or v.__class__ is _Undecodable else v
                         for k, v in m.items()}
                        for m in conn.execute(text(sql), params).mappings()]
            finally:
                conn.invalidate()

    @staticmethod
    def _unreadable(row: dict[str, Any]) -> UnreadableRow | None:
        bad = tuple(k for k, v in row.items()
                    if v is UNCONVERTIBLE or v.__class__ is _Undecodable)
        if not bad:
            return None
        cursor = _cursor(row) if "_ls_ts" not in bad else None
        names = dict.fromkeys("updated_at" if c == "_ls_ts" else c for c in bad)
        return _marker(row, cursor, tuple(names))


def _lenient_cast(caster: Any) -> Any:
    def cast(value: Any, cur: Any) -> Any:
        try:
            return caster(value, cur)
        except Exception:  # noqa: BLE001 - out of range, or not convertible at all
            return UNCONVERTIBLE

    return cast


def _cursor(row: dict[str, Any]) -> Cursor | None:
    """The row's cursor (the value the warehouse compares on: SQLite gives millisecond text,
    so that resuming after it is exact); pops ``_ls_ts``. None when it has no usable one."""
    raw_ts = row.pop("_ls_ts", None)
    try:
        ts = to_utc(raw_ts)
    except (OverflowError, ValueError):
        return None
    if ts is None:
        return None
    stage = row.get("stage")
    return Cursor(ts, row.get("lead_id"), stage if isinstance(stage, str) else str(stage))


def _resume_after(chunk: list[dict[str, Any]], last: Cursor | None,
                  since: int) -> tuple[Cursor | None, int]:
    """The last row of ``chunk`` paging can resume after, and how many rows follow it (the
    state before the chunk when none of its rows can be resumed after)."""
    for back, row in enumerate(reversed(chunk)):
        if _pageable(row["_cursor"]):
            return row["_cursor"], back
    return last, since + len(chunk)


def _next_page(lo: Cursor | None, exact: bool, skip: int, last: Cursor | None,
               since: int) -> tuple[Cursor | None, bool, int]:
    """Where the next query starts: after the last row it can resume after, skipping the rows
    yielded since; with none in this page, at the same bound, skipping this page's rows too."""
    if last is not None:
        return last, True, since
    return lo, exact, skip + since


def _pageable(cursor: Cursor) -> bool:
    return cursor.lead_id is not UNCONVERTIBLE and cursor.stage != repr(UNCONVERTIBLE)


def _storable(marker: UnreadableRow) -> UnreadableRow:
    """The marker as consumers get it: its cursor's keys as storable text (the stream pages
    on the raw ones)."""
    cur = marker.cursor
    if cur is None or not (isinstance(cur.lead_id, _Undecodable)
                           or isinstance(cur.stage, _Undecodable)):
        return marker
    lead = _safe_text(cur.lead_id) if isinstance(cur.lead_id, _Undecodable) else cur.lead_id
    safe = Cursor(cur.ts, lead, _safe_text(cur.stage))
    return UnreadableRow(marker.lead_id, marker.stage, safe, marker.columns)


def _bindable(value: Any) -> Any:
    if isinstance(value, _Undecodable):
        return value.encode("utf-8", "surrogateescape")
    return value


def _marker(row: dict[str, Any], cursor: Cursor | None, columns: tuple[str, ...]) -> UnreadableRow:
    row.pop("_ls_ts", None)
    return UnreadableRow(_safe_text(row.get("lead_id")), _safe_text(row.get("stage")), cursor,
                         columns)

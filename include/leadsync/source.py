"""Warehouse extraction: keyset pagination on (updated_at, lead_id, stage), streamed in chunks.

The user's SQL (``include/sql/converted_leads.sql``) is wrapped as a subquery; leadsync adds the
cursor bounds, the order and the page limit. Each page is one query streamed with a server-side
cursor (Postgres) so that memory stays flat however large the window is; the next page starts
strictly after the last row of the previous one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, text

from leadsync.state import Cursor

REQUIRED_COLUMNS = ("lead_id", "stage", "event_time", "updated_at")


class SourceError(RuntimeError):
    """The source query failed or does not follow the contract (the message says how)."""


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


def to_utc(value: Any) -> datetime | None:
    """Coerces a warehouse timestamp (datetime, date or ISO text) to an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        raw = value.strip()
        if not raw:
            return None
        if raw.endswith(("Z", "z")):
            raw = raw[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            return None
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(float(value), tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


class Source:
    """Reads the user's query in cursor order between a window's bounds."""

    def __init__(self, engine: Engine, query: str, chunk_size: int = 5000,
                 page_size: int = 100_000) -> None:
        self.engine = engine
        self.query = query
        self.chunk_size = chunk_size
        self.page_size = max(page_size, chunk_size)
        self._sqlite = engine.dialect.name == "sqlite"

    def _ts_param(self, ts: datetime) -> Any:
        # SQLite has no timestamp type: rows hold text, compared through strftime so that
        # 'T'/'Z'/offset spellings all normalise to one sortable UTC form.
        if self._sqlite:
            return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:23]
        return ts

    def _sql(self, lo: Cursor | None, exact: bool) -> str:
        ts = (
            "strftime('%Y-%m-%d %H:%M:%f', src.updated_at)"
            if self._sqlite
            else "src.updated_at"
        )
        where = ["w._ls_ts <= :hi_ts"]
        if lo is not None:
            if exact:
                where.append(
                    "(w._ls_ts > :lo_ts OR (w._ls_ts = :lo_ts AND (w.lead_id > :lo_lead"
                    " OR (w.lead_id = :lo_lead AND w.stage > :lo_stage))))"
                )
            else:
                where.append("w._ls_ts >= :lo_ts")
        return (
            f"SELECT * FROM (SELECT src.*, {ts} AS _ls_ts FROM ({self.query}) src) w "
            f"WHERE {' AND '.join(where)} "
            "ORDER BY w._ls_ts, w.lead_id, w.stage LIMIT :page"
        )

    def check_columns(self) -> list[str]:
        """Runs the query with no rows to list its columns; fails on missing ones."""
        try:
            with self.engine.connect() as conn:
                result = conn.execute(text(f"SELECT * FROM ({self.query}) src WHERE 1=0"))
                columns = list(result.keys())
        except Exception as exc:  # noqa: BLE001 - any driver error becomes one clear message
            raise SourceError(f"the source query failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300]}") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise SourceError(
                f"the source query lacks required column(s) {', '.join(missing)}; "
                f"it returns: {', '.join(columns)}"
            )
        return columns

    def stream(self, window: Window) -> Iterator[list[dict[str, Any]]]:
        """Yields chunks of rows (dicts) in cursor order; each row gets ``_cursor``."""
        lo = window.lo
        exact = lo is not None and lo.lead_id is not None
        while True:
            params: dict[str, Any] = {"hi_ts": self._ts_param(window.hi), "page": self.page_size}
            if lo is not None:
                params["lo_ts"] = self._ts_param(lo.ts)
                if exact:
                    params["lo_lead"] = lo.lead_id
                    params["lo_stage"] = lo.stage
            n_page = 0
            last: Cursor | None = None
            try:
                with self.engine.connect() as conn:
                    result = conn.execution_options(
                        stream_results=True, yield_per=self.chunk_size
                    ).execute(text(self._sql(lo, exact)), params)
                    for part in result.mappings().partitions(self.chunk_size):
                        chunk = []
                        for mapping in part:
                            row = dict(mapping)
                            raw_ts = row.pop("_ls_ts")
                            # The cursor is the value the warehouse compares on (SQLite:
                            # millisecond text), so that resuming after it is exact.
                            ts = to_utc(raw_ts)
                            if ts is None:
                                raise SourceError(
                                    "a row has no usable updated_at; the cursor column must "
                                    "be a non-null timestamp"
                                )
                            row["_cursor"] = Cursor(ts, row.get("lead_id"), str(row.get("stage")))
                            chunk.append(row)
                        n_page += len(chunk)
                        if chunk:
                            last = chunk[-1]["_cursor"]
                            yield chunk
            except SourceError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise SourceError(
                    f"reading the source failed: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:300]}"
                ) from None
            if n_page < self.page_size or last is None:
                return
            if lo is not None and exact and last == lo:
                # The database did not move past the bound it was given: paging again would
                # re-read the same page forever.
                raise SourceError(
                    "the source made no progress past updated_at "
                    f"{last.ts.isoformat()}; check that updated_at, lead_id and stage compare "
                    "consistently in the warehouse"
                )
            # Next page: strictly after the last row, in the warehouse's own ordering.
            lo = last
            exact = True

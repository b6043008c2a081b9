"""A seeded generator of hostile source rows (test tooling; never imported by leadsync).

Rows follow the source contract's column names but break it in the ways real warehouses do:
types swapped, huge and empty strings, control characters, text that is not UTF-8, extreme
numbers and timestamps, duplicate keys, columns of the wrong type. A planted :data:`CANARY`
sits in every raw identifier and hostile value (never in ``lead_id``, ``stage`` or
``event_id``, which leadsync keeps as keys by design, nor in the click ids and browser fields it
sends raw), so a scan of logs, XCom, state tables and Data Docs proves no value escaped.

:func:`write_sqlite` and :func:`write_postgres` store the rows in a ``crm_lead_stages`` table
that the bundled source query reads; :func:`jsonl_lines` gives them as ``leadsync render`` input
lines, with undecodable and malformed lines mixed in.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

CANARY = "Qzx7CanaryVal"  # mixed case: leadsync lowercases emails before hashing

COLUMNS = ("lead_id", "stage", "event_time", "updated_at", "event_id", "email", "phone",
           "first_name", "last_name", "city", "state", "zip", "country", "date_of_birth",
           "gender", "external_id", "fbc", "fbp", "ttclid", "ttp", "gclid", "gbraid", "wbraid",
           "client_ip", "user_agent", "event_source_url", "meta_lead_id", "tiktok_lead_id",
           "value", "currency", "ad_user_data", "ad_personalization", "opted_out",
           "limited_data_use")
STAGES = ("lead", "qualified", "sales_accepted", "won")
# Raw identifiers leadsync hashes (or drops) and never stores: the canary's places.
CANARY_COLUMNS = ("email", "phone", "first_name", "last_name", "city", "state", "zip",
                  "date_of_birth", "gender", "external_id")
KINDS = ("clean", "types_swapped", "huge_string", "empty_strings", "control_chars",
         "invalid_encoding", "extreme_number", "extreme_time", "duplicate_key", "wrong_type")


class BadText(bytes):
    """Text that is not UTF-8: stored as TEXT with these bytes (SQLite only)."""


class PgLiteral(str):
    """A literal Postgres casts to the column's type (``infinity``, ``10000-01-01``, ``NaN``)."""


@dataclass
class FuzzRow:
    """One generated row and the hostilities it carries."""

    values: dict[str, Any]
    kinds: tuple[str, ...]


@dataclass
class FuzzSet:
    """The rows of one seed, for one backend."""

    seed: int
    backend: str
    rows: list[FuzzRow] = field(default_factory=list)

    def kinds(self) -> Counter[str]:
        """How many rows carry each hostility."""
        return Counter(k for r in self.rows for k in r.kinds)


def _clean(rng: random.Random, i: int, seed: int, now: datetime) -> dict[str, Any]:
    tag = f"{seed}x{i}"
    updated = now - timedelta(minutes=rng.uniform(5, 90))
    event = updated - timedelta(minutes=rng.uniform(0, 60 * 24 * 5))
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update({
        "lead_id": f"FZ{tag}", "stage": rng.choice(STAGES),
        "event_time": event.isoformat(), "updated_at": updated.isoformat(),
        "email": f"{CANARY}.{tag}@example.com", "phone": f"+1 650 555 {i % 10000:04d}",
        "first_name": f"{CANARY}first", "last_name": f"{CANARY}last", "city": "Springfield",
        "country": "US", "external_id": f"{CANARY}-ext-{tag}", "opted_out": False,
    })
    if rng.random() < 0.3:
        row["value"], row["currency"] = round(rng.uniform(1, 5000), 2), "USD"
    return row


def _hostile(rng: random.Random, kind: str, row: dict[str, Any], backend: str,
             pool: list[dict[str, Any]]) -> None:
    pg = backend == "postgres"
    col = rng.choice(CANARY_COLUMNS)
    if kind == "types_swapped":
        choice = rng.randrange(5)
        if choice == 0 and not pg:
            row["lead_id"] = rng.randrange(10**12)  # an integer id is fine by the contract
        elif choice == 1 and not pg:
            row["stage"] = rng.choice([7, 2.5, True])
        elif choice == 2 and not pg:
            row["event_time"] = rng.choice([1700000000, 1.7e9])
        elif choice == 3:
            row["value"], row["currency"] = (PgLiteral("NaN") if pg else f"{CANARY}9"), "USD"
        else:
            row["email"], row["phone"] = (f"+1 650 {CANARY}", f"{CANARY}@example.com")
    elif kind == "huge_string":
        row[col] = CANARY + "x" * rng.choice([70_000, 250_000])
        if rng.random() < 0.3:
            row["user_agent"] = "Mozilla/5.0 " + "y" * 100_000
    elif kind == "empty_strings":
        for name in rng.sample(["lead_id", "stage", "email", "phone", "event_time", "country",
                                "currency", "first_name"], 3):
            row[name] = None if pg and name == "event_time" else rng.choice(["", "   ", "\t"])
    elif kind == "control_chars":
        target = rng.choice([col, col, "lead_id"])
        junk = "".join(chr(c) for c in rng.sample([1, 7, 8, 10, 13, 27, 127], 3))
        if not pg:
            junk += "\x00"  # Postgres text cannot hold NUL
        row[target] = (row[target] or "") + junk + ("" if target == "lead_id" else CANARY)
    elif kind == "invalid_encoding":
        if pg:  # Postgres refuses invalid UTF-8 at insert: the closest it holds is odd text
            row[col] = f"{CANARY}\u202e\ufeff\U0001f600\u0301"
        else:
            target = rng.choice([col, col, col, "lead_id", "country", "currency"])
            prefix = b"" if target == "lead_id" else CANARY.encode()
            row[target] = BadText(prefix + rng.choice([b"\xff", b"\xc3(", b"\xed\xa0\x80",
                                                       b"\xf8\x88\x80\x80\x80"]) + b"Z")
    elif kind == "extreme_number":
        literal = rng.choice(["NaN", "Infinity", "-Infinity", "1e300", "-42", "0"])
        if pg:
            row["value"] = PgLiteral(literal if "e" not in literal else "1" + "0" * 300)
        else:
            row["value"] = float(literal)
        row["currency"] = rng.choice(["USD", "EUR", CANARY[:3], None])
    elif kind == "extreme_time":
        if pg:
            row["event_time"] = PgLiteral(rng.choice(
                ["infinity", "-infinity", "10000-01-01 00:00:00+00", "0044-03-15 00:00:00+00 BC",
                 "4713-01-01 00:00:00+00 BC", "294276-12-31 00:00:00+00", "1970-01-01"]))
            if rng.random() < 0.15:
                row["updated_at"] = PgLiteral("0001-06-01 00:00:00+00 BC")
        else:
            row["event_time"] = rng.choice(
                ["9999-12-31T23:59:59+00:00", "0001-01-01T00:00:00+14:00", "1970-01-01",
                 f"{CANARY}-not-a-date", "2026-02-30T10:00:00Z", "  "])
    elif kind == "duplicate_key" and pool:
        other = rng.choice(pool)
        row["lead_id"], row["stage"] = other["lead_id"], other["stage"]
    elif kind == "wrong_type":
        if pg:
            row["phone"] = rng.choice([{"number": CANARY}, [1, CANARY], 123, True])
        else:
            choice = rng.randrange(4)
            if choice == 0:
                row["email"] = (CANARY + "@example.com").encode()  # a BLOB
            elif choice == 1:
                row["phone"] = rng.choice([16505550123, 3.5])
            elif choice == 2:
                row["opted_out"] = f"{CANARY}maybe"
            else:
                row["country"] = 840


def generate(seed: int, n: int, backend: str, now: datetime | None = None,
             hostile_share: float = 0.5) -> FuzzSet:
    """``n`` rows for ``backend`` ("sqlite" or "postgres"), about ``hostile_share`` hostile."""
    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    out = FuzzSet(seed, backend)
    pool: list[dict[str, Any]] = []
    for i in range(n):
        row = _clean(rng, i, seed, now)
        kinds: tuple[str, ...] = ("clean",)
        if rng.random() < hostile_share:
            kinds = tuple(sorted(set(rng.choices(KINDS[1:], k=rng.choice([1, 1, 2])))))
            for kind in kinds:
                _hostile(rng, kind, row, backend, pool)
        else:
            pool.append(row)
        out.rows.append(FuzzRow(row, kinds))
    return out


_PG_TYPES = {"event_time": "timestamptz", "updated_at": "timestamptz", "value": "numeric",
             "phone": "jsonb", "ad_user_data": "boolean", "ad_personalization": "boolean",
             "opted_out": "boolean", "limited_data_use": "boolean"}


def write_sqlite(engine: Any, rows: list[FuzzRow]) -> None:
    """Creates ``crm_lead_stages`` with untyped columns (SQLite keeps any value as given) and
    inserts the rows; :class:`BadText` values become TEXT holding invalid UTF-8."""
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute(f"CREATE TABLE IF NOT EXISTS crm_lead_stages ({', '.join(COLUMNS)})")
        for fuzz in rows:
            values = [fuzz.values[c] for c in COLUMNS]
            marks = ", ".join("CAST(? AS TEXT)" if isinstance(v, BadText) else "?"
                              for v in values)
            cur.execute(f"INSERT INTO crm_lead_stages VALUES ({marks})",
                        [bytes(v) if isinstance(v, BadText) else v for v in values])
        raw.commit()
    finally:
        raw.close()


def write_postgres(engine: Any, rows: list[FuzzRow]) -> None:
    """Creates a typed ``crm_lead_stages`` (timestamptz, unconstrained numeric, a jsonb phone)
    and inserts the rows; :class:`PgLiteral` values are cast by Postgres itself."""
    cols = ", ".join(f"{c} {_PG_TYPES.get(c, 'text')}" for c in COLUMNS)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute(f"CREATE TABLE IF NOT EXISTS crm_lead_stages ({cols})")
        marks = ", ".join(f"%s::{_PG_TYPES.get(c, 'text')}" for c in COLUMNS)
        for fuzz in rows:
            values = []
            for c in COLUMNS:
                v = fuzz.values[c]
                if c == "phone" and v is not None:
                    v = json.dumps(v)
                elif isinstance(v, datetime):
                    v = v.isoformat()
                values.append(v)
            cur.execute(f"INSERT INTO crm_lead_stages VALUES ({marks})", values)
        raw.commit()
    finally:
        raw.close()


def jsonl_lines(seed: int, n: int, now: datetime | None = None) -> list[bytes]:
    """``n`` input lines for ``leadsync render``: fuzzed rows as JSON, and lines that are not
    (invalid UTF-8, lone surrogates, broken JSON, JSON that is not an object)."""
    rng = random.Random(seed)
    fuzz = generate(seed, n, "sqlite", now)
    lines: list[bytes] = []
    for fr in fuzz.rows:
        r = rng.random()
        if r < 0.03:
            lines.append(b'{"lead_id": "FZbad", "email": "' + CANARY.encode() + b'\xff\xfe"}')
        elif r < 0.06:
            lines.append(('{"lead_id": "FZsur", "stage": "won", "first_name": "'
                          + CANARY + '\\ud83d"}').encode())
        elif r < 0.08:
            lines.append(b'{"lead_id": "FZtrunc", "email": "' + CANARY.encode())
        elif r < 0.09:
            lines.append(rng.choice([b"[1, 2]", b'"' + CANARY.encode() + b'"', b"null", b"42"]))
        else:
            values = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                      for k, v in fr.values.items()}
            if rng.random() < 0.05:
                values["phone"] = {"nested": CANARY}
            lines.append(json.dumps(values, allow_nan=True).encode())
    return lines

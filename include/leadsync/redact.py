"""Error messages without data: what drivers, GX and platforms say, cleaned of row values.

A driver's message often quotes the value it choked on (``Could not decode to UTF-8 column
'first_name' with text 'A\ufffdB'``, ``invalid input syntax for type timestamp: "…"``,
``Key (email)=(x@example.com) already exists``) and SQLAlchemy appends the statement's bound
parameters. Before such a message reaches a log line, an exception, XCom or the state store it
goes through :func:`clean_message` (or :func:`clean_error` for an exception): identifiers that
follow a word naming them (column, table, constraint, …), rule codes, positions and counts stay;
quoted text, parenthesised key values and parameter dumps go.

Pure functions, no dependencies: every layer (source, quality, delivery, CLI) can use them.
"""

from __future__ import annotations

import re

__all__ = ["REDACTED", "clean_error", "clean_message"]

REDACTED = "…"

# Words after which a quoted token names a schema object (kept), not a value.
_NAMING_WORDS = (
    "column", "columns", "relation", "table", "constraint", "index", "schema", "function",
    "field", "key", "option", "setting", "database", "role", "user", "sequence", "view",
    "type", "codec", "expectation", "destination", "connection", "extra", "rule",
)
_IDENT = r"[A-Za-z_][A-Za-z0-9_.$-]{0,62}"
# A quoted token right after a naming word, and the token is shaped like an identifier.
_NAMED = re.compile(
    r"\b(?:" + "|".join(_NAMING_WORDS) + r")\s+(['\"`])(" + _IDENT + r")\1", re.IGNORECASE)
# SQLAlchemy's appendices: the statement, its parameters and the doc link.
_APPENDIX = re.compile(r"\s*(?:\[SQL:|\[parameters:|\(Background on this error).*", re.DOTALL)
# Postgres "Key (col)=(value)" and "DETAIL:" lines carry values.
_KEY_VALUE = re.compile(r"=\((?:[^()]|\([^()]*\))*\)")
# A quote opens where no letter precedes it and closes where none follows ("can't" is no quote).
_QUOTED = re.compile(r"(?<!\w)(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`[^`]*`)(?!\w)")
# A quote left open (a message cut short inside a value): the rest of the line goes.
_DANGLING_QUOTE = re.compile(r"(?<!\w)['\"`].*$")
_LIMIT = 400


def clean_message(message: str, limit: int = _LIMIT) -> str:
    """``message`` without row values: the first line, quoted values and key dumps removed.

    Identifiers named as such stay (``column 'first_name'``), so a reader still learns what
    failed and where; numbers stay (positions, counts, a year out of range).
    """
    text = _APPENDIX.sub("", str(message).replace("\x00", "").replace("\x01", ""))
    # Only the first line: Postgres puts DETAIL/HINT/CONTEXT (with values) on the next ones.
    text = text.strip().split("\n", 1)[0].strip()
    kept: dict[str, str] = {}

    def keep(match: re.Match[str]) -> str:
        token = f"\x00{len(kept)}\x00"
        kept[token] = match.group(0)
        return token

    text = _NAMED.sub(keep, text)
    text = _KEY_VALUE.sub(f"=({REDACTED})", text)
    text = _QUOTED.sub("\x01", text)
    text = _DANGLING_QUOTE.sub("\x01", text)
    text = text.replace("\x01", f"'{REDACTED}'")
    for token, original in kept.items():
        text = text.replace(token, original)
    text = text.replace("\x00", "").replace("\x01", "")
    # Lone surrogates (undecodable input) cannot be logged or stored as UTF-8.
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + REDACTED


def clean_error(exc: BaseException, limit: int = _LIMIT) -> str:
    """``"<ExceptionType>: <clean message>"`` for a driver's or a library's exception."""
    inner = getattr(exc, "orig", None)  # SQLAlchemy wraps the DBAPI error: name the driver's
    name = type(inner if isinstance(inner, BaseException) else exc).__name__
    message = clean_message(str(inner if isinstance(inner, BaseException) else exc), limit)
    return f"{name}: {message}" if message else name

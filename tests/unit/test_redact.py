"""Error messages lose row values and keep what a person needs (names, codes, numbers)."""

from __future__ import annotations

import pytest

from leadsync.redact import clean_error, clean_message

CANARY = "Qzx7Canary"


@pytest.mark.parametrize(("message", "kept"), [
    (f"Could not decode to UTF-8 column 'first_name' with text '{CANARY}\ufffd'",
     "column 'first_name'"),
    (f'invalid input syntax for type timestamp with time zone: "{CANARY}"\nLINE 1: ...',
     "invalid input syntax for type timestamp"),
    (f'duplicate key value violates unique constraint "pk_leads"\nDETAIL:  Key (email)=({CANARY}'
     '@x.com) already exists.', 'constraint "pk_leads"'),
    (f"(psycopg2.errors.DataError) bad value\n[SQL: SELECT '{CANARY}']\n[parameters: "
     f"{{'p': '{CANARY}'}}]\n(Background on this error at: https://sqlalche.me/e/20/9h9h)",
     "bad value"),
    (f"Key (lead_id, stage)=({CANARY} (1), won) exists", "Key (lead_id, stage)=(…) exists"),
    (f"Invalid isoformat string: '{CANARY}", "Invalid isoformat string"),
    (f"'utf-8' codec can't encode character '\\ud83d' in position 5: {CANARY!r}",
     "can't encode character '…' in position 5"),
    ("year 10000 is out of range", "year 10000 is out of range"),
    (f"Invalid parameter: user_data.em[0] '{CANARY}' is not hashed (rule bad_email, 3 rows)",
     "rule bad_email, 3 rows"),
])
def test_values_go_names_and_numbers_stay(message: str, kept: str) -> None:
    cleaned = clean_message(message)
    assert CANARY not in cleaned
    assert kept in cleaned
    assert "\n" not in cleaned


def test_lone_surrogates_and_control_bytes_cannot_break_a_log_line() -> None:
    cleaned = clean_message("bad \ud83d text \x00 here")
    cleaned.encode("utf-8")  # would raise with a lone surrogate
    assert "\x00" not in cleaned


def test_long_messages_are_cut() -> None:
    assert len(clean_message("x" * 5000, 300)) == 300


def test_clean_error_names_the_drivers_exception() -> None:
    class Wrapped(Exception):
        orig = ValueError(f"invalid literal for int() with base 10: '{CANARY}'")

    assert clean_error(Wrapped("ignored")) == \
        "ValueError: invalid literal for int() with base 10: '…'"

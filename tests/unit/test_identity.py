"""Unit tests for leadsync.identity: normalisation and hashing of identifiers, per platform."""

from __future__ import annotations

import random
import re
import unicodedata
import uuid
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leadsync import identity
from leadsync.identity import (
    GOOGLE_RULES,
    META_RULES,
    TIKTOK_RULES,
    FieldRule,
    Ruleset,
    country_rule,
    hash_identifiers,
    hash_identifiers_as_lists,
    is_sha256,
    is_usable,
    normalize_city,
    normalize_country,
    normalize_date_of_birth,
    normalize_email,
    normalize_email_google,
    normalize_external_id,
    normalize_gender,
    normalize_name,
    normalize_phone_digits,
    normalize_phone_e164,
    normalize_state,
    normalize_zip,
    sha256_hex,
    usability_column,
    usability_judge,
    value_rule,
)

# Computed independently: `echo -n john_smith@gmail.com | sha256sum` (also Meta's doc example).
JOHN_SMITH_SHA256 = "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
# `echo -n 16505551212 | sha256sum` and `echo -n +16505551212 | sha256sum`.
PHONE_DIGITS_SHA256 = "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"
PHONE_E164_SHA256 = "1e231c66011e7a2d867a9cfae267a6aff103cf4913640b6e71a99850fc0ffbc8"
HEX64 = re.compile(r"[0-9a-f]{64}")

META_COLUMNS = (
    "email",
    "phone",
    "first_name",
    "last_name",
    "city",
    "state",
    "zip",
    "country",
    "date_of_birth",
    "gender",
    "external_id",
)


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    identity.clear_caches()


# --------------------------------------------------------------------------------------------
# Hashing primitives
# --------------------------------------------------------------------------------------------


def test_sha256_hex_known_value() -> None:
    assert sha256_hex("john_smith@gmail.com") == JOHN_SMITH_SHA256
    assert sha256_hex("16505551212") == PHONE_DIGITS_SHA256
    assert sha256_hex("valéry") == sha256_hex("val\u00e9ry")  # UTF-8 bytes of the NFC form


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (JOHN_SMITH_SHA256, True),
        (JOHN_SMITH_SHA256.upper(), True),
        (JOHN_SMITH_SHA256[:-1], False),
        (JOHN_SMITH_SHA256 + "0", False),
        ("g" * 64, False),
        ("d41d8cd98f00b204e9800998ecf8427e", False),  # md5 is not passed through
        ("", False),
    ],
)
def test_is_sha256(value: str, expected: bool) -> None:
    assert is_sha256(value) is expected


# --------------------------------------------------------------------------------------------
# Meta documentation examples
# --------------------------------------------------------------------------------------------


def test_meta_doc_examples() -> None:
    row = {
        "email": "John_Smith@gmail.com ",
        "phone": "(650)555-1212",
        "first_name": "Valéry",
        "last_name": "Smith",
        "city": "Menlo Park",
        "state": "CA",
        "zip": "94035-1234",
        "country": "US",
        "date_of_birth": "1997-02-01",
        "gender": "f",
        "external_id": "a-1",
    }
    out = hash_identifiers(row, META_RULES)
    assert out == {
        "em": JOHN_SMITH_SHA256,
        "ph": PHONE_DIGITS_SHA256,
        "fn": sha256_hex("valéry"),
        "ln": sha256_hex("smith"),
        "ct": sha256_hex("menlopark"),
        "st": sha256_hex("ca"),
        "zp": sha256_hex("94035"),
        "country": sha256_hex("us"),
        "db": sha256_hex("19970201"),
        "ge": sha256_hex("f"),
        "external_id": sha256_hex("a-1"),
    }
    assert list(out) == list(META_RULES.keys)


def test_meta_field_normalisers_doc_examples() -> None:
    assert normalize_email("John_Smith@gmail.com ") == "john_smith@gmail.com"
    assert normalize_phone_digits("(650)555-1212", "US") == "16505551212"
    assert normalize_name("Valéry") == "valéry"
    assert normalize_zip("94035-1234", "US") == "94035"
    assert normalize_country("US") == "us"
    assert normalize_date_of_birth("1997-02-01") == "19970201"
    assert normalize_gender("Female") == "f"
    assert normalize_state("California", "US") == "ca"
    assert normalize_city("Menlo Park") == "menlopark"


# --------------------------------------------------------------------------------------------
# Email
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  JOHN_SMITH@GMAIL.COM\t", "john_smith@gmail.com"),
        ("Jane.Doe+promo@Example.com", "jane.doe+promo@example.com"),
        ("mailto:a@b.co", "a@b.co"),
        ("ünïcode@bücher.de", "ünïcode@bücher.de"),
        ("not-an-email", None),
        ("john smith@gmail.com", None),
        ("a@b@c.com", None),
        ("john@localhost", None),
        ("john@example.", None),
        ("@example.com", None),
        ("", None),
        ("   ", None),
        (None, None),
        (42, None),
        ("x" * 300 + "@example.com", None),
    ],
)
def test_normalize_email(raw: object, expected: str | None) -> None:
    assert normalize_email(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Jane.Doe+promo@GoogleMail.com", "janedoe@googlemail.com"),
        (" J.o.h.n@gmail.com ", "john@gmail.com"),
        ("jane.doe+promo@example.com", "jane.doe+promo@example.com"),
        ("jane.doe@gmail.co.uk", "jane.doe@gmail.co.uk"),
        ("+promo@gmail.com", None),
        ("no-at-sign", None),
    ],
)
def test_normalize_email_google(raw: str, expected: str | None) -> None:
    assert normalize_email_google(raw) == expected


# --------------------------------------------------------------------------------------------
# Phone
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "country", "expected"),
    [
        # International forms: the country column is irrelevant.
        ("+1 (650) 555-1212", None, "+16505551212"),
        ("+16505551212", "DE", "+16505551212"),
        ("  + 1 650 555 1212  ", None, "+16505551212"),
        ("0016505551212", None, "+16505551212"),
        ("0044 20 7946 0958", "US", "+442079460958"),
        ("+44 (0)20 7946 0958", None, "+442079460958"),
        ("+49 30 12345678", None, "+493012345678"),
        ("+33 6 12 34 56 78", None, "+33612345678"),
        ("+55 11 98765-4321", None, "+5511987654321"),
        ("+91 98765 43210", None, "+919876543210"),
        ("+39 06 6982 1234", None, "+390669821234"),  # Italy keeps its leading zero
        ("+683 4002", None, "+6834002"),  # Niue: 7 digits in all
        ("038 123 456", "XK", "+38338123456"),  # Kosovo has a numbering plan, no ISO code
        ("tel:+1-650-555-1212", None, "+16505551212"),
        # National formats read with the row's country.
        ("(650)555-1212", "US", "+16505551212"),
        ("650.555.1212", "us ", "+16505551212"),
        ("1 650 555 1212", "US", "+16505551212"),
        ("16505551212", "United States", "+16505551212"),
        ("011 44 20 7946 0958", "US", "+442079460958"),
        ("030 12345678", "DE", "+493012345678"),
        ("030/12345678", "Germany", "+493012345678"),
        ("0171 1234567", "de", "+491711234567"),
        ("07911 123456", "GB", "+447911123456"),
        ("020 7946 0958", "UK", "+442079460958"),
        ("06 12 34 56 78", "FR", "+33612345678"),
        ("01.23.45.67.89", "fr", "+33123456789"),
        ("(11) 98765-4321", "BR", "+5511987654321"),
        ("011 98765 4321", "BR", "+5511987654321"),
        ("98765 43210", "IN", "+919876543210"),
        ("098765 43210", "IN", "+919876543210"),
        ("416-555-0123", "CA", "+14165550123"),
        # Extensions are dropped.
        ("+1 650 555 1212 ext. 123", None, "+16505551212"),
        ("(650) 555-1212 x42", "US", "+16505551212"),
        ("650-555-1212 #7", "US", "+16505551212"),
        # Non-string inputs.
        (16505551212, "US", "+16505551212"),
        (16505551212.0, "US", "+16505551212"),
        (6505551212, "US", "+16505551212"),
        (Decimal("6505551212"), "US", "+16505551212"),
        (b"+16505551212", None, "+16505551212"),
        # Unusable.
        ("6505551212", None, None),  # national, no country: not guessed
        ("6505551212", "Atlantis", None),
        ("n/a", "US", None),
        ("000", "US", None),
        ("0", "US", None),
        ("123", "US", None),
        ("555-1212", "FR", None),
        ("555-1212", "US", None),  # local-only: no area code
        ("100", "DE", None),
        ("1-800-FLOWERS", "US", None),  # letters
        ("call me after 5", "US", None),
        ("+1 111 111 1111", None, None),  # placeholder
        ("0000000000", "US", None),
        ("+999 1234 5678", None, None),  # unknown calling code
        ("+0 650 555 1212", None, None),
        ("+1 650 555 12121212", None, None),  # too long
        ("+1 650", None, None),  # too short
        ("+1", None, None),
        ("+", None, None),
        ("()", "US", None),
        ("", "US", None),
        ("   ", "US", None),
        (None, "US", None),
        (True, "US", None),
        (1.5, "US", None),
        (float("nan"), "US", None),
        ("+1 650 555 1212 / +1 650 555 1213", None, None),
        ("1" * 2000, "US", None),
    ],
)
def test_normalize_phone_e164(raw: object, country: object, expected: str | None) -> None:
    assert normalize_phone_e164(raw, country) == expected
    digits = normalize_phone_digits(raw, country)
    assert digits == (None if expected is None else expected[1:])


def test_phone_hashes_per_platform() -> None:
    row = {"phone": "(650)555-1212", "country": "US"}
    assert hash_identifiers(row, META_RULES) == {
        "ph": PHONE_DIGITS_SHA256,
        "country": sha256_hex("us"),
    }
    assert hash_identifiers(row, TIKTOK_RULES) == {"phone": PHONE_E164_SHA256}
    assert hash_identifiers(row, GOOGLE_RULES) == {"hashed_phone_number": PHONE_E164_SHA256}


def _random_national_inputs(rng: random.Random, region: str) -> list[str]:
    """Example numbers of the region, mutated, plus random digit strings."""
    base: list[str] = []
    for kind in (
        phonenumbers.PhoneNumberType.FIXED_LINE,
        phonenumbers.PhoneNumberType.MOBILE,
        phonenumbers.PhoneNumberType.TOLL_FREE,
    ):
        example = phonenumbers.example_number_for_type(region, kind)
        if example is None:
            continue
        national = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
        base.append(phonenumbers.national_significant_number(example))
        base.append(re.sub(r"\D", "", national))
    out = list(base)
    for text in base:
        for _ in range(6):
            chars = list(text)
            for _ in range(rng.randint(1, 3)):
                chars[rng.randrange(len(chars))] = str(rng.randint(0, 9))
            mutated = "".join(chars)
            out += [mutated, mutated[:-1], mutated + str(rng.randint(0, 9)), "0" + mutated]
    out += ["".join(rng.choices("0123456789", k=rng.randint(3, 15))) for _ in range(10)]
    return [s for s in out if len(s) >= 3]


def _reference_e164(text: str, region: str | None) -> str | None:
    """phonenumbers itself, plus our documented extra rules."""
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    reason = phonenumbers.is_possible_number_with_reason(number)
    if reason != phonenumbers.ValidationResult.IS_POSSIBLE:
        return None  # includes IS_POSSIBLE_LOCAL_ONLY
    nsn = phonenumbers.national_significant_number(number)
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if not 7 <= len(e164) - 1 <= 15 or nsn == nsn[0] * len(nsn):
        return None
    return e164


def test_phone_fast_path_matches_phonenumbers_in_every_region() -> None:
    """The fast path must agree with parse + is_possible_number for all numbering plans."""
    rng = random.Random(20240601)
    checked = 0
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        cc = str(phonenumbers.country_code_for_region(region))
        for text in _random_national_inputs(rng, region):
            if text.startswith("00") and text[2] != "0":
                # '00' always means international to us, whatever the region's exit code.
                expected = _reference_e164("+" + text[2:], None)
            else:
                expected = _reference_e164(text, region)
            assert normalize_phone_e164(text, region) == expected, (text, region)
            with_cc = cc + text
            assert normalize_phone_e164(with_cc, region) == _reference_e164(with_cc, region), (
                with_cc,
                region,
            )
            plus = "+" + cc + text
            assert normalize_phone_e164(plus, None) == _reference_e164(plus, None), plus
            checked += 3
    assert checked > 10_000


# --------------------------------------------------------------------------------------------
# Names, address parts, country
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Valéry", "valéry"),
        (unicodedata.normalize("NFD", "Valéry"), "valéry"),
        ("  JOHN ", "john"),
        ("O'Brien", "obrien"),
        ("Jean-Luc", "jeanluc"),
        ("Mary  Ann", "mary ann"),
        ("Dr. Smith, Jr.", "dr smith jr"),
        ("Zoë", "zoë"),
        ("Иван", "иван"),
        ("दीपक", "दीपक"),  # Devanagari vowel signs are marks, and are kept
        ("李", "李"),
        ("Søren!", "søren"),
        ("---", None),
        ("", None),
        ("  ", None),
        (None, None),
        (True, None),
    ],
)
def test_normalize_name(raw: object, expected: str | None) -> None:
    assert normalize_name(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Menlo Park", "menlopark"),
        ("St. Louis", "stlouis"),
        ("Winston-Salem", "winstonsalem"),
        ("Paris (Centre) 8", "pariscentre"),
        ("São Paulo", "sãopaulo"),
        ("O'Fallon", "ofallon"),
        ("12345", None),
        ("", None),
    ],
)
def test_normalize_city(raw: str, expected: str | None) -> None:
    assert normalize_city(raw) == expected


@pytest.mark.parametrize(
    ("raw", "country", "expected"),
    [
        ("California", "US", "ca"),
        ("california", None, "ca"),
        ("New York", "United States", "ny"),
        ("District of Columbia", "us", "dc"),
        ("CA", "US", "ca"),
        (" tx ", None, "tx"),
        ("Bayern", "DE", "bayern"),
        ("Georgia", "GE", "georgia"),  # the country, not the US state
        ("Île-de-France", "FR", "îledefrance"),
        ("", "US", None),
    ],
)
def test_normalize_state(raw: str, country: str | None, expected: str | None) -> None:
    assert normalize_state(raw, country) == expected


@pytest.mark.parametrize(
    ("raw", "country", "expected"),
    [
        ("94035-1234", "US", "94035"),
        ("94035-1234", None, "94035"),
        ("940351234", "US", "94035"),
        (2134, "US", "02134"),
        (94035.0, "US", "94035"),
        ("2134", "USA", "02134"),
        ("SW1A 1AA", "GB", "sw1a1aa"),
        ("H2X 1Y4", "CA", "h2x1y4"),
        ("10115", "DE", "10115"),
        ("01310-100", "BR", "01310"),
        ("ABCDE", "US", None),
        ("12", "US", None),
        ("  ", None, None),
        ("-", None, None),
    ],
)
def test_normalize_zip(raw: object, country: str | None, expected: str | None) -> None:
    assert normalize_zip(raw, country) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("US", "us"),
        (" us ", "us"),
        ("U.S.", "us"),
        ("USA", "us"),
        ("United States", "us"),
        ("united states of america", "us"),
        ("DE", "de"),
        ("Deutschland", "de"),
        ("GBR", "gb"),
        ("UK", "gb"),
        ("Österreich", "at"),
        ("España", "es"),
        ("fr", "fr"),
        ("XX", None),
        ("ZZZ", None),
        ("Atlantis", None),
        ("1", None),
        ("", None),
        (None, None),
        (1, None),
    ],
)
def test_normalize_country(raw: object, expected: str | None) -> None:
    assert normalize_country(raw) == expected


# --------------------------------------------------------------------------------------------
# Date of birth, gender, external id
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1997-02-01", "19970201"),
        ("1997/02/01", "19970201"),
        ("19970201", "19970201"),
        ("02/01/1997", "19970201"),
        ("2/1/1997", "19970201"),
        ("1997-2-1", "19970201"),
        ("1997-02-01T00:00:00Z", "19970201"),
        ("1997-02-01 00:00:00+00:00", "19970201"),
        (" 1997-02-01 ", "19970201"),
        (date(1997, 2, 1), "19970201"),
        (datetime(1997, 2, 1, 13, 45), "19970201"),
        (19970201, "19970201"),
        ("1900-01-01", "19000101"),
        ("1899-12-31", None),
        ("1997-02-30", None),
        ("13/01/1997", None),
        ("01-02-97", None),
        ("yesterday", None),
        ("", None),
        (None, None),
        (True, None),
        (date.today() + timedelta(days=1), None),
        ("2999-01-01", None),
    ],
)
def test_normalize_date_of_birth(raw: object, expected: str | None) -> None:
    assert normalize_date_of_birth(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("f", "f"),
        ("F", "f"),
        (" Female ", "f"),
        ("WOMAN", "f"),
        ("m", "m"),
        ("Male", "m"),
        ("man", "m"),
        ("x", None),
        ("non-binary", None),
        ("", None),
        (None, None),
        (1, None),
    ],
)
def test_normalize_gender(raw: object, expected: str | None) -> None:
    assert normalize_gender(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" CRM-00042 ", "crm-00042"),
        (42, "42"),
        (42.0, "42"),
        (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
        ("", None),
        ("   ", None),
        (None, None),
        (False, None),
        ("x" * 1025, None),
    ],
)
def test_normalize_external_id(raw: object, expected: str | None) -> None:
    assert normalize_external_id(raw) == expected


def test_external_id_is_hashed_identically_on_meta_and_tiktok() -> None:
    row = {"external_id": " CRM-00042 "}
    expected = sha256_hex("crm-00042")
    assert hash_identifiers(row, META_RULES) == {"external_id": expected}
    assert hash_identifiers(row, TIKTOK_RULES) == {"external_id": expected}


# --------------------------------------------------------------------------------------------
# hash_identifiers
# --------------------------------------------------------------------------------------------


def test_already_hashed_values_pass_through_lowercased() -> None:
    row = {
        "email": f"  {JOHN_SMITH_SHA256.upper()} ",
        "phone": PHONE_DIGITS_SHA256.upper(),
        "external_id": JOHN_SMITH_SHA256,
        "first_name": JOHN_SMITH_SHA256.upper(),
    }
    out = hash_identifiers(row, META_RULES)
    assert out == {
        "em": JOHN_SMITH_SHA256,
        "ph": PHONE_DIGITS_SHA256,
        "fn": JOHN_SMITH_SHA256,
        "external_id": JOHN_SMITH_SHA256,
    }
    # Twice: the memoised path gives the same answer.
    assert hash_identifiers(row, META_RULES) == out


def test_md5_looking_values_are_hashed_not_passed_through() -> None:
    raw_id = "0123456789abcdef0123456789abcdef"  # also a UUID without hyphens
    assert hash_identifiers({"external_id": raw_id}, META_RULES) == {
        "external_id": sha256_hex(raw_id)
    }


def test_hash_identifiers_as_lists() -> None:
    row = {"email": "John_Smith@gmail.com ", "phone": "n/a", "first_name": "John"}
    expected = {"em": [JOHN_SMITH_SHA256], "fn": [sha256_hex("john")]}
    assert hash_identifiers_as_lists(row, META_RULES) == expected
    assert hash_identifiers_as_lists(row, META_RULES) == expected  # memoised path
    assert hash_identifiers(row, META_RULES) == {k: v[0] for k, v in expected.items()}


def test_missing_empty_and_unusable_values_are_omitted() -> None:
    row: dict[str, Any] = {
        "email": "not-an-email",
        "phone": "n/a",
        "first_name": "",
        "last_name": "   ",
        "city": None,
        "country": "Atlantis",
        "gender": "x",
        "date_of_birth": "0000-00-00",
    }
    assert hash_identifiers(row, META_RULES) == {}
    assert hash_identifiers({}, META_RULES) == {}
    assert hash_identifiers({"lead_id": "1"}, GOOGLE_RULES) == {}


def test_rule_keys() -> None:
    assert META_RULES.keys == (
        "em",
        "ph",
        "fn",
        "ln",
        "ct",
        "st",
        "zp",
        "country",
        "db",
        "ge",
        "external_id",
    )
    assert [rule.column for rule in META_RULES.rules] == list(META_COLUMNS)
    assert all(rule.hashed for rule in META_RULES.rules)
    assert TIKTOK_RULES.keys == ("email", "phone", "external_id")
    assert GOOGLE_RULES.keys == ("hashed_email", "hashed_phone_number")


def test_tiktok_and_google_rules() -> None:
    row = {
        "email": " Jane.Doe+promo@GoogleMail.com ",
        "phone": "+44 7911 123456",
        "external_id": "ID-1",
        "first_name": "Jane",
    }
    assert hash_identifiers(row, TIKTOK_RULES) == {
        "email": sha256_hex("jane.doe+promo@googlemail.com"),
        "phone": sha256_hex("+447911123456"),
        "external_id": sha256_hex("id-1"),
    }
    assert hash_identifiers(row, GOOGLE_RULES) == {
        "hashed_email": sha256_hex("janedoe@googlemail.com"),
        "hashed_phone_number": sha256_hex("+447911123456"),
    }
    other = {"email": "Jane.Doe+promo@example.com"}
    assert hash_identifiers(other, GOOGLE_RULES) == {
        "hashed_email": sha256_hex("jane.doe+promo@example.com")
    }


def test_memoised_state_depends_on_country() -> None:
    us = hash_identifiers({"state": "Georgia", "country": "US"}, META_RULES)
    ge = hash_identifiers({"state": "Georgia", "country": "GE"}, META_RULES)
    assert us["st"] == sha256_hex("ga")
    assert ge["st"] == sha256_hex("georgia")
    # An unhashable country value is not memoised, and does not break the row.
    out = hash_identifiers({"state": "Georgia", "country": ["US"]}, META_RULES)
    assert out == {"st": sha256_hex("ga")}


def test_memo_distinguishes_types_that_compare_equal() -> None:
    assert hash_identifiers({"first_name": 1}, META_RULES) == {"fn": sha256_hex("1")}
    assert hash_identifiers({"first_name": True}, META_RULES) == {}
    assert hash_identifiers({"first_name": 1.0}, META_RULES) == {"fn": sha256_hex("1")}
    assert hash_identifiers({"first_name": True}, META_RULES) == {}


def test_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "_MEMO_MAX", 10)
    for i in range(50):
        name = f"name{i}"
        assert hash_identifiers({"first_name": name}, META_RULES) == {"fn": sha256_hex(name)}
    memo = next(step[6] for step in META_RULES._steps if step[0] == "fn")
    assert memo is not None and len(memo) <= 10


def test_custom_rules() -> None:
    def full_name(row: Any) -> str | None:
        first, last = normalize_name(row.get("first_name")), normalize_name(row.get("last_name"))
        return f"{first} {last}" if first and last else None

    rules = Ruleset(
        "custom",
        (
            FieldRule("name", "first_name", full_name, hashed=True),
            value_rule("city", "city", normalize_city, hashed=False, memoize=True),
            country_rule("zip", "zip", normalize_zip, country_column="cc", hashed=False),
        ),
    )
    row = {"first_name": "Jane", "last_name": "Doe", "city": "São Paulo", "zip": 2134, "cc": "US"}
    expected = {"name": sha256_hex("jane doe"), "city": "sãopaulo", "zip": "02134"}
    assert hash_identifiers(row, rules) == expected
    assert hash_identifiers(row, rules) == expected
    # Unhashed rules never take a 64-hex value as already hashed: it is normalised as usual.
    letters = "".join(c for c in JOHN_SMITH_SHA256 if c.isalpha())
    assert hash_identifiers({"city": JOHN_SMITH_SHA256}, rules) == {"city": letters}
    assert rules.rules[0].normalize(row) == "jane doe"
    assert rules.rules[2].normalize(row) == "02134"
    assert "normalize_zip" in repr(rules.rules[2])


def test_memoize_needs_known_inputs() -> None:
    with pytest.raises(ValueError, match="memoize"):
        FieldRule("x", "x", lambda row: None, hashed=True, memoize=True)


def test_surrogates_and_huge_strings_are_dropped() -> None:
    row = {
        "email": "a\udcff@example.com",  # cannot be UTF-8 encoded: omitted
        "first_name": "Jo\ud800hn",  # names drop control and surrogate characters
        "last_name": "x" * 5000,
        "external_id": "y" * 1025,
    }
    assert hash_identifiers(row, META_RULES) == {"fn": sha256_hex("john")}


@pytest.mark.parametrize(
    "value",
    [b"\xff\xfe", bytearray(b"Jane"), memoryview(b"Jane"), Decimal("NaN"), Decimal("1.5"),
     10**100, -(10**40), float("inf"), object(), [1, 2], {"a": 1}, date(2020, 1, 1)],
)  # fmt: skip
def test_odd_types_never_raise(value: object) -> None:
    row = dict.fromkeys(META_COLUMNS, value)
    for rules in (META_RULES, TIKTOK_RULES, GOOGLE_RULES):
        out = hash_identifiers(row, rules)
        assert all(HEX64.fullmatch(v) for v in out.values())


def test_bytes_are_decoded() -> None:
    assert hash_identifiers({"first_name": b"Jane"}, META_RULES) == {"fn": sha256_hex("jane")}


# --------------------------------------------------------------------------------------------
# Cross-check with the official Meta SDK
# --------------------------------------------------------------------------------------------

SDK_CASES = [
    ("em", "email", "John_Smith@gmail.com "),
    ("em", "email", "  JANE.DOE+tag@Example.CO.UK"),
    ("em", "email", "ünïcode@bücher.de"),
    ("fn", "first_name", "John"),
    ("fn", "first_name", "  VALÉRY "),
    ("fn", "first_name", "Mary Ann"),
    ("ln", "last_name", "Smith"),
    ("ln", "last_name", "Müller"),
    ("ct", "city", "Menlo Park"),
    ("ct", "city", "St. Louis"),
    ("ct", "city", "Winston-Salem (NC) 2"),
    ("ct", "city", "São Paulo"),
    ("zp", "zip", "94035-1234"),
    ("zp", "zip", "SW1A 1AA"),
    ("zp", "zip", " 10115 "),
    ("country", "country", "US"),
    ("country", "country", " de "),
    ("country", "country", "U.S."),
    ("ge", "gender", "F"),
    ("ge", "gender", "m"),
    ("db", "date_of_birth", "19970201"),
    ("st", "state", "CA"),
    ("ph", "phone", "+1 (650) 555-1212"),
    ("ph", "phone", "+16505551212"),
    ("ph", "phone", "0044 20 7946 0958"),
    ("ph", "phone", "+49 30 12345678"),
    ("ph", "phone", "+33 6 12 34 56 78"),
    ("ph", "phone", "+55 11 98765-4321"),
    ("ph", "phone", "+91-98765-43210"),
    ("ph", "phone", "0016505551212"),
]


@pytest.mark.parametrize(("key", "column", "value"), SDK_CASES)
def test_matches_official_meta_sdk(key: str, column: str, value: str) -> None:
    normalize = pytest.importorskip("facebook_business.adobjects.serverside.normalize").Normalize
    expected = normalize.normalize_field(key, value)
    assert hash_identifiers({column: value}, META_RULES) == {key: expected}


def test_sdk_passes_prehashed_values_through_like_us() -> None:
    normalize = pytest.importorskip("facebook_business.adobjects.serverside.normalize").Normalize
    value = JOHN_SMITH_SHA256.upper()
    assert hash_identifiers({"email": value}, META_RULES) == {
        "em": normalize.normalize_field("em", value)
    }


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

ANY_VALUE = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.text(st.characters(exclude_categories=[]), max_size=20),  # with lone surrogates
    st.text(alphabet="+0123456789 ()-.x", max_size=25),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.binary(max_size=20),
    st.dates(),
    st.sampled_from(["US", "de", "United Kingdom", "FR", "br", "IN", "xx", "", " "]),
    st.just(JOHN_SMITH_SHA256.upper()),
)
ROW = st.fixed_dictionaries({}, optional=dict.fromkeys(META_COLUMNS, ANY_VALUE))
UNMEMOISED_META = Ruleset(
    "meta-unmemoised",
    tuple(FieldRule(r.key, r.column, r.normalize, r.hashed) for r in META_RULES.rules),
)


@settings(max_examples=400, deadline=None, database=None)
@given(row=ROW)
def test_hash_identifiers_never_raises_and_only_emits_hashes(row: dict[str, Any]) -> None:
    for rules in (META_RULES, TIKTOK_RULES, GOOGLE_RULES):
        out = hash_identifiers(row, rules)
        assert set(out) <= set(rules.keys)
        for value in out.values():
            assert HEX64.fullmatch(value), value
    # Memoised (twice: miss then hit) and unmemoised paths agree.
    first = hash_identifiers(row, META_RULES)
    assert hash_identifiers(row, META_RULES) == first
    assert hash_identifiers(row, UNMEMOISED_META) == first


@settings(max_examples=400, deadline=None, database=None)
@given(row=ROW)
def test_is_usable_agrees_with_hash_identifiers(row: dict[str, Any]) -> None:
    # The data contract counts an identifier as dropped by is_usable: it must be exactly the
    # key hash_identifiers leaves out, digests and lone surrogates included.
    for rules in (META_RULES, TIKTOK_RULES, GOOGLE_RULES):
        out = hash_identifiers(row, rules)
        for rule in rules.rules:
            verdict = is_usable(rule, row)
            assert (verdict is True) == (rule.key in out), (rule.key, row.get(rule.column))
            judge = usability_judge(rule)
            assert judge(row) is verdict and judge(row) is verdict  # memo miss, then hit
            raw = row.get(rule.column)
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                assert verdict is None


@settings(max_examples=200, deadline=None, database=None)
@given(rows=st.lists(ROW, min_size=1, max_size=12))
def test_column_verdicts_are_the_judges_verdicts(rows: list[dict[str, Any]]) -> None:
    # The contract judges a chunk column by column (usability_column): row by row, the same
    # verdicts, however values recur across rows (twice over: the dict of verdicts filled).
    rows = rows + rows[::-1]
    for rules in (META_RULES, TIKTOK_RULES, GOOGLE_RULES):
        for rule in rules.rules:
            column = usability_column(rule)
            expected = [is_usable(rule, row) for row in rows]
            assert column(rows) == expected, rule.key
            assert column(rows) == expected, rule.key


def test_column_verdicts_of_one_value_depend_on_the_rows_country() -> None:
    zip_rule = next(rule for rule in META_RULES.rules if rule.column == "zip")
    rows = [{"zip": "California", "country": "US"}, {"zip": "California", "country": "DE"},
            {"zip": "California", "country": "US"}, {"zip": "California", "country": None}]
    assert usability_column(zip_rule)(rows) == [False, True, False, True]


def test_an_upper_case_digest_is_usable_on_every_platform() -> None:
    row = {"email": JOHN_SMITH_SHA256.upper(), "phone": f" {PHONE_DIGITS_SHA256.upper()}\t"}
    for rules in (META_RULES, TIKTOK_RULES, GOOGLE_RULES):
        hashed = hash_identifiers(row, rules)
        assert sorted(hashed.values()) == sorted([JOHN_SMITH_SHA256, PHONE_DIGITS_SHA256])
        assert all(is_usable(rule, row) for rule in rules.rules if rule.column in row)


def _full_name(row: Any) -> str | None:
    first, last = normalize_name(row.get("first_name")), normalize_name(row.get("last_name"))
    return f"{first} {last}" if first and last else None


# Every kind of step the generator emits: row-level, unhashed, memoised with and without a
# country, and a country column of another name.
MIXED_RULES = Ruleset(
    "mixed",
    (
        FieldRule("name", "first_name", _full_name, hashed=True),
        value_rule("city", "city", normalize_city, hashed=False, memoize=True),
        country_rule("zip", "zip", normalize_zip, country_column="state", hashed=False,
                     memoize=True),
        country_rule("phone", "phone", normalize_phone_e164, country_column="state"),
        value_rule("email", "email", normalize_email, hashed=False),
    ),
)


@settings(max_examples=300, deadline=None, database=None)
@given(row=ROW)
def test_generated_rules_match_the_reference_loop(row: dict[str, Any]) -> None:
    # hash_identifiers runs code generated per ruleset (identity._compile_rules); the plain
    # loop of identity._apply_rules is what it must equal, memo miss and memo hit alike.
    for rules in (META_RULES, TIKTOK_RULES, GOOGLE_RULES, MIXED_RULES, UNMEMOISED_META):
        rules.clear_memo()
        expected = identity._apply_rules(row, rules._steps, False)
        rules.clear_memo()
        for _ in range(2):
            assert hash_identifiers(row, rules) == expected
            assert list(hash_identifiers(row, rules)) == list(expected)
            assert hash_identifiers_as_lists(row, rules) == {k: [v] for k, v in expected.items()}
        assert identity._apply_rules(row, rules._steps, True) == {
            k: [v] for k, v in expected.items()}


def test_generated_rules_name_their_ruleset_in_tracebacks() -> None:
    code = META_RULES._apply.__code__
    assert code.co_filename == "<leadsync.identity rules 'meta'>"
    assert hash_identifiers({}, META_RULES) == {}


@settings(max_examples=300, deadline=None, database=None)
@given(
    value=st.one_of(st.text(max_size=30), st.integers(), st.floats(), st.none()),
    country=st.one_of(st.none(), st.sampled_from(sorted(phonenumbers.SUPPORTED_REGIONS))),
)
def test_phone_results_are_e164(value: object, country: str | None) -> None:
    e164 = normalize_phone_e164(value, country)
    if e164 is not None:
        assert re.fullmatch(r"\+[1-9][0-9]{6,14}", e164), e164
        assert phonenumbers.is_possible_number(phonenumbers.parse(e164, None))
        assert normalize_phone_e164(e164, None) == e164  # idempotent


def _general_phone(value: object, country: object) -> tuple[str, str] | None:
    return identity._phone_parts(value, country)


_PLUS_TEXT = st.builds(
    lambda sep, cc, rest, tail: f"+{cc}{sep}{rest}{tail}",
    st.sampled_from(["", " ", "-", "(", ") ", ".", "/", " - "]),
    st.sampled_from(["1", "7", "33", "44", "49", "52", "54", "55", "61", "81", "86", "91",
                     "211", "351", "358", "380", "420", "683", "852", "882", "979", "999"]),
    st.text(alphabet="0123456789 -().", max_size=18),
    st.sampled_from(["", " ", " x12", "\u2010", "٣"]),
)


@settings(max_examples=2000, deadline=None, database=None)
@given(value=st.one_of(_PLUS_TEXT, st.text(max_size=25)),
       country=st.sampled_from([None, "US", "DE", "gb", "Brasil", 1]))
def test_the_international_fast_path_equals_the_general_one(value: str, country: object) -> None:
    # normalize_phone_* take a shortcut for "+<digits>"; _phone_parts is the general path.
    parts = _general_phone(value, country)
    assert normalize_phone_digits(value, country) == (None if parts is None else
                                                      parts[0] + parts[1])
    assert normalize_phone_e164(value, country) == (None if parts is None else
                                                    f"+{parts[0]}{parts[1]}")


def test_the_international_fast_path_covers_every_calling_code() -> None:
    rng = random.Random(5)
    for cc in sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE):
        for _ in range(40):
            value = f"+{cc} " + "".join(rng.choice("0123456789") for _ in range(rng.randrange(
                1, 14)))
            parts = _general_phone(value, None)
            assert normalize_phone_digits(value) == (None if parts is None else
                                                     parts[0] + parts[1]), value

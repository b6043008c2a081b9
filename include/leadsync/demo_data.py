"""A synthetic CRM funnel in a warehouse table, for the demo, the tests and the benchmarks.

The table ``crm_lead_stages`` holds one row per (lead, stage) in the shape of the source contract
(see ``include/sql/converted_leads.sql``). The data is deliberately messy the way real CRM exports
are: mixed-case emails with stray spaces, national phone formats, accented names, local postcodes,
countries in lower case, missing values and a little junk, so that normalisation, the data
contract and eligibility all have something to do.

All people are invented: names come from short lists of common given names and surnames, emails
use reserved or generic domains, phone numbers use the fictional ranges where a country has one
(US 555-01xx, UK drama numbers, ...), IP addresses come from the documentation ranges
(RFC 5737 / RFC 3849). Nothing here is anyone's real data.

Only SQLAlchemy Core is used, so the same code seeds SQLite (the embedded demo warehouse) and
PostgreSQL (bulk loaded with ``COPY`` through psycopg2).
"""

from __future__ import annotations

import base64
import bisect
import csv
import hashlib
import io
import random
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import accumulate, chain, islice
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    MetaData,
    Numeric,
    String,
    Table,
    case,
    false,
    func,
    select,
)

__all__ = [
    "BROKEN_EMAIL",
    "HASHED_EMAIL",
    "STAGES",
    "TABLE_NAME",
    "add_changes",
    "create_schema",
    "generate_broken_rows",
    "generate_funnel",
    "generate_rows_fast",
    "lead_stages_table",
    "seed",
]

TABLE_NAME = "crm_lead_stages"

#: Funnel stages in order; a lead reaches each one only after the previous one.
STAGES: tuple[str, ...] = ("lead", "qualified", "sales_accepted", "won")

# Probability of reaching stage k+1 given stage k (lead→qualified, qualified→SA, SA→won).
_ADVANCE_P: tuple[float, ...] = (0.45, 0.50, 0.40)

_SEC = 1_000
_MIN = 60 * _SEC
_HOUR = 60 * _MIN
_DAY = 24 * _HOUR

# Seeded rows are at least this old (by updated_at), so that a pipeline settle lag of up to ten
# minutes never hides them.
_SETTLE_MARGIN_MS = 10 * _MIN
# Delay from reaching stage k-1 to reaching stage k (min, max), skewed towards the minimum.
_STAGE_DELAY_MS: tuple[tuple[int, int], ...] = (
    (0, 0),
    (10 * _MIN, 2 * _DAY),
    (1 * _HOUR, 3 * _DAY),
    (2 * _HOUR, 5 * _DAY),
)
# Rows per executemany statement (SQLite and other non-COPY paths), rows per CSV chunk fed to
# COPY, and characters per read of that stream.
_INSERT_BATCH = 5_000
_COPY_CHUNK = 2_000
_COPY_READ_SIZE = 1 << 20
# NULL marker for COPY ... CSV: distinguishes NULL from an empty string, which csv.writer cannot.
_COPY_NULL = r"\N"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Row = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


def lead_stages_table(metadata: MetaData) -> Table:
    """Define the ``crm_lead_stages`` table on ``metadata``.

    Args:
        metadata: The MetaData to attach the table to.

    Returns:
        The table: primary key (lead_id, stage), and an index on the incremental cursor
        (updated_at, lead_id, stage) that keyset pagination walks.
    """
    return Table(
        TABLE_NAME,
        metadata,
        Column("lead_id", String(64), primary_key=True),
        Column("stage", String(32), primary_key=True),
        Column("event_time", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("event_id", String, nullable=True),
        Column("email", String, nullable=True),
        Column("phone", String, nullable=True),
        Column("first_name", String, nullable=True),
        Column("last_name", String, nullable=True),
        Column("city", String, nullable=True),
        Column("state", String, nullable=True),
        Column("zip", String, nullable=True),
        Column("country", String, nullable=True),
        Column("date_of_birth", String, nullable=True),
        Column("gender", String, nullable=True),
        Column("external_id", String, nullable=True),
        Column("fbc", String, nullable=True),
        Column("fbp", String, nullable=True),
        Column("ttclid", String, nullable=True),
        Column("ttp", String, nullable=True),
        Column("gclid", String, nullable=True),
        Column("gbraid", String, nullable=True),
        Column("wbraid", String, nullable=True),
        Column("client_ip", String, nullable=True),
        Column("user_agent", String, nullable=True),
        Column("event_source_url", String, nullable=True),
        Column("meta_lead_id", String, nullable=True),
        Column("tiktok_lead_id", String, nullable=True),
        Column("value", Numeric(12, 2), nullable=True),
        Column("currency", String(3), nullable=True),
        Column("ad_user_data", Boolean, nullable=True),
        Column("ad_personalization", Boolean, nullable=True),
        Column("opted_out", Boolean, nullable=False, default=False, server_default=false()),
        Column("limited_data_use", Boolean, nullable=True),
        Index(f"ix_{TABLE_NAME}_cursor", "updated_at", "lead_id", "stage"),
    )


def create_schema(engine: Engine) -> None:
    """Create the ``crm_lead_stages`` table and its index if they do not exist (idempotent).

    Args:
        engine: The warehouse engine.
    """
    metadata = MetaData()
    lead_stages_table(metadata)
    metadata.create_all(engine, checkfirst=True)


def _table() -> Table:
    return lead_stages_table(MetaData())


# --------------------------------------------------------------------------------------------
# Reference data (all invented or generic)
# --------------------------------------------------------------------------------------------

PhoneFormat = Callable[[random.Random], str]


def _d(rng: random.Random, k: int) -> str:
    """Return k random decimal digits (leading zeros kept)."""
    return f"{rng.randrange(10**k):0{k}d}"


@dataclass(frozen=True)
class _Country:
    code: str
    weight: int
    currency: str
    female: tuple[str, ...]
    male: tuple[str, ...]
    last: tuple[str, ...]
    # (city, state abbreviation or None, state full name or None, postcode)
    places: tuple[tuple[str, str | None, str | None, str], ...]
    phones: tuple[PhoneFormat, ...]


_US_AREAS = ("650", "415", "212", "312", "512", "206", "305", "303", "617", "404")
_CA_AREAS = ("416", "604", "514", "403", "613")


def _nanp_formats(areas: Sequence[str]) -> tuple[PhoneFormat, ...]:
    # 555-0100..555-0199 is the North American range reserved for fiction.
    return (
        lambda r: f"({r.choice(areas)}) 555-01{_d(r, 2)}",
        lambda r: f"{r.choice(areas)}-555-01{_d(r, 2)}",
        lambda r: f"{r.choice(areas)}.555.01{_d(r, 2)}",
        lambda r: f"+1 {r.choice(areas)} 555 01{_d(r, 2)}",
        lambda r: f"1-{r.choice(areas)}-555-01{_d(r, 2)}",
        lambda r: f"{r.choice(areas)}55501{_d(r, 2)}",
        lambda r: f"+1{r.choice(areas)}55501{_d(r, 2)}",
    )


# fmt: off
_COUNTRIES: tuple[_Country, ...] = (
    _Country(
        "US", 40, "USD",
        ("Emily", "Olivia", "Sophia", "Madison", "Ava", "Chloé", "María", "Grace"),
        ("James", "Michael", "Liam", "Noah", "Ethan", "José", "Tyler", "Daniel"),
        ("Smith", "Johnson", "Williams", "Brown", "Garcia", "Miller", "Davis", "Rodríguez",
         "Martínez", "O'Brien", "Nguyen", "Kim", "Van Buren"),
        (("San Francisco", "CA", "California", "94103"),
         ("Los Angeles", "CA", "California", "90012"),
         ("San Diego", "CA", "California", "92101"),
         ("New York", "NY", "New York", "10001"),
         ("Brooklyn", "NY", "New York", "11201"),
         ("Austin", "TX", "Texas", "78701"),
         ("Houston", "TX", "Texas", "77002"),
         ("Chicago", "IL", "Illinois", "60601"),
         ("Seattle", "WA", "Washington", "98101"),
         ("Miami", "FL", "Florida", "33131"),
         ("Denver", "CO", "Colorado", "80202"),
         ("Boston", "MA", "Massachusetts", "02108"),
         ("Newark", "NJ", "New Jersey", "07102"),
         ("Atlanta", "GA", "Georgia", "30303")),
        _nanp_formats(_US_AREAS),
    ),
    _Country(
        "GB", 12, "GBP",
        ("Olivia", "Amelia", "Isla", "Siobhan", "Chloe", "Niamh"),
        ("Oliver", "Harry", "George", "Jack", "Alfie", "Rhys"),
        ("Taylor", "Jones", "Evans", "Wilson", "Thomas", "Roberts", "O'Connor", "Smith-Jones"),
        (("London", None, "England", "SW1A 1AA"),
         ("London", None, "England", "EC1A 1BB"),
         ("Manchester", None, "Greater Manchester", "M1 1AE"),
         ("Birmingham", None, "West Midlands", "B33 8TH"),
         ("Croydon", None, "Surrey", "CR2 6XH"),
         ("Edinburgh", None, "Scotland", "EH1 1YZ"),
         ("Cardiff", None, "Wales", "CF10 1EP")),
        # Ofcom's drama ranges: 020 7946 0000-0999 and 07700 900000-900999.
        (lambda r: f"020 7946 0{_d(r, 3)}",
         lambda r: f"+44 20 7946 0{_d(r, 3)}",
         lambda r: f"+44 (0)20 7946 0{_d(r, 3)}",
         lambda r: f"0044 20 7946 0{_d(r, 3)}",
         lambda r: f"07700 900{_d(r, 3)}",
         lambda r: f"+447700900{_d(r, 3)}",
         lambda r: f"0044 7700 900 {_d(r, 3)}"),
    ),
    _Country(
        "DE", 10, "EUR",
        ("Sophie", "Marie", "Lena", "Anna", "Hannah", "Jülide"),
        ("Lukas", "Jürgen", "Maximilian", "Björn", "Felix", "Jörg"),
        ("Müller", "Schmidt", "Schneider", "Fischer", "Weiß", "Meyer", "Köhler", "Groß"),
        (("Berlin", "BE", "Berlin", "10115"),
         ("München", "BY", "Bayern", "80331"),
         ("Hamburg", "HH", "Hamburg", "20095"),
         ("Köln", "NW", "Nordrhein-Westfalen", "50667"),
         ("Frankfurt am Main", "HE", "Hessen", "60311")),
        # Bundesnetzagentur's drama numbers start 030 23125.
        (lambda r: f"030 23125{_d(r, 3)}",
         lambda r: f"+49 30 23125{_d(r, 3)}",
         lambda r: f"0049 30 23125 {_d(r, 3)}",
         lambda r: f"(030) 23125-{_d(r, 3)}",
         lambda r: f"0176 {_d(r, 8)}",
         lambda r: f"+49 176 {_d(r, 8)}"),
    ),
    _Country(
        "FR", 8, "EUR",
        ("Léa", "Chloé", "Manon", "Camille", "Zoé", "Hélène"),
        ("François", "Jérôme", "Hugo", "Théo", "Noël", "Loïc"),
        ("Martin", "Bernard", "Dubois", "Lefèvre", "Moreau", "Girard", "Lemaître", "Fournier"),
        (("Paris", "IDF", "Île-de-France", "75001"),
         ("Paris", "IDF", "Île-de-France", "75011"),
         ("Lyon", "ARA", "Auvergne-Rhône-Alpes", "69002"),
         ("Marseille", "PAC", "Provence-Alpes-Côte d'Azur", "13001"),
         ("Toulouse", "OCC", "Occitanie", "31000")),
        # ARCEP reserves 01 99 00 xx xx and 06 39 98 xx xx for fiction.
        (lambda r: f"01 99 00 {_d(r, 2)} {_d(r, 2)}",
         lambda r: f"+33 1 99 00 {_d(r, 2)} {_d(r, 2)}",
         lambda r: f"0033 1 99 00 {_d(r, 4)}",
         lambda r: f"06 39 98 {_d(r, 2)} {_d(r, 2)}",
         lambda r: f"06.39.98.{_d(r, 2)}.{_d(r, 2)}",
         lambda r: f"+33639 98{_d(r, 4)}"),
    ),
    _Country(
        "BR", 8, "BRL",
        ("Maria", "Ana", "Júlia", "Beatriz", "Letícia", "Conceição"),
        ("João", "José", "Lucas", "Gabriel", "Sérgio", "Antônio"),
        ("Silva", "Santos", "Oliveira", "Souza", "Gonçalves", "Araújo", "Magalhães"),
        (("São Paulo", "SP", "São Paulo", "01310-100"),
         ("Rio de Janeiro", "RJ", "Rio de Janeiro", "20040-020"),
         ("Belo Horizonte", "MG", "Minas Gerais", "30130-000"),
         ("Curitiba", "PR", "Paraná", "80010-000")),
        (lambda r: f"(11) 9{_d(r, 4)}-{_d(r, 4)}",
         lambda r: f"+55 11 9{_d(r, 4)}-{_d(r, 4)}",
         lambda r: f"11 3{_d(r, 3)}-{_d(r, 4)}",
         lambda r: f"+55 (21) 9{_d(r, 8)}",
         lambda r: f"021 9{_d(r, 4)} {_d(r, 4)}"),
    ),
    _Country(
        "IN", 8, "INR",
        ("Priya", "Ananya", "Aditi", "Kavya", "Sneha"),
        ("Arjun", "Rahul", "Vikram", "Rohan", "Aarav"),
        ("Sharma", "Patel", "Singh", "Iyer", "Reddy", "Gupta", "Nair"),
        (("Mumbai", "MH", "Maharashtra", "400001"),
         ("Bengaluru", "KA", "Karnataka", "560001"),
         ("New Delhi", "DL", "Delhi", "110001"),
         ("Chennai", "TN", "Tamil Nadu", "600001"),
         ("Hyderabad", "TG", "Telangana", "500001")),
        (lambda r: f"+91 98{_d(r, 3)} {_d(r, 5)}",
         lambda r: f"098{_d(r, 3)} {_d(r, 5)}",
         lambda r: f"98{_d(r, 8)}",
         lambda r: f"022 {_d(r, 4)} {_d(r, 4)}",
         lambda r: f"+91-22-{_d(r, 8)}"),
    ),
    _Country(
        "CA", 8, "CAD",
        ("Émilie", "Olivia", "Charlotte", "Geneviève", "Amélie"),
        ("Liam", "William", "Étienne", "Benjamin", "Mathieu"),
        ("Tremblay", "Gagnon", "Roy", "Côté", "Smith", "Wilson", "MacDonald"),
        (("Toronto", "ON", "Ontario", "M5V 3L9"),
         ("Vancouver", "BC", "British Columbia", "V6B 1A1"),
         ("Montréal", "QC", "Québec", "H3B 2Y5"),
         ("Calgary", "AB", "Alberta", "T2P 1J9"),
         ("Ottawa", "ON", "Ontario", "K1P 1J1")),
        _nanp_formats(_CA_AREAS),
    ),
    _Country(
        "AU", 6, "AUD",
        ("Charlotte", "Mia", "Isla", "Matilda", "Zoë"),
        ("Oliver", "Jack", "Noah", "Lachlan", "Cooper"),
        ("Smith", "Jones", "Williams", "Brown", "Nguyen", "Kelly", "O'Neill"),
        (("Sydney", "NSW", "New South Wales", "2000"),
         ("Melbourne", "VIC", "Victoria", "3000"),
         ("Brisbane", "QLD", "Queensland", "4000"),
         ("Perth", "WA", "Western Australia", "6000"),
         ("Adelaide", "SA", "South Australia", "5000")),
        # ACMA's fiction ranges: 0491 570 xxx (mobile) and (02) 5550 xxxx.
        (lambda r: f"0491 570 {_d(r, 3)}",
         lambda r: f"+61 491 570 {_d(r, 3)}",
         lambda r: f"(02) 5550 {_d(r, 4)}",
         lambda r: f"+61 2 5550 {_d(r, 4)}",
         lambda r: f"02 5550{_d(r, 4)}"),
    ),
)
# fmt: on

# Cumulative weights, for weighted choices with one random draw and a bisect.
_COUNTRY_CUM: list[int] = list(accumulate(country.weight for country in _COUNTRIES))
_COUNTRY_TOTAL = _COUNTRY_CUM[-1]

_JUNK_PHONES = ("n/a", "000", "N/A", "-", "0", "none", "123")

# Reserved example domains plus consumer-mail style ones (for gmail-specific normalisation).
_EMAIL_DOMAINS: tuple[tuple[str, int], ...] = (
    ("example.com", 35),
    ("example.org", 20),
    ("example.net", 15),
    ("mail.example.com", 6),
    ("gmail.com", 20),
    ("googlemail.com", 4),
)
_DOMAIN_CUM: list[int] = list(accumulate(weight for _, weight in _EMAIL_DOMAINS))

_USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148 [FBAN/FBIOS;FBAV/460.0.0.0;FBBV/580000000]",
)
_LANDING_PATHS = ("quiz", "get-a-quote", "demo", "pricing/contact", "lp/spring-offer")
_UTM_SOURCES = ("facebook", "google", "tiktok", "newsletter", "partner")
# RFC 5737 documentation networks.
_IPV4_NETS = ("192.0.2", "198.51.100", "203.0.113")


def _ascii_slug(name: str) -> str:
    decomposed = unicodedata.normalize("NFKD", name)
    return "".join(ch for ch in decomposed if ch.isascii() and ch.isalnum()).lower()


_ASCII: dict[str, str] = {
    name: _ascii_slug(name)
    for country in _COUNTRIES
    for name in (*country.female, *country.male, *country.last)
}


def _token(rng: random.Random, n_bytes: int) -> str:
    """Return a URL-safe random token (the shape of click ids and cookies)."""
    raw = rng.getrandbits(n_bytes * 8).to_bytes(n_bytes, "big")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


# --------------------------------------------------------------------------------------------
# Time helpers: the generator works in integer UTC milliseconds
# --------------------------------------------------------------------------------------------


def _utc(moment: datetime) -> datetime:
    """Return ``moment`` in UTC; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _to_ms(moment: datetime) -> int:
    return (_utc(moment) - _EPOCH) // timedelta(milliseconds=1)


def _from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


# --------------------------------------------------------------------------------------------
# One synthetic person / lead
# --------------------------------------------------------------------------------------------


def _messy_name(rng: random.Random, name: str) -> str | None:
    r = rng.random()
    if r < 0.03:
        return None
    if r < 0.08:
        return name.upper()
    if r < 0.13:
        return name.lower()
    if r < 0.17:
        return f" {name} "
    if r < 0.19:
        return f"{name}  "
    return name


def _email(rng: random.Random, first: str, last: str) -> str | None:
    if rng.random() < 0.10:
        return None
    f, l_ = _ASCII[first], _ASCII[last]
    pattern = rng.randrange(5)
    if pattern == 0:
        local = f"{f}.{l_}"
    elif pattern == 1:
        local = f"{f}{l_}{rng.randrange(1, 99)}"
    elif pattern == 2:
        local = f"{f[0]}{l_}"
    elif pattern == 3:
        local = f"{l_}.{f}{rng.randrange(60, 100)}"
    else:
        local = f"{f}_{l_}"
    domain = _EMAIL_DOMAINS[bisect.bisect_right(_DOMAIN_CUM, rng.randrange(_DOMAIN_CUM[-1]))][0]
    address = f"{local}@{domain}"
    r = rng.random()
    if r < 0.18:
        address = address.title()
    elif r < 0.23:
        address = address.upper()
    r = rng.random()
    if r < 0.05:
        address = f" {address} "
    elif r < 0.09:
        address = f"{address} "
    elif r < 0.10:
        address = f"\t{address}"
    return address


def _phone(rng: random.Random, country: _Country) -> str | None:
    r = rng.random()
    if r < 0.15:
        return None
    if r < 0.17:
        return rng.choice(_JUNK_PHONES)
    return rng.choice(country.phones)(rng)


def _place(rng: random.Random, country: _Country) -> tuple[str | None, str | None, str | None]:
    city, abbr, full, postcode = rng.choice(country.places)
    r = rng.random()
    city_out: str | None = city
    if r < 0.02:
        city_out = None
    elif r < 0.10:
        city_out = city.lower()
    elif r < 0.15:
        city_out = city.upper()
    elif r < 0.20:
        city_out = f"{city} "

    r = rng.random()
    state: str | None
    if r < 0.05:
        state = None
    elif r < 0.20:
        state = full
    elif r < 0.25:
        state = abbr.lower() if abbr else full
    else:
        state = abbr if abbr else (full if r < 0.6 else None)

    r = rng.random()
    zip_out: str | None = postcode
    if r < 0.03:
        zip_out = None
    elif country.code == "US":
        if r < 0.25:
            zip_out = f"{postcode}-{_d(rng, 4)}"
        elif r < 0.40 and postcode.startswith("0"):
            zip_out = postcode.lstrip("0")  # a spreadsheet ate the leading zero
    elif country.code in ("GB", "CA"):
        if r < 0.18:
            zip_out = postcode.lower()
        elif r < 0.30:
            zip_out = postcode.replace(" ", "")
    elif country.code == "BR" and r < 0.25:
        zip_out = postcode.replace("-", "")
    return city_out, state, zip_out


def _country_value(rng: random.Random, code: str) -> str:
    r = rng.random()
    if r < 0.08:
        return code.lower()
    if r < 0.11:
        return f" {code}"
    if r < 0.13:
        return f"{code} "
    if r < 0.14:
        return f" {code.lower()} "
    return code


def _gender(rng: random.Random, female: bool) -> str | None:
    r = rng.random()
    if r < 0.45:
        return None
    spellings = ("F", "female", "Female", "f") if female else ("M", "Male", "male", "m")
    return spellings[int((r - 0.45) / 0.55 * len(spellings)) % len(spellings)]


def _consent(rng: random.Random) -> tuple[bool | None, bool | None]:
    r = rng.random()
    if r < 0.85:
        return True, (False if rng.random() < 0.03 else True)
    if r < 0.95:
        return None, None
    return False, False


@dataclass
class _Lead:
    """Identifier columns shared by every stage row of one lead, plus its value currency."""

    columns: Row
    currency: str


def _new_lead(rng: random.Random, lead_id: str, created_ms: int) -> _Lead:
    """Invent one lead: who they are, how they arrived, what they consented to."""
    country = _COUNTRIES[bisect.bisect_right(_COUNTRY_CUM, rng.randrange(_COUNTRY_TOTAL))]
    female = rng.random() < 0.5
    first = rng.choice(country.female if female else country.male)
    last = rng.choice(country.last)
    city, state, zip_ = _place(rng, country)
    date_of_birth = None
    if rng.random() < 0.30:
        date_of_birth = (
            f"{rng.randrange(1950, 2006):04d}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
        )

    fbc = fbp = ttclid = ttp = gclid = gbraid = wbraid = None
    client_ip = user_agent = event_source_url = meta_lead_id = tiktok_lead_id = None
    channel = rng.random()
    if channel < 0.40:  # Meta lead ad (instant form): no browser, a Meta lead id
        meta_lead_id = f"1{rng.randrange(10**15):015d}"
    elif channel < 0.45:  # TikTok lead ad
        tiktok_lead_id = f"7{rng.randrange(10**18):018d}"
    elif channel < 0.95:  # the website: cookies, click ids, IP, user agent, landing page
        visit_ms = created_ms - rng.randrange(5 * _SEC, 3 * _DAY)
        first_visit_ms = visit_ms - rng.randrange(0, 30 * _DAY)
        r = rng.random()
        if r < 0.60:
            fbp = f"fb.1.{first_visit_ms}.{rng.randrange(10**9, 10**10)}"
            fbc = f"fb.1.{visit_ms}.IwAR{_token(rng, 33)}"
        elif r < 0.70:
            fbp = f"fb.1.{first_visit_ms}.{rng.randrange(10**9, 10**10)}"
        r = rng.random()
        if r < 0.50:
            gclid = f"Cj0KCQiA{_token(rng, 60)}"
        elif r < 0.55:
            gbraid = f"0AAAAA{_token(rng, 30)}"
        elif r < 0.60:
            wbraid = f"CjkKCQiA{_token(rng, 30)}"
        r = rng.random()
        if r < 0.40:
            ttclid = f"E.C.P.{_token(rng, 48)}"
            ttp = _token(rng, 20) if rng.random() < 0.9 else None
        elif r < 0.50:
            ttp = _token(rng, 20)
        if rng.random() < 0.95:
            if rng.random() < 0.75:
                client_ip = f"{rng.choice(_IPV4_NETS)}.{rng.randrange(1, 255)}"
            else:  # RFC 3849 documentation prefix
                client_ip = f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(1, 65536):x}"
            user_agent = rng.choice(_USER_AGENTS)
        event_source_url = (
            f"https://www.example.com/{rng.choice(_LANDING_PATHS)}"
            f"?utm_source={rng.choice(_UTM_SOURCES)}&utm_medium=paid"
        )
        if gclid is not None:
            event_source_url += f"&gclid={gclid}"
    # else: phone call or list import: identifiers only

    ad_user_data, ad_personalization = _consent(rng)
    limited_data_use = None
    if country.code == "US" and state is not None and state.upper() in ("CA", "CALIFORNIA"):
        limited_data_use = rng.random() < 0.25
    columns: Row = {
        "lead_id": lead_id,
        "email": _email(rng, first, last),
        "phone": _phone(rng, country),
        "first_name": _messy_name(rng, first),
        "last_name": _messy_name(rng, last),
        "city": city,
        "state": state,
        "zip": zip_,
        "country": _country_value(rng, country.code),
        "date_of_birth": date_of_birth,
        "gender": _gender(rng, female),
        "external_id": (
            f"{rng.randrange(10**8, 10**11)}" if rng.random() < 0.95 else None
        ),  # CRM contact id
        "fbc": fbc,
        "fbp": fbp,
        "ttclid": ttclid,
        "ttp": ttp,
        "gclid": gclid,
        "gbraid": gbraid,
        "wbraid": wbraid,
        "client_ip": client_ip,
        "user_agent": user_agent,
        "event_source_url": event_source_url,
        "meta_lead_id": meta_lead_id,
        "tiktok_lead_id": tiktok_lead_id,
        "ad_user_data": ad_user_data,
        "ad_personalization": ad_personalization,
        "opted_out": rng.random() < 0.01,
        "limited_data_use": limited_data_use,
    }
    return _Lead(columns, country.currency)


def _lead_id(rng: random.Random) -> str:
    # 64 random bits: a collision among a million leads has odds of about 3e-8.
    return f"00Q{rng.getrandbits(64):016X}"


def _money(cents: int) -> Decimal:
    return Decimal(cents).scaleb(-2)


def _stage_row(
    rng: random.Random,
    lead: _Lead,
    stage: str,
    event_ms: int,
    updated: datetime,
) -> Row:
    value: Decimal | None = None
    if stage == "won":
        value = _money(rng.randrange(500_00, 5_000_01))
    elif stage == "sales_accepted" and rng.random() < 0.30:
        value = _money(rng.randrange(1_000_00, 10_000_01, 50_00))  # forecast deal value
    event_id = None
    if stage == "lead" and rng.random() < 0.10:
        event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))  # set by the pixel
    return {
        **lead.columns,
        "stage": stage,
        "event_time": _from_ms(event_ms),
        "updated_at": updated,
        "event_id": event_id,
        "value": value,
        "currency": lead.currency if value is not None else None,
    }


def _update_delay_ms(rng: random.Random) -> int:
    # Mostly seconds, sometimes up to ~20 minutes (a CRM sync job that runs every few minutes).
    return 1 * _SEC + int(rng.random() ** 3 * 20 * _MIN)


# --------------------------------------------------------------------------------------------
# Public generators
# --------------------------------------------------------------------------------------------


def generate_funnel(n_leads: int, now: datetime, seed: int = 7) -> Iterator[Row]:
    """Generate the stage rows of ``n_leads`` synthetic leads, lead by lead.

    Each lead gets a 'lead' row; about 45 percent reach 'qualified', half of those
    'sales_accepted' and 40 percent of those 'won', so about 1.76 rows per lead. Leads were
    created over the last six days, except about 1 percent created 8-10 days ago whose events
    are all older than Meta's 7-day limit. ``event_time`` strictly increases along a lead's
    funnel and ``updated_at`` is ``event_time`` plus a delay of seconds to about 20 minutes,
    never later than ``now`` minus 10 minutes. All datetimes are timezone-aware UTC with
    millisecond precision.

    The output depends only on ``n_leads``, ``now`` and ``seed``; rows are produced lazily, so
    memory does not grow with ``n_leads``.

    Args:
        n_leads: Number of leads to invent.
        now: The reference time (naive values are taken as UTC).
        seed: Random seed.

    Yields:
        One dict per (lead_id, stage), keyed by the column names of ``crm_lead_stages``.
    """
    rng = random.Random(seed)
    now_ms = _to_ms(now)
    recent_cap_ms = now_ms - _SETTLE_MARGIN_MS
    old_cap_ms = now_ms - 7 * _DAY - 1 * _HOUR
    for _ in range(n_leads):
        if rng.random() < 0.01:
            created_ms = now_ms - rng.randrange(8 * _DAY, 10 * _DAY)
            cap_ms = old_cap_ms
        else:
            created_ms = now_ms - rng.randrange(30 * _MIN, 6 * _DAY)
            cap_ms = recent_cap_ms
        lead = _new_lead(rng, _lead_id(rng), created_ms)
        event_ms = created_ms
        for k, stage in enumerate(STAGES):
            if k > 0:
                if rng.random() >= _ADVANCE_P[k - 1]:
                    break
                low, high = _STAGE_DELAY_MS[k]
                delay = low + int((high - low) * rng.random() ** 2)
                if event_ms + delay >= cap_ms:
                    # Not enough time left before the cap: squeeze the stage in, which keeps the
                    # funnel proportions independent of when the lead was created.
                    delay = max(1, int((cap_ms - event_ms) * (0.2 + 0.6 * rng.random())))
                event_ms += delay
            updated_ms = min(event_ms + _update_delay_ms(rng), cap_ms)
            yield _stage_row(rng, lead, stage, event_ms, _from_ms(updated_ms))


def generate_rows_fast(n: int, now: datetime, seed: int = 1) -> Iterator[Row]:
    """Generate ``n`` contract rows quickly, for benchmarks.

    Every row is a distinct lead (so (lead_id, stage) is unique) at a stage drawn with funnel
    weights; identifiers are well-formed and mostly present, and ``updated_at`` spreads evenly
    over the six days before ``now`` minus 10 minutes, increasing with the row number.

    Args:
        n: Number of rows.
        now: The reference time (naive values are taken as UTC).
        seed: Random seed; also part of the lead ids, so different seeds do not collide.

    Yields:
        One dict per row, keyed by the column names of ``crm_lead_stages``.
    """
    rng = random.Random(seed)
    end_ms = _to_ms(now) - _SETTLE_MARGIN_MS
    span_ms = 6 * _DAY
    step = span_ms / max(n, 1)
    start_ms = end_ms - span_ms
    stages = ("lead",) * 10 + ("qualified",) * 5 + ("sales_accepted",) * 3 + ("won",) * 2
    firsts = ("Anna", "Ben", "Chloé", "David", "Eva", "Frank", "Grace", "Hugo")
    lasts = ("Smith", "Müller", "Dubois", "Silva", "Patel", "Nguyen", "O'Brien")
    genders = ("F", "M", None, "female", "male")
    for i in range(n):
        r = rng.random()
        stage = stages[int(r * len(stages))]
        updated_ms = start_ms + int(i * step)
        event_ms = updated_ms - int(r * 10 * _MIN) - _SEC
        web = i % 5 < 3
        value = _money(50_000 + i % 450_000) if stage == "won" else None
        yield {
            "lead_id": f"b{seed}-{i:010d}",
            "stage": stage,
            "event_time": _from_ms(event_ms),
            "updated_at": _from_ms(updated_ms),
            "event_id": None,
            "email": f"user{i}@example.com" if i % 10 else None,
            "phone": f"+1 650 555 {i % 10000:04d}" if i % 7 else None,
            "first_name": firsts[i % len(firsts)],
            "last_name": lasts[i % len(lasts)],
            "city": "San Francisco",
            "state": "CA",
            "zip": "94103",
            "country": "US",
            "date_of_birth": f"19{60 + i % 40}-0{1 + i % 9}-1{i % 10}" if i % 3 == 0 else None,
            "gender": genders[i % len(genders)],
            "external_id": f"c{seed}-{i}",
            "fbc": f"fb.1.{event_ms - _HOUR}.IwAR{i:x}{rng.getrandbits(64):x}" if web else None,
            "fbp": f"fb.1.{event_ms - _DAY}.{1_000_000_000 + i}" if web else None,
            "ttclid": f"E.C.P.{rng.getrandbits(128):x}" if i % 5 == 0 else None,
            "ttp": None,
            "gclid": f"Cj0KCQiA{rng.getrandbits(192):x}" if i % 4 == 0 else None,
            "gbraid": None,
            "wbraid": None,
            "client_ip": f"203.0.113.{i % 254 + 1}" if web else None,
            "user_agent": _USER_AGENTS[i % len(_USER_AGENTS)] if web else None,
            "event_source_url": "https://www.example.com/quiz" if web else None,
            "meta_lead_id": None if web else f"1{i:015d}",
            "tiktok_lead_id": None,
            "value": value,
            "currency": "USD" if value is not None else None,
            "ad_user_data": True,
            "ad_personalization": True,
            "opted_out": False,
            "limited_data_use": None,
        }


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _uses_copy(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg2"


class _CsvStream:
    """A file-like view of rows as CSV text, produced lazily for ``COPY ... FROM STDIN``.

    One COPY reads the whole stream, so PostgreSQL parses and indexes rows while Python is
    still generating the next ones; only one chunk of CSV text is held at a time.
    """

    def __init__(self, rows: Iterable[Row], names: Sequence[str]) -> None:
        self._rows = iter(rows)
        self._get = itemgetter(*names)
        self._buffer = io.StringIO()
        # str() of the values is what PostgreSQL expects: datetimes as "2025-06-01
        # 12:00:00.123000+00:00", booleans as True/False, Decimal as "1234.50".
        self._writer = csv.writer(self._buffer, lineterminator="\n")
        self._pending = ""
        self._position = 0
        self.rows_written = 0

    def _refill(self) -> bool:
        batch = list(islice(self._rows, _COPY_CHUNK))
        if not batch:
            return False
        get = self._get
        self._writer.writerows(
            [_COPY_NULL if value is None else value for value in get(row)] for row in batch
        )
        self.rows_written += len(batch)
        self._pending = self._buffer.getvalue()
        self._position = 0
        self._buffer.seek(0)
        self._buffer.truncate()
        return True

    def read(self, size: int = -1) -> str:
        """Return up to ``size`` characters of CSV (all the current chunk if negative)."""
        if self._position >= len(self._pending) and not self._refill():
            return ""
        end = len(self._pending) if size < 0 else self._position + size
        text = self._pending[self._position : end]
        self._position += len(text)
        return text


def _copy_rows(cursor: Any, table: Table, rows: Iterable[Row]) -> int:
    """Stream ``rows`` into ``table`` with a single ``COPY ... FROM STDIN`` (CSV)."""
    names = [column.name for column in table.columns]
    quoted = ", ".join(f'"{name}"' for name in names)
    options = f"FORMAT csv, NULL '{_COPY_NULL}'"
    statement = f'COPY "{table.name}" ({quoted}) FROM STDIN WITH ({options})'
    stream = _CsvStream(rows, names)
    cursor.copy_expert(statement, stream, size=_COPY_READ_SIZE)
    return stream.rows_written


def _insert_rows(connection: Connection, table: Table, rows: Iterable[Row]) -> int:
    """Insert ``rows`` with one executemany per batch of ``_INSERT_BATCH`` rows."""
    iterator = iter(rows)
    total = 0
    while True:
        batch = list(islice(iterator, _INSERT_BATCH))
        if not batch:
            return total
        connection.execute(table.insert(), batch)
        total += len(batch)


def _load(engine: Engine, rows: Iterable[Row], only_if_empty: bool) -> int:
    """Load ``rows`` in one transaction; with ``only_if_empty``, do nothing if rows exist."""
    table = _table()
    if _uses_copy(engine):
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            if only_if_empty:
                # Serialises concurrent seeders, so the table is seeded exactly once.
                cursor.execute(f'LOCK TABLE "{TABLE_NAME}" IN SHARE ROW EXCLUSIVE MODE')
                cursor.execute(f'SELECT 1 FROM "{TABLE_NAME}" LIMIT 1')
                if cursor.fetchone() is not None:
                    raw.rollback()
                    return 0
            total = _copy_rows(cursor, table, rows)
            raw.commit()
            return total
        except BaseException:
            raw.rollback()
            raise
        finally:
            raw.close()
    with engine.begin() as connection:
        if only_if_empty and connection.execute(select(1).select_from(table).limit(1)).first():
            return 0
        return _insert_rows(connection, table, rows)


def seed(
    engine: Engine, n_leads: int, now: datetime, seed: int = 7, broken_rows: bool = False
) -> int:
    """Create the table and fill it with ``generate_funnel(n_leads, now, seed)``, once.

    On PostgreSQL with psycopg2 the rows are streamed with ``COPY`` in chunks; elsewhere they
    are inserted with executemany in batches. Either way memory stays flat and everything is
    one transaction.

    Args:
        engine: The warehouse engine.
        n_leads: Number of leads to invent (each yields one to four rows).
        now: The reference time (naive values are taken as UTC).
        seed: Random seed.
        broken_rows: Also add :func:`generate_broken_rows` (the demo does), which the data
            contract quarantines.

    Returns:
        The number of rows inserted, or 0 if the table already had rows.
    """
    create_schema(engine)
    rows: Iterable[Row] = generate_funnel(n_leads, now, seed)
    if broken_rows:
        rows = chain(rows, generate_broken_rows(now))
    return _load(engine, rows, only_if_empty=True)


#: The mistyped email of two broken rows (no usable address: dropped, never hashed).
BROKEN_EMAIL = "anna.smith(at)example.com"
#: A digest as a warehouse of hashed emails stores it: SHA-256 of the normalised address,
#: upper-case hex (identity passes it on lower-cased, as the platforms' SDKs do).
HASHED_EMAIL = hashlib.sha256(b"hashed.lead@example.com").hexdigest().upper()


def generate_broken_rows(now: datetime) -> list[Row]:
    """A handful of rows that break or bend the data contract, the way real upstreams do.

    Quarantined, two of each: an event_time two days in the future (a timezone bug), a
    currency that is not ISO-4217 (``US$``, ``€``), no usable match key (a list import with
    only a CRM id, and one whose only key is a mistyped email), and one lead twice, the second
    time with a trailing space in its id (a re-import), which would count one conversion twice.

    Sent: a mistyped email next to a good phone (the email is dropped and counted, the phone
    matches), and an email column holding an upper-case SHA-256 digest (a warehouse that stores
    hashed emails; sent lower-cased). Deterministic for a given ``now``; lead ids start ``00QX``,
    which :func:`generate_funnel` never produces (its ids are hexadecimal).

    Args:
        now: The reference time (naive values are taken as UTC).

    Returns:
        Eleven rows keyed by the column names of ``crm_lead_stages``.
    """
    rng = random.Random(4242)
    now_ms = _to_ms(now)
    updated = _from_ms(now_ms - 12 * _MIN)
    event_ms = now_ms - 1 * _HOUR
    rows: list[Row] = []

    def lead(lead_id: str) -> _Lead:
        return _new_lead(rng, lead_id, event_ms - _DAY)

    for i in (1, 2):
        rows.append(_stage_row(rng, lead(f"00QXFUTURE{i:06d}"), "lead",
                               now_ms + 2 * _DAY + i * _MIN, updated))
    for i, currency in ((1, "US$"), (2, "€")):
        row = _stage_row(rng, lead(f"00QXCURRENCY{i:04d}"), "won", event_ms, updated)
        rows.append({**row, "value": _money(1_250_00 * i), "currency": currency})
    blank = {"email", "phone", "first_name", "last_name", "external_id", "fbc", "fbp", "ttclid",
             "ttp", "gclid", "gbraid", "wbraid", "client_ip", "user_agent", "event_source_url",
             "meta_lead_id", "tiktok_lead_id", "date_of_birth", "gender"}
    for i in (1, 2):
        row = _stage_row(rng, lead(f"00QXNOKEYS{i:06d}"), "lead", event_ms, updated)
        rows.append({k: (None if k in blank else v) for k, v in row.items()})
    row = _stage_row(rng, lead("00QXNOKEYS000003"), "lead", event_ms, updated)
    rows.append({**{k: (None if k in blank else v) for k, v in row.items()},
                 "email": BROKEN_EMAIL})
    row = _stage_row(rng, lead("00QXBADEMAIL0001"), "qualified", event_ms, updated)
    rows.append({**row, "email": BROKEN_EMAIL, "phone": "+1 (650) 555-0142", "country": "US"})
    row = _stage_row(rng, lead("00QXHASHEDEMAIL1"), "qualified", event_ms, updated)
    rows.append({**row, "email": HASHED_EMAIL})
    twin = _stage_row(rng, lead("00QXDUPLICATE0001"), "qualified", event_ms, updated)
    rows.append(twin)
    rows.append({**twin, "lead_id": twin["lead_id"] + " "})
    return rows


def add_changes(engine: Engine, n: int, now: datetime, seed: int | None = None) -> int:
    """Append ``n`` new stage changes, as a CRM would between two pipeline runs.

    Leads that have not reached 'won' (and whose last stage is older than five minutes) are
    advanced to their next stage, chosen at random; when fewer than ``n`` can advance, the rest
    are brand-new leads at stage 'lead'. New rows get an ``event_time`` within the five minutes
    before ``now`` and ``updated_at = now - 1 second``; the caller passes a ``now`` that is
    already behind the pipeline's settle lag.

    Args:
        engine: The warehouse engine.
        n: Number of rows to add.
        now: The reference time (naive values are taken as UTC).
        seed: Random seed, or None for a fresh one.

    Returns:
        ``n``, the number of rows inserted.
    """
    if n <= 0:
        return 0
    create_schema(engine)
    table = _table()
    rng = random.Random(seed)
    now_ms = _to_ms(now)
    window_start_ms = now_ms - 5 * _MIN
    newest_event_ms = now_ms - 2 * _SEC
    updated = _utc(now) - timedelta(seconds=1)

    rank = case({stage: k for k, stage in enumerate(STAGES)}, value=table.c.stage, else_=-1)
    candidates_query = (
        select(table.c.lead_id, func.max(rank), func.max(table.c.event_time))
        .group_by(table.c.lead_id)
        .having(func.max(rank).between(0, len(STAGES) - 2))
        .order_by(table.c.lead_id)
    )
    # Reservoir sample (deterministic for a seed): memory O(n) however large the table is.
    chosen: list[tuple[str, int]] = []
    seen = 0
    with engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=10_000).execute(
            candidates_query
        )
        for lead_id, top_rank, last_event in result:
            if _to_ms(last_event) >= window_start_ms:
                continue
            seen += 1
            if len(chosen) < n:
                chosen.append((lead_id, top_rank))
            else:
                slot = rng.randrange(seen)
                if slot < n:
                    chosen[slot] = (lead_id, top_rank)
        chosen.sort()

        rows: list[Row] = []
        for start in range(0, len(chosen), 1_000):
            part = dict(chosen[start : start + 1_000])
            latest = connection.execute(
                select(table).where(
                    table.c.lead_id.in_(list(part)),
                    table.c.stage.in_([STAGES[k] for k in set(part.values())]),
                )
            ).mappings()
            for existing in sorted(latest, key=lambda m: m["lead_id"]):
                top_rank = part[existing["lead_id"]]
                if existing["stage"] != STAGES[top_rank]:
                    continue
                lead = _Lead(
                    {key: existing[key] for key in existing if key not in _STAGE_COLUMNS},
                    existing["currency"] or _currency_for(existing["country"]),
                )
                event_ms = rng.randrange(window_start_ms, newest_event_ms)
                rows.append(_stage_row(rng, lead, STAGES[top_rank + 1], event_ms, updated))

        missing = n - len(rows)
        new_ids: list[str] = []
        while len(new_ids) < missing:
            wanted = {_lead_id(rng) for _ in range(missing - len(new_ids))} - set(new_ids)
            taken = set(
                connection.scalars(
                    select(table.c.lead_id).where(table.c.lead_id.in_(sorted(wanted)))
                )
            )
            new_ids.extend(sorted(wanted - taken))
    for lead_id in new_ids:
        event_ms = rng.randrange(window_start_ms, newest_event_ms)
        lead = _new_lead(rng, lead_id, event_ms)
        rows.append(_stage_row(rng, lead, "lead", event_ms, updated))

    _load(engine, rows, only_if_empty=False)
    return len(rows)


_STAGE_COLUMNS = frozenset({"stage", "event_time", "updated_at", "event_id", "value", "currency"})
_CURRENCY_BY_COUNTRY = {country.code: country.currency for country in _COUNTRIES}


def _currency_for(country: str | None) -> str:
    return _CURRENCY_BY_COUNTRY.get((country or "").strip().upper(), "USD")

"""Typed configuration, validated once from ``include/leadsync.yaml``.

Secrets never live here: credentials come from Airflow connections. An invalid file fails
with :class:`ConfigError`, whose message names the key and the problem.
"""

from __future__ import annotations

import math
import os
import re
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

INCLUDE_DIR = Path(__file__).resolve().parent.parent
PROJECT_DIR = INCLUDE_DIR.parent
DEFAULT_CONFIG_PATH = INCLUDE_DIR / "leadsync.yaml"

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

DESTINATION_TYPES = ("meta", "tiktok", "google_datamanager", "google_ads", "linkedin",
                     "snapchat", "pinterest", "reddit")
_GOOGLE_TYPES = ("google_datamanager", "google_ads")
_CUSTOMER_ID_RE = re.compile(r"^\d{10}$")
#: Snap's standard event names (its Conversions API Parameters page; Segment's and
#: RudderStack's mappings): the only names Snap accepts. Here rather than in the destination
#: module so that validating a config never imports the identity rules (phonenumbers).
SNAPCHAT_EVENT_NAMES = frozenset({
    "PAGE_VIEW", "VIEW_CONTENT", "ADD_CART", "ADD_TO_WISHLIST", "SIGN_UP", "SEARCH",
    "PURCHASE", "ADD_BILLING", "COMPLETE_TUTORIAL", "SUBSCRIBE", "AD_CLICK", "AD_VIEW",
    "START_CHECKOUT", "RATE", "LIST_VIEW", "LEVEL_COMPLETE", "ACHIEVEMENT_UNLOCKED",
    "SPENT_CREDITS", "SAVE", "SHARE", "INVITE", "LOGIN", "RESERVE", "START_TRIAL",
    "APP_OPEN", "APP_INSTALL", "CUSTOM_EVENT_1", "CUSTOM_EVENT_2", "CUSTOM_EVENT_3",
    "CUSTOM_EVENT_4", "CUSTOM_EVENT_5",
})
_CONVERSION_ACTION_RE = re.compile(r"^\d{1,20}$")


class ConfigError(ValueError):
    """The configuration file is missing or invalid; the message names the key."""


def parse_duration(value: Any) -> timedelta:
    """Parses ``"90s"``, ``"5m"``, ``"2h"``, ``"7d"`` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration like '5m', '2h' or a number of seconds")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return _seconds(float(value), value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return _seconds(float(match.group(1)) * _UNITS[match.group(2)], value)
    raise ValueError(f"expected a duration like '5m', '2h' or '7d', got {value!r}")


def _seconds(seconds: float, value: Any) -> timedelta:
    # YAML's .inf/.nan and absurd sizes would escape as OverflowError, not as a ConfigError.
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be a finite number of seconds, got {value!r}")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"duration {value!r} is too large") from None


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Strict):
    """Where and how rows are read from the warehouse."""

    query_file: str = "sql/converted_leads.sql"
    connection_id: str = "leadsync_warehouse"
    lookback: Duration = timedelta(hours=2)
    settle_lag: Duration = timedelta(minutes=2)
    chunk_size: int = Field(default=5000, ge=1, le=100_000)
    # Rows per query when reading the window (the next page starts after the last row). Unset:
    # 100,000 on Postgres; on SQLite one query for the whole window, because each page there
    # evaluates the cursor (a strftime) on every row of the table again: 1M rows read in
    # 27.7 s as one query, 43.2 s in pages of 100,000 (same peak memory, 85 MB).
    page_size: int | None = Field(default=None, ge=1)

    def query_path(self) -> Path:
        """The query file, relative paths resolved against ``include/``."""
        path = Path(self.query_file)
        return path if path.is_absolute() else INCLUDE_DIR / path

    def read_query(self) -> str:
        """Reads the user's SQL, without a trailing semicolon."""
        path = self.query_path()
        try:
            sql = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"source.query_file: cannot read {path}: {exc.strerror}") from exc
        sql = sql.strip().rstrip(";").strip()
        if not sql:
            raise ConfigError(f"source.query_file: {path} is empty")
        return sql


class StateConfig(_Strict):
    """The state store (watermarks, ledger, outbox, runs)."""

    connection_id: str = "leadsync_state"
    lease_ttl: Duration = timedelta(minutes=5)
    lease_wait: Duration = timedelta(seconds=30)
    # Write what check_contract stages (outbox batches, ledger rows, quarantine entries) from
    # a process of its own, on another core, while the task reads and plans the next rows
    # (once 10,000 rows of a window are to be written; an in-memory SQLite state store never).
    writer_process: bool = True


class RetryConfig(_Strict):
    """In-task retries of one request on transient platform errors."""

    attempts: int = Field(default=5, ge=1, le=20)
    backoff_base: Duration = timedelta(seconds=1)
    backoff_max: Duration = timedelta(seconds=60)
    timeout: Duration = timedelta(seconds=30)


class DestinationConfig(_Strict):
    """One platform destination: its own DAG, watermark and ledger."""

    name: str
    type: Literal["meta", "tiktok", "google_datamanager", "google_ads", "linkedin",
                  "snapchat", "pinterest", "reddit"]
    schedule: str = "@hourly"
    connection_id: str | None = None
    enabled: bool = True
    stages: dict[str, str] = Field(min_length=1)
    shape: Literal["crm", "website"] = "crm"
    action_source: str | None = None
    crm_name: str | None = None
    batch_size: int | None = Field(default=None, ge=1)
    max_event_age: Duration | None = None
    future_tolerance: Duration = timedelta(seconds=60)
    retry: RetryConfig = RetryConfig()
    pool_slots: int = Field(default=4, ge=1, le=128)
    # Push lanes per run: each lane is one task that drains pending outbox batches with one
    # HTTP session, so a run has this many push task instances whatever the backlog.
    push_lanes: int = Field(default=2, ge=1, le=64)
    # Requests each lane keeps in flight (threads over its HTTP session): a platform takes a
    # second or so to answer a full batch, which one request at a time would wait out.
    requests_in_flight: int = Field(default=4, ge=1, le=32)
    # Google (google_datamanager, google_ads): the Google Ads account that owns the
    # conversion actions (the stage mapping's values), and the manager account the
    # credentials sign in through, if any. 10 digits; hyphens are dropped.
    customer_id: str | None = None
    login_customer_id: str | None = None
    # google_datamanager: Event.eventSource (WEB, APP, IN_STORE, PHONE, MESSAGE, OTHER).
    event_source: str | None = None

    @field_validator("customer_id", "login_customer_id", mode="before")
    @classmethod
    def _customer_id(cls, value: Any) -> Any:
        if value is None:
            return None
        text = re.sub(r"[\s-]", "", str(value))
        if not _CUSTOMER_ID_RE.match(text):
            raise ValueError(f"must be a 10-digit Google Ads customer id, got {value!r}")
        return text

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                "must be lowercase letters, digits and '_', starting with a letter (max 40)"
            )
        return value

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: dict[str, str]) -> dict[str, str]:
        for stage, event in value.items():
            if not str(stage).strip() or not str(event).strip():
                raise ValueError("stage names and event names must be non-empty strings")
        return value

    @model_validator(mode="after")
    def _shape_rules(self) -> DestinationConfig:
        if self.type == "meta":
            allowed = {"email", "website", "app", "phone_call", "chat", "physical_store",
                       "system_generated", "business_messaging", "other"}
            if self.action_source is not None and self.action_source not in allowed:
                raise ValueError(
                    f"action_source: {self.action_source!r} is not one of {sorted(allowed)}"
                )
            if self.shape == "crm":
                if self.action_source not in (None, "system_generated"):
                    raise ValueError(
                        "action_source: Meta's CRM (Conversion Leads) shape requires "
                        "'system_generated'"
                    )
                if not self.crm_name:
                    raise ValueError(
                        "crm_name: required for shape 'crm' (sent as lead_event_source, "
                        "e.g. 'HubSpot', 'Salesforce')"
                    )
        if self.type == "tiktok" and self.shape == "crm" and not self.crm_name:
            raise ValueError("crm_name: required for TikTok shape 'crm' (sent as "
                             "lead.lead_event_source, e.g. 'HubSpot', 'Salesforce')")
        if self.type != "meta" and self.action_source is not None:
            raise ValueError(f"action_source: only for type 'meta', not {self.type!r}")
        if self.type == "linkedin":
            self._linkedin_rules()
        if self.type == "snapchat":
            self._snapchat_rules()
        if self.type == "pinterest":
            self._pinterest_rules()
        if self.type in _GOOGLE_TYPES:
            self._google_rules()
        else:
            for key in ("customer_id", "login_customer_id", "event_source"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only for Google types, not {self.type!r}")
        return self

    def _linkedin_rules(self) -> None:
        for stage, rule in self.stages.items():
            if not _CONVERSION_ACTION_RE.match(str(rule).strip()):
                raise ValueError(f"stages.{stage}: must be the numeric id of a LinkedIn "
                                 f"conversion rule (conversion method CONVERSIONS_API) for type "
                                 f"'linkedin', got {rule!r}")
        if self.shape != "crm":
            raise ValueError("shape: LinkedIn has one shape; leave 'shape' unset")

    def _snapchat_rules(self) -> None:
        for stage, event in self.stages.items():
            if str(event) not in SNAPCHAT_EVENT_NAMES:
                raise ValueError(f"stages.{stage}: {event!r} is not a Snap standard event name "
                                 "(e.g. SIGN_UP, PURCHASE, CUSTOM_EVENT_1..CUSTOM_EVENT_5); Snap "
                                 "accepts no custom names")

    def _pinterest_rules(self) -> None:
        # Pinterest takes only its own event names (custom stages become "custom").
        allowed = ("add_payment_info", "add_to_cart", "add_to_wishlist", "app_install",
                   "checkout", "custom", "initiate_checkout", "lead", "page_visit", "search",
                   "signup", "subscribe", "view_category", "view_content", "watch_video")
        for stage, event in self.stages.items():
            if str(event).strip() not in allowed:
                raise ValueError(f"stages.{stage}: {event!r} is not a Pinterest event_name; "
                                 f"use one of {list(allowed)} (custom stages: 'custom')")

    def _google_rules(self) -> None:
        if self.customer_id is None:
            raise ValueError(f"customer_id: required for type {self.type!r} (the 10-digit "
                             "Google Ads account that owns the conversion actions)")
        for stage, action in self.stages.items():
            if not _CONVERSION_ACTION_RE.match(str(action).strip()):
                raise ValueError(f"stages.{stage}: must be the numeric id of a Google Ads "
                                 f"conversion action for type {self.type!r}, got {action!r}")
        actions = {str(a).strip() for a in self.stages.values()}
        if self.type == "google_datamanager" and len(actions) > 10:
            raise ValueError("stages: Data Manager takes at most 10 conversion actions per "
                             f"request; this mapping has {len(actions)}")
        if self.event_source is not None:
            if self.type != "google_datamanager":
                raise ValueError("event_source: only for type 'google_datamanager'")
            allowed = ("WEB", "APP", "IN_STORE", "PHONE", "MESSAGE", "OTHER")
            if self.event_source not in allowed:
                raise ValueError(f"event_source: {self.event_source!r} is not one of "
                                 f"{list(allowed)}")

    @property
    def conn_id(self) -> str:
        """The Airflow connection holding this destination's credentials."""
        return self.connection_id or f"leadsync_{self.name}"

    @property
    def dag_id(self) -> str:
        """The DAG that syncs this destination."""
        return f"leadsync_{self.name}"

    @property
    def pool(self) -> str:
        """The Airflow pool that shares this destination's rate limit."""
        return f"leadsync_{self.name}"


class ContractConfig(_Strict):
    """The data contract checked before anything is staged (rules: ``leadsync.quality``).

    How far in the future an event may be is each destination's ``future_tolerance``: the
    platforms differ there, and one knob per destination is enough.
    """

    enabled: bool = True
    # Share of the window's rows that may fail before the run stops (the circuit breaker):
    # past it the upstream is broken, and sending a fraction would mislead the platform.
    failure_threshold: float = Field(default=0.2, ge=0.0, le=1.0)
    # The share is judged on rows new since the watermark, once there are at least this many
    # (three bad rows in a window of five are a quarantine matter, not a broken upstream).
    failure_min_rows: int = Field(default=20, ge=1)
    # More failing rows than this in one run also stops it (keeps quarantine writes bounded).
    max_quarantined_rows: int = Field(default=10_000, ge=0)
    # Rows per Great Expectations validation: the memory bound of the check (rows wait,
    # hashed and encoded, in the stage worker for their batch's verdict). A validation costs
    # ~0.4 s whatever its size plus ~11 ms per 1,000 rows: 200k rows took the GX worker 21.7 s
    # of validation in batches of 10,000 and 7.2 s in batches of 25,000, whose processes
    # peaked at 189 MB (task), 317 MB (stage worker) and 320 MB (GX worker).
    batch_rows: int = Field(default=25_000, ge=100, le=200_000)
    # Validate in a worker process of the check task, on another core, while the task reads,
    # plans and stages the next rows (false: in the task's own process, one core).
    separate_process: bool = True
    # CRM stages that no destination sends (lost, disqualified, ...): skipped, not quarantined.
    known_stages: list[str] = []
    # Rule codes to turn off (structural rules cannot be turned off).
    disabled_rules: list[str] = []
    # Look for rows whose updated_at is null (invisible to the incremental window): one
    # extra query over the whole source per run.
    scan_null_cursor: bool = True
    data_docs: bool = True
    # Where the HTML Data Docs go: default $LEADSYNC_HOME/data_docs; relative = under it.
    data_docs_dir: str | None = None
    # Runs kept in the Data Docs per destination (older pages are deleted).
    data_docs_keep: int = Field(default=100, ge=1)

    @field_validator("known_stages")
    @classmethod
    def _known_stages(cls, value: list[str]) -> list[str]:
        for stage in value:
            if not str(stage).strip():
                raise ValueError("stage names must be non-empty strings")
        return value

    @field_validator("disabled_rules")
    @classmethod
    def _disabled_rules(cls, value: list[str]) -> list[str]:
        from leadsync.quality import RULES  # lazy: quality is not needed to parse a DAG

        for code in value:
            rule = RULES.get(code)
            if rule is None:
                raise ValueError(f"unknown rule {code!r}; known: {', '.join(RULES)}")
            if rule.structural:
                raise ValueError(f"{code!r} is structural and cannot be disabled")
        return value

    def data_docs_path(self) -> Path:
        """The Data Docs directory (not created here)."""
        if not self.data_docs_dir:
            return leadsync_home() / "data_docs"
        path = Path(self.data_docs_dir).expanduser()
        return path if path.is_absolute() else leadsync_home() / path


# Where each notifier type comes from: ours, or the Airflow provider that must be installed.
NOTIFIER_PROVIDERS = {"slack": "apache-airflow-providers-slack",
                      "smtp": "apache-airflow-providers-smtp",
                      "apprise": "apache-airflow-providers-apprise"}


class NotifierConfig(_Strict):
    """One place alerts go: our plain JSON webhook, or a provider's Airflow notifier."""

    type: Literal["webhook", "slack", "smtp", "apprise"]
    # webhook: the URL to POST JSON to, or a connection whose host is that URL (a URL that
    # embeds a token belongs in a connection). slack/smtp/apprise: the provider's connection.
    url: str | None = None
    connection_id: str | None = None
    to: list[str] = []            # smtp: recipients
    from_email: str | None = None  # smtp: sender (default: the connection's)

    @model_validator(mode="after")
    def _fields_of_type(self) -> NotifierConfig:
        import importlib.util

        if self.type == "webhook":
            if bool(self.url) == bool(self.connection_id):
                raise ValueError("a webhook notifier takes exactly one of 'url' and "
                                 "'connection_id'")
            if self.url and not re.match(r"^https?://[^\s/]+", self.url):
                raise ValueError(f"url: expected an http(s) URL, got {self.url!r}")
            return self
        if self.url:
            raise ValueError(f"url: only for a webhook notifier (type {self.type!r} reads its "
                             "connection)")
        if self.type == "smtp" and not self.to:
            raise ValueError("to: at least one recipient is required for an smtp notifier")
        if importlib.util.find_spec(f"airflow.providers.{self.type}") is None:
            raise ValueError(f"type {self.type!r} needs the Airflow provider "
                             f"{NOTIFIER_PROVIDERS[self.type]}, which is not installed")
        return self


class AlertsConfig(_Strict):
    """When to alert and where; one alert per change of state and one recovery message."""

    notifiers: list[NotifierConfig] = []
    # Base URL of the Airflow UI, for the links in messages.
    ui_base_url: str = "http://localhost:8080"
    failed_run: bool = True  # contract breaker, credentials, batches left pending
    # Share of a run's checked rows that went to quarantine above which to alert (None: off).
    max_quarantine_share: float | None = Field(default=0.05, ge=0.0, le=1.0)
    # Dead letters (events the platform rejected) in one run above which to alert.
    max_dead_letters: int | None = Field(default=0, ge=0)
    # Watermark older than this (behind now) at the end of a run (None: off).
    max_watermark_lag: Duration | None = None
    # Where the platform reports processing feedback later (Data Manager request status):
    # share of the records it processed in the last 24 h that it reports as errors (None: off).
    max_platform_error_share: float | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("ui_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"expected an http(s) URL, got {value!r}")
        return value.rstrip("/")


class Config(_Strict):
    """The whole file."""

    source: SourceConfig = SourceConfig()
    state: StateConfig = StateConfig()
    contract: ContractConfig = ContractConfig()
    alerts: AlertsConfig = AlertsConfig()
    destinations: list[DestinationConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for dest in self.destinations:
            if dest.name in seen:
                raise ValueError(f"destination name {dest.name!r} is used twice")
            seen.add(dest.name)
        return self

    def destination(self, name: str) -> DestinationConfig:
        """The destination called ``name``; ConfigError names the known ones otherwise."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations)
        raise ConfigError(f"no destination named {name!r} in the config (known: {known})")


def _format_errors(exc: ValidationError, data: Any) -> str:
    dests = data.get("destinations") if isinstance(data, dict) else None
    lines = []
    for err in exc.errors():
        parts: list[str] = []
        loc = list(err["loc"])
        for i, part in enumerate(loc):
            if isinstance(part, int) and i > 0 and loc[i - 1] == "destinations":
                name = None
                if isinstance(dests, list) and part < len(dests) and isinstance(dests[part], dict):
                    name = dests[part].get("name")
                parts[-1] += f"[{part}]" + (f" (name={name})" if name else "")
            else:
                parts.append(str(part))
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {'.'.join(parts) or '(top level)'}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validates already-parsed YAML data into a :class:`Config`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'destinations'")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        detail = _format_errors(exc, data)
        raise ConfigError(f"{source} is invalid:\n{detail}") from None


def config_path() -> Path:
    """``$LEADSYNC_CONFIG`` or the bundled ``include/leadsync.yaml``."""
    return Path(os.environ.get("LEADSYNC_CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(path: str | Path | None = None) -> Config:
    """Reads and validates the YAML file (cheap: only the file itself is read)."""
    import yaml

    path = Path(path) if path is not None else config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data, str(path))


@lru_cache(maxsize=8)
def _cached(path: str, mtime: float) -> Config:
    return load_config(path)


def get_config(path: str | Path | None = None) -> Config:
    """Cached :func:`load_config`, re-read when the file changes."""
    resolved = Path(path) if path is not None else config_path()
    try:
        mtime = resolved.stat().st_mtime
    except OSError:
        mtime = -1.0
    return _cached(str(resolved), mtime)


def leadsync_home() -> Path:
    """``$LEADSYNC_HOME`` (default ``.leadsync/`` in the project), created on demand."""
    home = Path(os.environ.get("LEADSYNC_HOME") or PROJECT_DIR / ".leadsync")
    home.mkdir(parents=True, exist_ok=True)
    return home

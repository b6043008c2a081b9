"""Benchmarks (``leadsync bench``): every figure is compared against a baseline in the same run.

(a) Build: N synthetic rows (``demo_data.generate_rows_fast``, generated before timing) become
    Meta events and request bodies. *leadsync*: what a run does per row, in the order it does
    it: :meth:`leadsync.pipeline.Planner.plan` (contract guard, eligibility, normalise +
    SHA-256, event), the event serialised once (``encode_event``: stage stores these bytes in
    the outbox, and push embeds them in the request as they are, ``RAW_EVENT_BODIES``), and
    per 1,000 events ``build_request`` sent through the real
    :class:`~leadsync.destinations.http.HttpClient`. The outbox round trip between stage and
    push (a database write and read) is not part of (a): (b) measures it.
    *Baseline*: the official ``facebook_business`` SDK building the same events from the same
    raw rows (``UserData``/``CustomData``/``Event``) and ``EventRequest.execute()``, which
    normalises, hashes and serialises them and form-encodes the request. In both clients only
    the network is replaced, by a transport adapter that records the prepared request and
    answers ``events_received``: what is timed is everything up to the bytes on the wire.
    The sides run interleaved, best of 3, on process CPU time (the machine is shared: CPU
    time is what other processes disturb least); wall-clock figures are printed too. Below
    the target the hot spots of ``Planner.plan`` are profiled.

    Fairness choices. The SDK gets the raw row values it accepts: it lowercases, trims,
    validates and hashes them itself. Phones: the SDK cannot add a country code, so a phone
    written nationally is given to it as the digits with country code (computed before timing);
    international numbers (all of ``generate_rows_fast``'s) are given raw. Gender is mapped to
    its ``Gender`` enum, ``value`` to a float, and the event id is the same deterministic id
    ours sends (``row_event_id``), all inside the timed loop, as user code would. The SDK
    normalises less than leadsync (it sends ``external_id`` unhashed, hashes dates of birth and
    names as typed), so the two agree on the event ids, names, times and user_data keys and on
    the ``em``/``ph`` hashes, which is checked after timing.

(b) End to end: for each row count a scratch Postgres database is created and loaded with
    ``COPY`` (``demo_data``'s loader, then ``ANALYZE`` as a warehouse would have statistics),
    the sandbox runs in its own process (``leadsync sandbox``, events kept in a SQLite file)
    and the pipeline (``Pipeline.run()``, state in the same scratch database) in a child
    process, whose peak RSS is read from ``wait4`` after it exits. The child times each step,
    the waits for the sandbox and the warehouse and the SQL statements, and checks that the
    source was streamed through server-side cursors; CPU is read for the child, the sandbox
    and the Postgres backends of the run. Correctness is checked every time: sandbox unique
    events == ledger delivered == the eligible rows counted in SQL (not with the pipeline's
    code). Memory must stay flat: the RSS ratio of the largest to the smallest run is printed.
    Scratch databases and files are removed afterwards.

(c) Per platform: the same rows planned and encoded for each configured destination (Meta,
    TikTok, Google, LinkedIn, Snapchat, Pinterest, Reddit in the default config), events/s each,
    and all of them planned from one pass over the rows.

(d) The real DAG (``airflow dags test``): ``leadsync.bench_dag``.

(e) The same DAG under a real scheduler (``make cluster``'s processes with the CeleryExecutor
    and two workers, or the LocalExecutor), its first scheduled run measured from Airflow's
    own records beside the same case's ``airflow dags test`` run: ``leadsync.bench_scheduler``.

``--quick`` (tests): 2,000 events and 5,000 end-to-end rows; a ``postgres_url`` that starts with
``sqlite`` runs the end-to-end part on SQLite files instead.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter

TARGET_RATIO = 10.0
REPETITIONS = 3
QUICK_EVENTS = 2_000
DAG_CASES = "sqlite:200000,sqlite:1000000,postgres:1000000"
# No-op runs of (d) per case, interleaved with as many more runs of the trivial DAG: a single
# run of either moves by ±1.5 s from run to run, as much as the no-op's target allows.
NOOP_RUNS = 3
#: (e): the DAG under a real scheduler, with these executors, Redis as Celery's broker.
SCHEDULER_CASES = "postgres:1000000"
EXECUTORS = "celery,local"
REDIS_URL = "redis://127.0.0.1:6379/0"
QUICK_E2E_ROWS = (5_000,)
PROFILE_ROWS = 20_000
SANDBOX_TOKEN = "sandbox-meta-token"  # noqa: S105 - the local emulator's fixed token
SANDBOX_PIXEL = "1234567890123456"
_CHILD = "_e2e-child"


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


class _StubTransport(HTTPAdapter):
    """A ``requests`` transport adapter that never touches the network.

    It records the size of each prepared body (and keeps the first one for the correctness
    check) and answers like the Graph API: ``{"events_received": n}``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0
        self.bytes = 0
        self.first_body: bytes | None = None

    def reset(self) -> None:
        """Zeroes the counters (the first body is kept)."""
        self.requests = 0
        self.bytes = 0

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        """Records the prepared request and answers without sending it."""
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        self.requests += 1
        self.bytes += len(body)
        if self.first_body is None:
            self.first_body = body
        response = Response()
        response.status_code = 200
        response._content = b'{"events_received":1000,"messages":[],"fbtrace_id":"Abench"}'
        response.headers["Content-Type"] = "application/json"
        response.request = request
        response.url = request.url or ""
        return response


@dataclass
class _Clock:
    """CPU and wall seconds of one timed block."""

    cpu: float = 0.0
    wall: float = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self.cpu += time.process_time() - cpu
            self.wall += time.perf_counter() - wall


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def _us(seconds: float, n: int) -> float:
    return seconds / n * 1e6 if n else 0.0


# --------------------------------------------------------------------------------------------
# (a) Build benchmark
# --------------------------------------------------------------------------------------------


@dataclass
class Side:
    """Best-of-N timings of one side of the build benchmark."""

    name: str
    events: int = 0
    cpu: float = float("inf")  # best total CPU seconds
    wall: float = float("inf")  # best total wall seconds
    parts: tuple[float, ...] = ()  # CPU seconds of sub-steps in the best repetition
    bytes_per_event: float = 0.0

    @property
    def rate(self) -> float:
        """Events per CPU second."""
        return _rate(self.events, self.cpu)

    @property
    def wall_rate(self) -> float:
        """Events per wall-clock second."""
        return _rate(self.events, self.wall)

    def keep(self, events: int, clock: _Clock, parts: tuple[float, ...],
             transport: _StubTransport) -> None:
        """Keeps this repetition if it is the fastest so far."""
        self.events = events
        self.wall = min(self.wall, clock.wall)
        if clock.cpu < self.cpu:
            self.cpu = clock.cpu
            self.parts = parts
            self.bytes_per_event = transport.bytes / events if events else 0.0


@dataclass
class BuildResult:
    """What the build benchmark measured and checked."""

    rows: int
    ours: Side
    sdk: Side
    compared: int = 0
    problems: list[str] = field(default_factory=list)
    hot_spots: str = ""

    @property
    def ratio(self) -> float:
        """leadsync events/s over SDK events/s (CPU time)."""
        return self.ours.rate / self.sdk.rate if self.sdk.rate else float("inf")

    @property
    def correct(self) -> bool:
        """Both sides built the same events (see the module docstring for what is compared)."""
        return not self.problems and self.compared > 0


def _meta_destination(config: Any) -> Any:
    for dest in config.destinations:
        if dest.type == "meta":
            return dest
    raise RuntimeError("the configuration has no Meta destination to benchmark")


def _sdk_phone(raw: Any, country: Any) -> Any:
    """What the SDK is given as the phone (see the module docstring)."""
    from leadsync.identity import normalize_phone_digits

    if raw is None:
        return None
    text = str(raw).strip()
    if text.startswith(("+", "00")):
        return text
    return normalize_phone_digits(raw, country)


def _ours_pass(
    rows: Sequence[Mapping[str, Any]],
    dest: Any,
    module: Any,
    creds: Any,
    now: datetime,
    client: Any,
) -> tuple[int, float]:
    """Planner.plan for every row, each event serialised once (as stage stores it), and one
    request per 1,000 events; returns (events, send CPU s)."""
    from leadsync.destinations.http import encode_event
    from leadsync.pipeline import Planned, Planner, batch_size

    raw = getattr(module, "RAW_EVENT_BODIES", False)
    size = batch_size(dest, module)
    batch: list[Any] = []  # event dicts, or their JSON (msgspec.Raw)
    events = 0
    send_cpu = 0.0
    cpu = time.process_time

    def flush() -> None:
        nonlocal send_cpu
        start = cpu()
        client.send(module.build_request(batch, creds, dest))
        send_cpu += cpu() - start

    planner = Planner(dest, module, now)  # as a run does: one per destination and run
    for row in rows:
        plan = planner.plan(row)
        if isinstance(plan, Planned):
            batch.append(encode_event(plan.body) if raw else plan.body)
            events += 1
            if len(batch) >= size:
                flush()
                batch = []
    if batch:
        flush()
    return events, send_cpu


def _sdk_pass(
    items: Sequence[tuple[Mapping[str, Any], Any]], dest: Any, size: int
) -> tuple[int, float, float]:
    """The SDK builds the same events and runs EventRequest.execute() per 1,000 of them."""
    from facebook_business.adobjects.serverside.action_source import ActionSource
    from facebook_business.adobjects.serverside.custom_data import CustomData
    from facebook_business.adobjects.serverside.event import Event
    from facebook_business.adobjects.serverside.event_request import EventRequest
    from facebook_business.adobjects.serverside.gender import Gender
    from facebook_business.adobjects.serverside.user_data import UserData

    from leadsync.pipeline import row_event_id
    from leadsync.source import to_utc

    genders = {"f": Gender.FEMALE, "female": Gender.FEMALE, "m": Gender.MALE,
               "male": Gender.MALE}
    crm = dest.shape == "crm"
    action_source = ActionSource("system_generated" if crm else dest.action_source or "website")
    crm_properties = {"event_source": "crm", "lead_event_source": dest.crm_name}
    stages = dest.stages
    events: list[Any] = []
    n = 0
    execute_cpu = normalize_cpu = 0.0
    cpu = time.process_time

    class TimedEventRequest(EventRequest):
        """EventRequest whose normalise step (get_params) is timed on its own."""

        def get_params(self) -> Any:
            nonlocal normalize_cpu
            start = cpu()
            try:
                return super().get_params()
            finally:
                normalize_cpu += cpu() - start

    def flush() -> None:
        nonlocal execute_cpu
        start = cpu()
        TimedEventRequest(pixel_id=SANDBOX_PIXEL, events=events).execute()
        execute_cpu += cpu() - start

    for row, phone in items:
        get = row.get
        gender = get("gender")
        user = UserData(
            email=get("email"), phone=phone, first_name=get("first_name"),
            last_name=get("last_name"), city=get("city"), state=get("state"),
            zip_code=get("zip"), country_code=get("country"),
            date_of_birth=get("date_of_birth"), external_id=get("external_id"),
            gender=genders.get(str(gender).strip().lower()) if gender else None,
            client_ip_address=get("client_ip"), client_user_agent=get("user_agent"),
            fbc=get("fbc"), fbp=get("fbp"), lead_id=get("meta_lead_id"),
        )
        value = get("value")
        custom = CustomData(
            value=float(value) if value is not None else None,
            currency=get("currency") if value is not None else None,
            custom_properties=crm_properties if crm else {},
        )
        event_time = to_utc(get("event_time"))
        assert event_time is not None
        events.append(Event(
            event_name=stages[str(get("stage")).strip()],
            event_time=int(event_time.timestamp()),
            event_id=row_event_id(row),
            event_source_url=None if crm else get("event_source_url"),
            action_source=action_source,
            user_data=user,
            custom_data=custom,
        ))
        n += 1
        if len(events) >= size:
            flush()
            events = []
    if events:
        flush()
    return n, execute_cpu, normalize_cpu


def _decode_ours(body: bytes) -> list[dict[str, Any]]:
    return list(json.loads(body)["data"])


def _decode_sdk(body: bytes) -> list[dict[str, Any]]:
    form = parse_qs(body.decode(), strict_parsing=True)
    return [json.loads(item) for item in json.loads(form["data"][0])]


def _compare(ours: list[dict[str, Any]], sdk: list[dict[str, Any]]) -> list[str]:
    """Differences that matter between the two first requests (empty when they agree)."""
    problems: list[str] = []
    theirs = {e.get("event_id"): e for e in sdk}
    if len(ours) != len(sdk) or set(theirs) != {e["event_id"] for e in ours}:
        return [f"different events: {len(ours)} vs {len(sdk)} or different event ids"]
    for event in ours:
        other = theirs[event["event_id"]]
        for key in ("event_name", "event_time", "action_source"):
            if event[key] != other.get(key):
                problems.append(f"{event['event_id']}: {key} {event[key]!r} != {other.get(key)!r}")
        user, their_user = event["user_data"], other.get("user_data", {})
        if set(user) != set(their_user):
            problems.append(f"{event['event_id']}: user_data keys differ: "
                            f"{sorted(set(user) ^ set(their_user))}")
        for key in ("em", "ph"):
            # Meta takes a string or a list of strings: ours sends the string, the SDK a list.
            if _as_list(user.get(key)) != _as_list(their_user.get(key)):
                problems.append(f"{event['event_id']}: {key} hashes differ")
    return problems[:10]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _profile_ours(rows: Sequence[Mapping[str, Any]], dest: Any, module: Any,
                  now: datetime) -> str:
    """Top functions (own time) of plan_row over the rows, as printed by pstats."""
    from leadsync.pipeline import Planner

    plan = Planner(dest, module, now).plan
    profiler = cProfile.Profile(time.process_time)  # CPU time: less noise on a shared machine
    profiler.enable()
    for row in rows:
        plan(row)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(12)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(lines[start:])


def run_build(n: int, *, repetitions: int = REPETITIONS, profile: bool = True) -> BuildResult:
    """Runs benchmark (a) on ``n`` rows; see the module docstring."""
    from facebook_business.api import FacebookAdsApi

    from leadsync import demo_data
    from leadsync.config import get_config
    from leadsync.destinations import get_destination
    from leadsync.destinations.http import HttpClient
    from leadsync.pipeline import Planned, Planner, batch_size

    dest = _meta_destination(get_config())
    module = get_destination(dest.type)
    now = datetime.now(UTC)
    creds = module.parse_credentials("http://sandbox.invalid", SANDBOX_TOKEN,
                                     {"pixel_id": SANDBOX_PIXEL})
    size = batch_size(dest, module)

    # Not timed: the rows, and which of them become events (the SDK builds exactly those).
    planner = Planner(dest, module, now)
    rows = list(demo_data.generate_rows_fast(n, now, seed=20_260_101))
    items = [
        (row, _sdk_phone(row.get("phone"), row.get("country")))
        for row in rows
        if isinstance(planner.plan(row), Planned)
    ]

    ours_transport, sdk_transport = _StubTransport(), _StubTransport()
    client = HttpClient()
    client.session.mount("http://", ours_transport)
    client.session.mount("https://", ours_transport)
    api = FacebookAdsApi.init(access_token=SANDBOX_TOKEN, crash_log=False)
    api._session.requests.mount("https://", sdk_transport)

    ours = Side("leadsync")
    sdk = Side("facebook-business SDK")
    # The input rows are not what is measured: keep the collector from walking them.
    gc.collect()
    gc.freeze()
    try:
        for _ in range(repetitions):
            for side in (ours, sdk):
                transport = sdk_transport if side is sdk else ours_transport
                transport.reset()
                clock = _Clock()
                with clock.measure():
                    if side is ours:
                        events, send = _ours_pass(rows, dest, module, creds, now, client)
                        parts: tuple[float, ...] = (send,)
                    else:
                        events, execute, normalize = _sdk_pass(items, dest, size)
                        parts = (execute, normalize)
                side.keep(events, clock, parts, transport)
                gc.collect()
    finally:
        gc.unfreeze()
        client.close()

    result = BuildResult(n, ours, sdk)
    if ours_transport.first_body and sdk_transport.first_body:
        first_ours = _decode_ours(ours_transport.first_body)
        result.compared = len(first_ours)
        result.problems = _compare(first_ours, _decode_sdk(sdk_transport.first_body))
    else:
        result.problems = ["no request was sent"]
    if ours.events != sdk.events or ours.events != len(items):
        result.problems.append(f"event counts differ: {ours.events} vs {sdk.events}")
    if profile and result.ratio < TARGET_RATIO:
        result.hot_spots = _profile_ours(rows[:PROFILE_ROWS], dest, module, now)
    return result


def print_build(result: BuildResult) -> None:
    """Prints benchmark (a)."""
    ours, sdk = result.ours, result.sdk
    (send,) = ours.parts
    execute, normalize = sdk.parts
    print(f"(a) Meta events built and serialised from {result.rows:,} in-memory rows, "
          f"requests of 1,000 events, best of {REPETITIONS} interleaved (CPU time; "
          "wall-clock in brackets)")
    print(f"    leadsync  Planner + HttpClient   : {_fmt_rate(ours.rate):>9} events/s "
          f"[{_fmt_rate(ours.wall_rate)}]  {_us(ours.cpu, ours.events):5.1f} µs/event = "
          f"plan + encode once {_us(ours.cpu - send, ours.events):.1f} + request "
          f"(build_request, HttpClient) {_us(send, ours.events):.1f}; "
          f"{ours.bytes_per_event:,.0f} bytes/event")
    print(f"    SDK       Event + execute()       : {_fmt_rate(sdk.rate):>9} events/s "
          f"[{_fmt_rate(sdk.wall_rate)}]  {_us(sdk.cpu, sdk.events):5.1f} µs/event = objects "
          f"{_us(sdk.cpu - execute, sdk.events):.1f} + normalise/hash/JSON "
          f"{_us(normalize, sdk.events):.1f} + form-encode "
          f"{_us(execute - normalize, sdk.events):.1f}; {sdk.bytes_per_event:,.0f} bytes/event")
    verdict = "meets" if result.ratio >= TARGET_RATIO else "BELOW"
    print(f"    ratio leadsync/SDK: {result.ratio:.2f}x ({verdict} the {TARGET_RATIO:g}x target; "
          f"wall-clock ratio {ours.wall_rate / sdk.wall_rate:.2f}x)")
    status = "OK" if result.correct else "MISMATCH"
    print(f"    same events: {status} ({ours.events:,} events each side; the first requests "
          f"compared event by event: {result.compared:,} events)")
    for problem in result.problems:
        print(f"      ! {problem}")
    if result.hot_spots:
        print(f"    hot spots of Planner.plan (cProfile, own time, "
              f"{min(result.rows, PROFILE_ROWS):,} rows):")
        for line in result.hot_spots.splitlines():
            print(f"      {line}")


# --------------------------------------------------------------------------------------------
# (b) End-to-end benchmark
# --------------------------------------------------------------------------------------------


@dataclass
class E2EResult:
    """One end-to-end run."""

    rows: int
    backend: str
    load_s: float = 0.0
    expected: int = 0
    delivered: int = 0
    sandbox_unique: int = 0
    sandbox_duplicates: int = 0
    ledger: dict[str, int] = field(default_factory=dict)
    run_status: str = ""
    run_s: float = 0.0  # Pipeline.run() wall time in the child
    child_s: float = 0.0  # the child process, start to exit
    phases: dict[str, float] = field(default_factory=dict)
    http_s: float = 0.0  # wall time waiting for the sandbox's responses
    source_s: float = 0.0  # wall time reading the warehouse (cursor fetches, parsing rows)
    gc_s: float = 0.0  # time in the cyclic garbage collector
    gc_full: int = 0  # full (generation 2) collections
    sql_top: list[tuple[str, int, float]] = field(default_factory=list)
    requests: int = 0
    sandbox_cpu_s: float = 0.0
    autovacuum: str | None = None  # the Postgres server's setting
    postgres_cpu_s: float | None = None
    child_cpu_s: float = 0.0
    peak_rss_kb: int = 0  # wait4 ru_maxrss of the pipeline child
    rss_start_kb: int = 0  # after imports, before the run
    rss_after: dict[str, int] = field(default_factory=dict)  # VmRSS after each phase
    server_side_cursor: bool | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        """Delivered events per second of Pipeline.run()."""
        return _rate(self.delivered, self.run_s)

    @property
    def correct(self) -> bool:
        """Sandbox unique events == ledger delivered == eligible rows, and nothing left over."""
        return not self.problems


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _vm(key: str) -> int:
    """A ``/proc/self/status`` memory figure in kB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _get_json(url: str, timeout: float = 30.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
        return json.loads(response.read())


@contextlib.contextmanager
def _sandbox_process(workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``leadsync sandbox`` in its own process, events kept in a file; yields (url, process)."""
    port = _free_port()
    log = open(workdir / "sandbox.log", "wb")
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "leadsync.cli", "sandbox", "--port", str(port),
         "--store", str(workdir / "sandbox.db")],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the sandbox exited with status {proc.returncode}; see "
                                   f"{workdir / 'sandbox.log'}")
            try:
                _get_json(f"{url}/_sandbox/health", timeout=1)
                break
            except (urllib.error.URLError, OSError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError("the sandbox did not start within 60 s") from None
                time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@contextlib.contextmanager
def _scratch_postgres(admin_url: str) -> Iterator[str]:
    """A new, empty Postgres database (dropped afterwards); yields its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"leadsync_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = :name"), {"name": name})
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()


def _expected_eligible(engine: Any, dest: Any, module: Any, now: datetime) -> int:
    """Rows the run must deliver, counted in SQL (independently of the pipeline's code).

    Mapped stage, not opted out, inside the platform's age window (less the staging margin)
    and at least one match key.
    """
    from sqlalchemy import MetaData, and_, func, not_, or_, select

    from leadsync.demo_data import lead_stages_table

    table = lead_stages_table(MetaData())
    c = table.c
    max_age = dest.max_event_age or module.LIMITS.max_event_age
    conditions = [c.stage.in_(list(dest.stages)), not_(c.opted_out)]
    if max_age is not None:
        conditions.append(c.event_time >= now - max_age + module.LIMITS.stage_margin)
    conditions.append(or_(
        c.email.is_not(None), c.phone.is_not(None), c.external_id.is_not(None),
        c.fbc.is_not(None), c.fbp.is_not(None), c.meta_lead_id.is_not(None),
        and_(c.client_ip.is_not(None), c.user_agent.is_not(None)),
    ))
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(*conditions)).scalar_one())


def run_e2e(n: int, db_url: str, *, workdir: Path | None = None) -> E2EResult:
    """Runs benchmark (b) for ``n`` rows; ``db_url`` is a Postgres admin URL or ``sqlite``."""
    from sqlalchemy import text

    from leadsync import demo_data
    from leadsync.config import get_config
    from leadsync.db import make_engine
    from leadsync.destinations import get_destination
    from leadsync.state import StateStore

    sqlite = db_url.startswith("sqlite")
    result = E2EResult(n, "sqlite" if sqlite else "postgres")
    dest = _meta_destination(get_config())
    module = get_destination(dest.type)
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="leadsync-bench-")) if workdir is None else workdir
    try:
        with contextlib.ExitStack() as stack:
            if sqlite:
                warehouse_url = f"sqlite:///{work / 'warehouse.db'}"
                state_url = f"sqlite:///{work / 'state.db'}"
            else:
                warehouse_url = state_url = stack.enter_context(_scratch_postgres(db_url))
            now = datetime.now(UTC)
            engine = make_engine(warehouse_url)
            demo_data.create_schema(engine)
            started = time.perf_counter()
            rows = demo_data.generate_rows_fast(n, now, seed=n)
            demo_data._load(engine, rows, only_if_empty=True)
            with engine.begin() as conn:  # a warehouse has statistics on its tables
                conn.execute(text(f"ANALYZE {demo_data.TABLE_NAME}"))
            result.load_s = time.perf_counter() - started
            if not sqlite:
                with engine.connect() as conn:
                    result.autovacuum = str(conn.execute(text("SHOW autovacuum")).scalar())
            result.expected = _expected_eligible(engine, dest, module, now)
            engine.dispose()

            url, sandbox = stack.enter_context(_sandbox_process(work))
            sandbox_cpu = _proc_cpu(sandbox.pid)
            child = _run_child(work, {
                "warehouse_url": warehouse_url, "state_url": state_url,
                "sandbox_url": url, "destination": dest.name,
            }, result)
            result.sandbox_cpu_s = _proc_cpu(sandbox.pid) - sandbox_cpu
            stats = _get_json(f"{url}/_sandbox/stats")[dest.type]
            result.sandbox_unique = int(stats["unique_events"])
            result.sandbox_duplicates = int(stats["duplicate_events"])

            state_engine = make_engine(state_url)
            try:
                summary = StateStore(state_engine).summary([dest.name])[dest.name]
            finally:
                state_engine.dispose()
            result.ledger = {k: int(v) for k, v in summary.items() if isinstance(v, int)}
            result.delivered = result.ledger.get("delivered", 0)
            _check(result, child)
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _run_child(work: Path, spec: dict[str, Any], result: E2EResult) -> dict[str, Any]:
    """Runs the pipeline in a child process, through bench (d)'s small launcher: a child
    forked straight from this (large) process would report this process's size as its peak.
    The peak is the largest process's (the pipeline, or its contract worker)."""
    from leadsync.bench_dag import _MEASURE

    out = work / f"child-{uuid.uuid4().hex[:8]}.json"
    rss_file = work / f"child-{uuid.uuid4().hex[:8]}.maxrss"
    err = open(work / "child.log", "wb")
    started = time.perf_counter()
    before = os.times()
    try:
        proc = subprocess.run(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-c", _MEASURE, str(rss_file), sys.executable, "-m",
             "leadsync.bench", _CHILD, json.dumps(spec), str(out)],
            stdout=err, stderr=subprocess.STDOUT, check=False,
        )
    finally:
        err.close()
    after = os.times()
    result.child_s = time.perf_counter() - started
    peaks = (rss_file.read_text().split() if rss_file.exists() else []) or ["0"]
    result.peak_rss_kb = int(peaks[0])  # kB on Linux
    # The launcher's children: the pipeline and the processes it waited for (its worker).
    result.child_cpu_s = (after.children_user - before.children_user
                          + after.children_system - before.children_system)
    if proc.returncode != 0 or not out.exists():
        tail = (work / "child.log").read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"the pipeline child failed (status {proc.returncode}):\n"
                           + "\n".join(tail))
    child: dict[str, Any] = json.loads(out.read_text())
    result.run_s = child["run_s"]
    result.phases = child["phases"]
    result.http_s = child["http_s"]
    result.source_s = child["source_s"]
    result.gc_s = child["gc_s"]
    result.gc_full = child["gc_full"]
    result.sql_top = [(str(label), int(n), float(t)) for label, n, t in child["sql_top"]]
    result.requests = child["requests"]
    result.rss_start_kb = child["rss_start_kb"]
    result.rss_after = child["rss_after"]
    result.server_side_cursor = child["server_side_cursor"]
    result.postgres_cpu_s = child["postgres_cpu_s"]
    result.run_status = child["summary"].get("status", "")
    return child


def _check(result: E2EResult, child: Mapping[str, Any]) -> None:
    if not result.expected:
        result.problems.append("no eligible rows were loaded")
    if not result.sandbox_unique == result.delivered == result.expected:
        result.problems.append(
            f"sandbox unique events {result.sandbox_unique:,}, ledger delivered "
            f"{result.delivered:,}, eligible rows {result.expected:,}: they must be equal")
    if result.sandbox_duplicates:
        result.problems.append(f"the sandbox received {result.sandbox_duplicates} duplicates")
    for status in ("pending", "failed"):
        if result.ledger.get(status):
            result.problems.append(f"{result.ledger[status]:,} events {status} in the ledger")
    if result.run_status != "success":
        result.problems.append(f"run status {result.run_status!r}: "
                               f"{child['summary'].get('errors', '')}")


def _statement_label(statement: str) -> str:
    """A short, parameter-free name for a SQL statement (for the time-by-statement table)."""
    words = statement.split()
    if not words:
        return "?"
    verb = words[0].upper()
    upper = [w.upper() for w in words]
    table = "?"
    for keyword in ("FROM", "INTO", "UPDATE"):
        if keyword in upper[: 40 if verb == "SELECT" else 4]:
            at = upper.index(keyword)
            if at + 1 < len(words):
                table = words[at + 1].strip('"(')
                break
    if "_LS_TS" in statement.upper():
        return "SELECT source page (server-side cursor: DECLARE only)"
    return f"{verb} {table}"


class _SqlTimer:
    """Wall time spent in each kind of SQL statement of an engine (execute calls)."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}

    def attach(self, engine: Any) -> None:
        from sqlalchemy import event

        @event.listens_for(engine, "before_cursor_execute")
        def _before(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            conn.info["_bench_t0"] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def _after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            start = conn.info.pop("_bench_t0", None)
            if start is not None:
                total = self.totals.setdefault(_statement_label(statement), [0.0, 0.0])
                total[0] += 1
                total[1] += time.perf_counter() - start

    def top(self, n: int = 5) -> list[tuple[str, int, float]]:
        ranked = sorted(self.totals.items(), key=lambda item: -item[1][1])[:n]
        return [(label, int(count), seconds) for label, (count, seconds) in ranked]


def _child_main(spec_json: str, out_path: str) -> int:
    """The pipeline child: one Pipeline.run(), timed by phase; writes its figures as JSON."""
    from sqlalchemy import event

    from leadsync.config import get_config
    from leadsync.db import make_engine
    from leadsync.destinations import get_destination
    from leadsync.destinations.http import HttpClient
    from leadsync.pipeline import Pipeline
    from leadsync.source import Source
    from leadsync.state import StateStore

    spec = json.loads(spec_json)
    config = get_config()
    dest = config.destination(spec["destination"])
    module = get_destination(dest.type)
    creds = module.parse_credentials(spec["sandbox_url"], SANDBOX_TOKEN,
                                     {"pixel_id": SANDBOX_PIXEL})
    warehouse = make_engine(spec["warehouse_url"])
    state = StateStore(make_engine(spec["state_url"]))
    sql = _SqlTimer()
    sql.attach(warehouse)
    sql.attach(state.engine)

    # Did every statement executed with stream_results=True (the source's pages) get a
    # server-side cursor? psycopg2 names those cursors; a client-side one buffers all rows.
    named: list[bool] = []

    @event.listens_for(warehouse, "before_cursor_execute")
    def _source_cursor(conn: Any, cursor: Any, statement: str, parameters: Any,
                       context: Any, executemany: bool) -> None:
        if context is not None and context.execution_options.get("stream_results"):
            named.append(getattr(cursor, "name", None) is not None)

    pipeline = Pipeline(config, dest, state, warehouse, credentials=lambda: creds)
    rss_start = _vm("VmRSS")
    phases: dict[str, float] = {}
    rss_after: dict[str, int] = {}

    def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
                rss_after[name] = _vm("VmRSS")
        return wrapper

    for name in ("open_run", "check", "stage", "push_lane", "commit"):
        if hasattr(pipeline, name):
            label = "push" if name == "push_lane" else name  # Pipeline.run pushes in one lane
            setattr(pipeline, name, timed(label, getattr(pipeline, name)))

    # Measurement hooks on classes, in this child process only: time waiting for the
    # sandbox, and time reading the warehouse (the fetches of the server-side cursor).
    waits = {"http": 0.0, "requests": 0.0, "source": 0.0}
    send = HttpClient.send

    def timed_send(self: HttpClient, request: Any) -> Any:
        start = time.perf_counter()
        try:
            return send(self, request)
        finally:
            waits["http"] += time.perf_counter() - start
            waits["requests"] += 1

    stream = Source.stream

    def timed_stream(self: Source, *args: Any, **kwargs: Any) -> Iterator[Any]:
        chunks = stream(self, *args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            finally:
                waits["source"] += time.perf_counter() - start
            yield chunk

    HttpClient.send = timed_send  # type: ignore[method-assign]
    Source.stream = timed_stream  # type: ignore[method-assign]
    collecting: dict[str, float] = {"s": 0.0, "since": 0.0, "full": 0.0}

    def on_gc(phase: str, info: dict[str, Any]) -> None:  # time in cyclic GC pauses
        if phase == "start":
            collecting["since"] = time.perf_counter()
        else:
            collecting["s"] += time.perf_counter() - collecting["since"]
            collecting["full"] += info.get("generation") == 2

    gc.callbacks.append(on_gc)
    postgres_before = _postgres_cpu(state.engine)
    started = time.perf_counter()
    summary = pipeline.run()
    run_s = time.perf_counter() - started
    postgres_after = _postgres_cpu(state.engine)
    Path(out_path).write_text(json.dumps({
        "summary": summary, "run_s": run_s, "phases": phases, "http_s": waits["http"],
        "requests": int(waits["requests"]), "source_s": waits["source"],
        "gc_s": collecting["s"], "gc_full": int(collecting["full"]),
        "sql_top": sql.top(), "rss_start_kb": rss_start, "rss_after": rss_after,
        "postgres_cpu_s": None if postgres_after is None or postgres_before is None
        else postgres_after - postgres_before,
        "hwm_kb": _vm("VmHWM"),
        "server_side_cursor": None if spec["warehouse_url"].startswith("sqlite")
        else bool(named) and all(named),
    }, default=str))
    return 0


def _postgres_cpu(engine: Any) -> float | None:
    """CPU seconds used so far by the Postgres backends serving this database (local only).

    Backends live as long as their pooled connection, so this counts the work the server did
    for the run (connections closed during the run would be missed; the pools keep theirs).
    """
    if engine.dialect.name != "postgresql":
        return None
    from sqlalchemy import text

    try:
        with engine.connect() as conn:
            pids = conn.execute(text("SELECT pid FROM pg_stat_activity "
                                     "WHERE datname = current_database()")).scalars().all()
        return sum(_proc_cpu(int(pid)) for pid in pids)
    except (OSError, ValueError, IndexError):
        return None  # not a local server, or /proc is not readable


def print_e2e(results: Sequence[E2EResult]) -> None:
    """Prints benchmark (b)."""
    for r in results:
        print(f"    {r.rows:>9,} rows ({r.backend}): {_fmt_rate(r.events_per_s):>6} events/s, "
              f"run {r.run_s:6.1f} s (child process {r.child_s:.1f} s; load {r.load_s:.1f} s), "
              f"peak RSS {r.peak_rss_kb / 1024:6.1f} MB (after imports "
              f"{r.rss_start_kb / 1024:.1f} MB)")
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in r.phases.items())
        rss = ", ".join(f"{k} {v / 1024:.0f}" for k, v in r.rss_after.items())
        print(f"      phases: {phases}; RSS after each (MB): {rss}")
        postgres = "n/a" if r.postgres_cpu_s is None else f"{r.postgres_cpu_s:.1f} s"
        print(f"      CPU: pipeline {r.child_cpu_s:.1f} s, sandbox {r.sandbox_cpu_s:.1f} s, "
              f"Postgres backends {postgres}; waiting for the sandbox {r.http_s:.1f} s "
              f"({r.http_s / r.run_s:.0%} of the run, {r.requests} requests), reading the "
              f"warehouse {r.source_s:.1f} s, garbage collector {r.gc_s:.1f} s "
              f"({r.gc_full} full collections)")
        top = "; ".join(f"{label} x{n} {t:.1f} s" for label, n, t in r.sql_top[:4])
        print(f"      SQL time by statement: {top}")
        cursor = {True: "yes", False: "NO", None: "n/a"}[r.server_side_cursor]
        status = "OK" if r.correct else "FAILED"
        ledger = ", ".join(f"{k} {v:,}" for k, v in r.ledger.items() if v)
        print(f"      correctness {status}: eligible {r.expected:,}, ledger delivered "
              f"{r.delivered:,}, sandbox unique {r.sandbox_unique:,} (ledger: {ledger}); "
              f"server-side cursor: {cursor}")
        for problem in r.problems:
            print(f"      ! {problem}")


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _row_counts(text: str) -> list[int]:
    try:
        counts = [int(part.replace("_", "")) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--e2e-rows: expected comma-separated row counts, got {text!r}") from None
    if any(n <= 0 for n in counts):
        raise ValueError("--e2e-rows: row counts must be positive")
    return counts


class BenchArgumentError(ValueError):
    """An option of ``leadsync bench`` that cannot be read (the message names it and quotes
    the value given: it is the user's own text, never row data)."""


@dataclass(frozen=True)
class Cases:
    """What (d) and (e) are to run, read from the options before anything runs."""

    dag: list[tuple[str, int]]
    scheduler: list[tuple[str, int]]
    executors: list[str]


def read_cases(args: argparse.Namespace) -> Cases:
    """The cases of (d) and (e) and the executors of (e), checked up front: a typo in
    ``--executors`` must not surface after (a), (b) and (d) have run for minutes."""
    from leadsync import bench_dag, bench_scheduler

    quick = bool(getattr(args, "quick", False))
    try:
        dag = ([] if getattr(args, "skip_dag", False)
               else [("sqlite", QUICK_E2E_ROWS[0])] if quick
               else bench_dag.parse_cases(getattr(args, "dag_cases", DAG_CASES)))
        text_ = "" if quick else str(getattr(args, "scheduler_cases", "") or "")
        scheduler = bench_dag.parse_cases(text_, option="--scheduler-cases")
        executors = (bench_scheduler.parse_executors(getattr(args, "executors", EXECUTORS))
                     if scheduler else [])
    except ValueError as exc:
        raise BenchArgumentError(str(exc)) from None
    return Cases(dag, scheduler, executors)


def main(args: argparse.Namespace) -> int:
    """``leadsync bench``: prints the figures; returns 1 when a correctness check fails."""
    started = time.perf_counter()
    cases = read_cases(args)
    quick = bool(getattr(args, "quick", False))
    events = QUICK_EVENTS if quick else int(args.events)
    rows = list(QUICK_E2E_ROWS) if quick else _row_counts(args.e2e_rows)
    ok = True
    print(f"leadsync bench{' --quick' if quick else ''}: python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    build = run_build(events)
    print_build(build)
    ok = ok and build.correct
    print_platforms(run_platforms(max(1_000, events // 4)))
    if not args.skip_e2e:
        url = str(args.postgres_url)
        where = "SQLite files" if url.startswith("sqlite") else "scratch Postgres databases"
        print(f"(b) end to end, warehouse → pipeline child → sandbox process, {where}:",
              flush=True)
        results = []
        for n in rows:
            result = run_e2e(n, url)
            results.append(result)
            if result.autovacuum == "off" and len(results) == 1:
                print("    note: autovacuum is off on this server: tables the run fills (ledger, "
                      "outbox) get no planner statistics while it runs")
            print_e2e([result])
            sys.stdout.flush()
            ok = ok and result.correct
        if len(results) >= 2:
            print_e2e_summary(results)
    if cases.dag:
        from leadsync import bench_dag

        dag_results = bench_dag.run_all(cases.dag, str(args.postgres_url),
                                        noop_runs=1 if quick else max(1, int(getattr(
                                            args, "noop_runs", NOOP_RUNS))))
        ok = ok and all(c.correct for c in dag_results)
    else:
        dag_results = []
    ran = True  # every case that was asked for could run
    if cases.scheduler:
        from leadsync import bench_scheduler

        scheduler_results = bench_scheduler.run_all(
            cases.scheduler, cases.executors,
            str(args.postgres_url), str(getattr(args, "redis_url", REDIS_URL)), dag_results)
        not_run = [c for c in scheduler_results if c.error]
        ok = ok and all(c.correct for c in scheduler_results if not c.error)
        if not_run:
            print(f"{len(not_run)} case(s) of (e) could not run (COULD NOT RUN above)")
            ran = False
    targets = [f"(a) build {build.ratio:.2f}x the SDK (≥ {TARGET_RATIO:g}x: "
               f"{'met' if build.ratio >= TARGET_RATIO else 'MISSED'})"]
    if dag_results:
        from leadsync import bench_dag

        targets += [f"(d) {line}" for line in bench_dag.target_lines(dag_results)]
    print("targets (issue 9):")
    for line in targets:
        print(f"    {line}")
    print(f"total {time.perf_counter() - started:.0f} s; "
          f"{'all correctness checks passed' if ok else 'CORRECTNESS CHECKS FAILED'}")
    if not ran:
        return 1
    return 0 if ok else 1


#: The label of benchmark (c)'s row for every destination planned from one pass over the rows.
ALL_AT_ONCE = "all destinations, one pass"


def run_platforms(n: int) -> dict[str, tuple[int, float]]:
    """(c) Per platform: rows → planned events → request bodies encoded as sent, on CPU
    time, best of 3; then every destination planned from one pass over the same rows.

    Returns ``{name: (events, seconds)}``, with :data:`ALL_AT_ONCE` last.
    """
    from leadsync import demo_data
    from leadsync.cli import sandbox_credentials
    from leadsync.config import get_config
    from leadsync.destinations import get_destination
    from leadsync.destinations.http import encode_json
    from leadsync.pipeline import Planned, Planner, batch_size

    now = datetime.now(UTC)
    rows = list(demo_data.generate_rows_fast(n, now, seed=3))
    dests = [d for d in get_config().destinations if d.enabled]
    setups = []
    for dest in dests:
        module = get_destination(dest.type)
        size = batch_size(dest, module)
        setups.append((dest, module, size, sandbox_credentials(dest, "http://127.0.0.1:9"),
                       Planner(dest, module, now).plan))

    def one(setups_: list[Any]) -> tuple[int, float]:
        batches: list[list[dict[str, Any]]] = [[] for _ in setups_]
        events = 0
        started = time.process_time()
        for row in rows:
            for i, (dest, module, size, creds, plan_fn) in enumerate(setups_):
                plan = plan_fn(row)
                if isinstance(plan, Planned):
                    batch = batches[i]
                    batch.append(plan.body)
                    events += 1
                    if len(batch) >= size:
                        encode_json(module.build_request(batch, creds, dest).body)
                        batches[i] = []
        for i, (dest, module, _size, creds, _plan) in enumerate(setups_):
            if batches[i]:
                encode_json(module.build_request(batches[i], creds, dest).body)
        return events, time.process_time() - started

    results: dict[str, tuple[int, float]] = {}
    for setup in setups:
        results[f"{setup[0].name} ({setup[0].type})"] = min(
            (one([setup]) for _ in range(REPETITIONS)), key=lambda r: r[1])
    results[ALL_AT_ONCE] = min((one(setups) for _ in range(REPETITIONS)), key=lambda r: r[1])
    return results


def print_platforms(results: Mapping[str, tuple[int, float]]) -> None:
    """The lines of benchmark (c)."""
    print("(c) per platform: rows planned (contract guard, eligibility, normalise + hash, "
          "event) and request bodies encoded as sent, best of 3 (CPU time)")
    separate = 0.0
    for name, (events, seconds) in results.items():
        print(f"    {name:<32}: {_fmt_rate(_rate(events, seconds))} events/s "
              f"({events:,} events in {seconds:.2f}s)")
        if name != ALL_AT_ONCE:
            separate += seconds
    together = results.get(ALL_AT_ONCE)
    if together and together[1]:
        print(f"    one pass vs {len(results) - 1} separate passes over the same rows: "
              f"{separate / together[1]:.2f}x")


def print_e2e_summary(results: Sequence[E2EResult]) -> None:
    """The RSS ratio line of benchmark (b)."""
    small = min(results, key=lambda r: r.rows)
    large = max(results, key=lambda r: r.rows)
    ratio = large.peak_rss_kb / small.peak_rss_kb if small.peak_rss_kb else float("nan")
    base_small = small.peak_rss_kb - small.rss_start_kb
    base_large = large.peak_rss_kb - large.rss_start_kb
    growth = base_large / base_small if base_small > 0 else float("nan")
    print(f"    peak RSS ratio {large.rows:,}/{small.rows:,} rows: {ratio:.2f} (target: flat, "
          f"~1.0); above the after-import baseline: {base_small / 1024:.0f} → "
          f"{base_large / 1024:.0f} MB ({growth:.2f}x)")


def build_parser() -> argparse.ArgumentParser:
    """``python -m leadsync.bench`` (the same options as ``leadsync bench``, plus --quick)."""
    parser = argparse.ArgumentParser(prog="python -m leadsync.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (for a parser of its own or the CLI's subcommand)."""
    parser.add_argument("--events", type=int, default=200_000,
                        help="rows for the build benchmark (a)")
    parser.add_argument("--e2e-rows", default="100000,1000000",
                        help="comma-separated row counts for the end-to-end benchmark (b)")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--dag-cases", default=DAG_CASES,
                        help="backend:rows cases for the real-DAG benchmark (d)")
    parser.add_argument("--skip-dag", action="store_true")
    parser.add_argument("--noop-runs", type=int, default=NOOP_RUNS,
                        help="no-op runs of (d) per case, each followed by a run of the trivial "
                        "DAG; the figure is the median of the pairs' differences")
    parser.add_argument("--scheduler-cases", default=SCHEDULER_CASES,
                        help="backend:rows cases for (e), the DAG under a real scheduler "
                        "('' to leave it out)")
    parser.add_argument("--executors", default=EXECUTORS,
                        help="executors for (e): celery (two workers), local, or both "
                        "(celery,local or both)")
    parser.add_argument("--redis-url", default=os.environ.get("LEADSYNC_BENCH_REDIS", REDIS_URL),
                        help="the Celery broker for (e)")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "LEADSYNC_BENCH_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"),
        help="admin URL for scratch databases, or 'sqlite' for SQLite files")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_EVENTS:,} events and {QUICK_E2E_ROWS[0]:,} end-to-end rows "
                        "(tests)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == _CHILD:
        sys.exit(_child_main(sys.argv[2], sys.argv[3]))
    parser_ = build_parser()
    try:
        sys.exit(main(parser_.parse_args()))
    except BenchArgumentError as exc:
        parser_.error(str(exc))

"""The ``leadsync`` command: demo, render, sandbox, state, bench.

Errors reach the user as one line on stderr and exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from leadsync.config import PROJECT_DIR, ConfigError, get_config, leadsync_home

SANDBOX_META_TOKEN = "sandbox-meta-token"  # noqa: S105 - the local emulator's fixed token
SANDBOX_META_PIXEL = "1234567890123456"
SANDBOX_TIKTOK_TOKEN = "sandbox-tiktok-token"  # noqa: S105 - the local emulator's fixed token
SANDBOX_TIKTOK_CRM_EVENT_SET = "SANDBOXCRM00000000001"
SANDBOX_TIKTOK_PIXEL = "SANDBOXPIXEL000000001"
SANDBOX_GOOGLE_TOKEN = "sandbox-google-token"  # noqa: S105 - a static bearer, no OAuth
SANDBOX_LINKEDIN_TOKEN = "sandbox-linkedin-token"  # noqa: S105 - the local emulator's token
SANDBOX_SNAPCHAT_TOKEN = "sandbox-snapchat-token"  # noqa: S105 - the local emulator's token
SANDBOX_SNAPCHAT_PIXEL = "5a9d5a9d-0000-4000-8000-000000000001"
SANDBOX_PINTEREST_TOKEN = "sandbox-pinterest-token"  # noqa: S105 - the emulator's fixed token
SANDBOX_PINTEREST_AD_ACCOUNT = "549755885175"
SANDBOX_REDDIT_TOKEN = "sandbox-reddit-token"  # noqa: S105 - the emulator's fixed token
SANDBOX_REDDIT_PIXEL = "t2_sandbox01"


class CliError(RuntimeError):
    """A problem the user can fix; printed without a traceback."""


# -- environment ----------------------------------------------------------------------------


def airflow_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for running the project's DAGs with a local Airflow under $LEADSYNC_HOME."""
    home = leadsync_home()
    env = dict(os.environ)
    env.setdefault("AIRFLOW_HOME", str(home / "airflow"))
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(PROJECT_DIR / "dags"))
    env.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(PROJECT_DIR / "plugins"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
    env.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
    env["LEADSYNC_HOME"] = str(home)
    env.update(extra or {})
    return env


def ensure_airflow_db(env: dict[str, str]) -> None:
    """Creates the local Airflow metadata DB once, and a pool per configured destination.

    The marker file lists what exists, so a destination added to the config later gets its
    pool on the next demo without re-running the migration.
    """
    home = Path(env["AIRFLOW_HOME"])
    marker = home / ".leadsync-initialised"
    done = set(marker.read_text().split()) if marker.exists() else set()
    home.mkdir(parents=True, exist_ok=True)
    if "db" not in done:
        _airflow(["db", "migrate"], env, "creating the local Airflow database")
        done.add("db")
        marker.write_text("\n".join(sorted(done)) + "\n")
    for dest in get_config().destinations:
        if f"pool:{dest.pool}" in done:
            continue
        _airflow(["pools", "set", dest.pool, str(dest.pool_slots),
                  f"leadsync: shares the {dest.name} API rate limit"], env, f"pool {dest.pool}")
        done.add(f"pool:{dest.pool}")
        marker.write_text("\n".join(sorted(done)) + "\n")


def _airflow(args: list[str], env: dict[str, str], what: str,
             log_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("airflow")
    cmd = [str(exe) if exe.exists() else "airflow", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    if log_path is not None:
        log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        where = f" (full log: {log_path})" if log_path else ""
        raise CliError(f"{what} failed{where}:\n{tail}")
    return proc


def sandbox_connection(dest: Any, url: str) -> dict[str, Any]:
    """The connection fields (conn_type, host, password, extra) that point one destination at
    the local sandbox; ``module.parse_credentials(host, password, extra)`` accepts them."""
    if dest.type == "meta":
        return {"conn_type": "http", "host": url, "password": SANDBOX_META_TOKEN,
                "extra": {"pixel_id": SANDBOX_META_PIXEL, "api_version": "v25.0"}}
    if dest.type == "tiktok":
        source = SANDBOX_TIKTOK_CRM_EVENT_SET if dest.shape == "crm" else SANDBOX_TIKTOK_PIXEL
        return {"conn_type": "http", "host": url, "password": SANDBOX_TIKTOK_TOKEN,
                "extra": {"event_source_id": source}}
    if dest.type in ("google_datamanager", "google_ads"):
        # A static token: the sandbox stands in for Google, no OAuth endpoint is contacted.
        return {"conn_type": "http", "host": url, "extra": {"access_token": SANDBOX_GOOGLE_TOKEN}}
    if dest.type == "linkedin":
        return {"conn_type": "http", "host": url, "password": SANDBOX_LINKEDIN_TOKEN,
                "extra": {}}
    if dest.type == "snapchat":
        return {"conn_type": "http", "host": url, "password": SANDBOX_SNAPCHAT_TOKEN,
                "extra": {"pixel_id": SANDBOX_SNAPCHAT_PIXEL}}
    if dest.type == "pinterest":
        return {"conn_type": "http", "host": url, "password": SANDBOX_PINTEREST_TOKEN,
                "extra": {"ad_account_id": SANDBOX_PINTEREST_AD_ACCOUNT}}
    if dest.type == "reddit":
        return {"conn_type": "http", "host": url, "password": SANDBOX_REDDIT_TOKEN,
                "extra": {"pixel_id": SANDBOX_REDDIT_PIXEL}}
    raise CliError(f"destination {dest.name!r}: no sandbox for type {dest.type!r}")


def sandbox_credentials(dest: Any, url: str) -> Any:
    """The destination's credentials object for the sandbox at ``url`` (benchmarks, tests)."""
    from leadsync.destinations import get_destination

    fields = sandbox_connection(dest, url)
    return get_destination(dest.type).parse_credentials(fields.get("host"),
                                                        fields.get("password"),
                                                        fields.get("extra", {}))


def sandbox_connections(url: str) -> dict[str, str]:
    """Connections that point every destination at the local sandbox."""
    return {f"AIRFLOW_CONN_{dest.conn_id.upper()}": json.dumps(sandbox_connection(dest, url))
            for dest in get_config().destinations}


# -- commands -------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Seeds the embedded warehouse, starts the sandbox, runs each DAG, prints a summary."""
    from leadsync import demo_data
    from leadsync.db import make_engine
    from leadsync.sandbox.app import SandboxConfig
    from leadsync.sandbox.server import SandboxServer

    config = get_config()
    home = leadsync_home()
    env = airflow_env()
    warehouse = make_engine(_db_url(config.source.connection_id, "warehouse"))
    now = datetime.now(UTC)
    seeded = demo_data.seed(warehouse, args.leads, now - timedelta(minutes=1), broken_rows=True)
    if seeded:
        print(f"seeded the embedded warehouse with {seeded} lead stage changes")
    if args.add:
        # Backdated past the settle lag so this run picks them up.
        lag = config.source.settle_lag + timedelta(seconds=1)
        demo_data.add_changes(warehouse, args.add, now - lag)
        print(f"appended {args.add} new stage changes")
    print("preparing the local Airflow (first time only, ~30 s)…", flush=True)
    ensure_airflow_db(env)
    sandbox_cfg = SandboxConfig(meta_tokens={SANDBOX_META_TOKEN},
                                meta_pixels={SANDBOX_META_PIXEL},
                                store_path=str(home / "sandbox.db"))
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    results = []
    with SandboxServer(sandbox_cfg) as sandbox:
        print(f"platform sandbox listening on {sandbox.url}")
        run_env = {**env, **sandbox_connections(sandbox.url)}
        for dest in config.destinations:
            if not dest.enabled:
                continue
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            log_path = logs / f"{dest.dag_id}-{stamp}.log"
            started = time.monotonic()
            print(f"running DAG {dest.dag_id} (airflow dags test)…", flush=True)
            error = None
            try:
                _airflow(["dags", "test", dest.dag_id], run_env, f"DAG {dest.dag_id}", log_path)
            except CliError as exc:
                error = str(exc)
            results.append((dest, time.monotonic() - started, log_path, error))
        stats = _sandbox_stats(sandbox.url)
    print()
    _print_demo_summary(results, stats)
    print("\nSee these runs and the DAGs in the Airflow UI: `make ui`. "
          "On the CeleryExecutor with a scheduler and two workers: `make cluster`.")
    return 1 if any(r[3] for r in results) else 0


def _sandbox_stats(url: str) -> dict[str, Any]:
    import requests

    try:
        return dict(requests.get(f"{url}/_sandbox/stats", timeout=10).json())
    except (requests.RequestException, ValueError):
        return {}


def _print_demo_summary(results: list[Any], stats: dict[str, Any]) -> None:
    store = _state_store()
    summary = store.summary([r[0].name for r in results])
    for dest, seconds, log_path, error in results:
        run = _last_run(store, dest.name)
        counts = (run or {}).get("counts", {})
        state = summary[dest.name]
        print(f"== {dest.name} ({dest.type}) — {seconds:.1f}s, log: {log_path}")
        if error:
            print(f"   FAILED: {error}")
        print(f"   this run : read {counts.get('read', 0)}, sent {counts.get('sent', 0)}, "
              f"acknowledged {counts.get('acknowledged', 0)}, "
              f"expired {counts.get('expired', 0)}, skipped {counts.get('skipped', 0)}, "
              f"quarantined {counts.get('quarantined', 0)}, "
              f"failed {counts.get('failed', 0)}")
        if "checked" in counts:
            rules = {k.split(".", 1)[1]: v for k, v in counts.items()
                     if k.startswith("quarantined.")}
            by_rule = ", ".join(f"{k}={v}" for k, v in sorted(rules.items())) or "none"
            print(f"   contract : checked {counts['checked']} rows; quarantined by rule: "
                  f"{by_rule}")
            dropped = _dropped_identifiers(counts)
            if dropped:
                print(f"   warnings : identifiers left out (rows sent on their other match "
                      f"keys): {dropped}")
        reasons = {k: v for k, v in counts.items()
                   if "." in k and not k.startswith("identifiers_dropped")}
        if reasons:
            print("   reasons  : " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
        print(f"   ledger   : delivered {state['delivered']}, pending {state['pending']}, "
              f"failed {state['failed']}, expired {state['expired']}, "
              f"skipped {state['skipped']}, quarantined {state['quarantined']}")
        wm = state["watermark"]
        print(f"   watermark: {wm['updated_at'] if wm else 'none yet'}")
        if (run or {}).get("status") in ("contract_failed", "check_failed"):
            print("   contract : FAILED — nothing sent; see check_contract in the log")
        platform = stats.get(dest.type, {})
        if platform:
            print(f"   sandbox  : {platform.get('unique_events', 0)} unique events accepted "
                  f"in total, {platform.get('duplicate_events', 0)} duplicates, "
                  f"{platform.get('rejected_requests', 0)} rejected requests")
    _print_data_docs()


def _dropped_identifiers(counts: dict[str, Any]) -> str:
    """``email.bad_email=2, phone.bad_phone=4`` from a run's counts ('' when none)."""
    prefix = "identifiers_dropped."
    return ", ".join(f"{k.removeprefix(prefix)}={v}" for k, v in sorted(counts.items())
                     if k.startswith(prefix))


def _print_data_docs() -> None:
    config = get_config()
    index = config.contract.data_docs_path() / "index.html"
    if config.contract.enabled and config.contract.data_docs and index.exists():
        print(f"data contract Data Docs (one page per run and destination): {index}")


def _last_run(store: Any, destination: str) -> dict[str, Any] | None:
    from sqlalchemy import select

    from leadsync.state import runs

    with store.engine.connect() as conn:
        run_id = conn.execute(
            select(runs.c.run_id).where(runs.c.destination == destination)
            .order_by(runs.c.started_at.desc()).limit(1)
        ).scalar()
    return store.get_run(run_id, destination) if run_id else None


def _db_url(conn_id: str, default_name: str) -> str:
    from leadsync.hooks import LeadsyncDatabaseHook

    return LeadsyncDatabaseHook(conn_id, default_name).url


def _state_store() -> Any:
    from leadsync.db import make_engine
    from leadsync.state import StateStore

    store = StateStore(make_engine(_db_url(get_config().state.connection_id, "state")))
    store.migrate()
    return store


def cmd_render(args: argparse.Namespace) -> int:
    """Prints the requests that rows given as JSON lines would produce (no network).

    Each input line stands on its own: one that cannot be read (not UTF-8, not JSON, not an
    object, or holding text that cannot be encoded such as a lone UTF-16 surrogate) comes out
    as a skipped line with its line number and a reason; every other line is rendered.
    """
    from leadsync.pipeline import render_requests

    config = get_config()
    dest = config.destination(args.destination)
    now = _parse_now(args.now)
    creds = _render_credentials(dest)
    rows = []
    binary = getattr(sys.stdin, "buffer", None)  # bytes: a bad line cannot stop the reader
    lines = binary if binary is not None else (
        line.encode("utf-8", "surrogatepass") for line in sys.stdin)
    for number, raw in enumerate(lines, start=1):
        row, reason = read_json_line(raw)
        if reason is not None:
            _print_line({"skipped": {"line": number, "lead_id": None, "stage": None,
                                     "reason": reason}})
        elif row is not None:
            rows.append(row)
    # The data contract runs first (its Great Expectations suite, in memory): rows it rejects
    # come out as {"skipped": {..., "reason": "<rule code>"}}.
    for item in render_requests(rows, dest, creds, now, config=config):
        _print_line(item)
    return 0


def read_json_line(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """One input line as a row, or why it is not one: ``(row, None)``, ``(None, reason)``,
    or ``(None, None)`` for a blank line. Reasons are fixed codes, never the line's text."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "undecodable_line"
    if not line.strip():
        return None, None
    try:
        row = json.loads(line)
    except ValueError:
        return None, "invalid_json"
    if not isinstance(row, dict):
        return None, "not_a_json_object"
    try:
        # JSON may escape a lone surrogate ("\ud83d"): valid JSON, but no text encoding can
        # hold it, so it could never be hashed nor sent.
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        return None, "unencodable_text"
    return row, None


def _print_line(item: dict[str, Any]) -> None:
    print(json.dumps(item, ensure_ascii=False, sort_keys=False))


def _render_credentials(dest: Any) -> Any:
    """The destination's real connection when one is defined (secrets are masked in the
    output), else placeholders, so render works on a laptop with no connections."""
    from leadsync.destinations import get_destination
    from leadsync.destinations.base import CredentialsError
    from leadsync.hooks import LeadsyncDestinationHook

    try:
        return LeadsyncDestinationHook(dest.conn_id, dest.type).credentials
    except CredentialsError:
        module = get_destination(dest.type)
        placeholders: dict[str, tuple[str | None, dict[str, Any]]] = {
            "meta": ("placeholder", {"pixel_id": SANDBOX_META_PIXEL}),
            "tiktok": ("placeholder", {"event_source_id": SANDBOX_TIKTOK_CRM_EVENT_SET
                                       if dest.shape == "crm" else SANDBOX_TIKTOK_PIXEL}),
            # Never used to mint anything: render sends nothing and masks auth headers.
            "google_datamanager": (None, {"access_token": "placeholder"}),
            "google_ads": (None, {"access_token": "placeholder"}),
            "linkedin": ("placeholder", {}),
            "snapchat": ("placeholder", {"pixel_id": SANDBOX_SNAPCHAT_PIXEL}),
            "pinterest": ("placeholder", {"ad_account_id": SANDBOX_PINTEREST_AD_ACCOUNT}),
            "reddit": ("placeholder", {"pixel_id": SANDBOX_REDDIT_PIXEL}),
        }
        password, extra = placeholders[dest.type]
        return module.parse_credentials(None, password, extra)


def _parse_now(text: str | None) -> datetime:
    if not text:
        return datetime.now(UTC)
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"--now: {text!r} is not an ISO-8601 timestamp") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def cmd_sandbox(args: argparse.Namespace) -> int:
    """Serves the platform emulators on loopback until interrupted."""
    from leadsync.sandbox.app import SandboxConfig
    from leadsync.sandbox.server import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise CliError("--host: the sandbox only listens on loopback (127.0.0.1, ::1)")
    cfg = SandboxConfig(meta_tokens={SANDBOX_META_TOKEN}, meta_pixels={SANDBOX_META_PIXEL},
                        tiktok_tokens={SANDBOX_TIKTOK_TOKEN},
                        tiktok_event_sources={SANDBOX_TIKTOK_CRM_EVENT_SET,
                                              SANDBOX_TIKTOK_PIXEL},
                        google_tokens={SANDBOX_GOOGLE_TOKEN},
                        linkedin_tokens={SANDBOX_LINKEDIN_TOKEN},
                        snapchat_tokens={SANDBOX_SNAPCHAT_TOKEN},
                        snapchat_pixels={SANDBOX_SNAPCHAT_PIXEL},
                        store_path=args.store)
    google = sorted(cfg.google_conversion_actions)
    print(f"sandbox on http://{args.host}:{args.port}\n"
          f"  Meta: token {SANDBOX_META_TOKEN!r}, pixel {SANDBOX_META_PIXEL}\n"
          f"  TikTok: token {SANDBOX_TIKTOK_TOKEN!r}, event sources "
          f"{SANDBOX_TIKTOK_CRM_EVENT_SET} (CRM), {SANDBOX_TIKTOK_PIXEL} (pixel)\n"
          f"  Google (Data Manager, Ads API): bearer {SANDBOX_GOOGLE_TOKEN!r}, customers "
          f"{', '.join(sorted(cfg.google_customers))}, conversion actions "
          f"{', '.join(google)}\n"
          f"  LinkedIn: bearer {SANDBOX_LINKEDIN_TOKEN!r}, conversion rules "
          f"{', '.join(sorted(cfg.linkedin_conversion_rules))}\n"
          f"  Snapchat: token {SANDBOX_SNAPCHAT_TOKEN!r}, pixel {SANDBOX_SNAPCHAT_PIXEL}\n"
          f"  Pinterest: token {SANDBOX_PINTEREST_TOKEN!r}, ad account "
          f"{SANDBOX_PINTEREST_AD_ACCOUNT}\n"
          f"  Reddit: token {SANDBOX_REDDIT_TOKEN!r}, pixel {SANDBOX_REDDIT_PIXEL}", flush=True)
    serve(host=args.host, port=args.port, config=cfg)
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    """Prints watermark and ledger counts per destination."""
    config = get_config()
    store = _state_store()
    summary = store.summary([d.name for d in config.destinations])
    for name, s in summary.items():
        # What the last run left out of its events (unusable identifiers, rows still sent).
        run = _last_run(store, name)
        counts = (run or {}).get("counts", {})
        s["last_run_identifiers_dropped"] = {
            k.removeprefix("identifiers_dropped."): v for k, v in sorted(counts.items())
            if k.startswith("identifiers_dropped.")}
    if args.json:
        print(json.dumps({"destinations": summary}, indent=2, default=str))
        return 0
    for name, s in summary.items():
        wm = s["watermark"]["updated_at"] if s["watermark"] else "none"
        print(f"{name}: watermark {wm}; delivered {s['delivered']}, pending {s['pending']}, "
              f"failed {s['failed']}, expired {s['expired']}, skipped {s['skipped']}, "
              f"quarantined {s['quarantined']}")
        dropped = s["last_run_identifiers_dropped"]
        if dropped:
            print("  last run left out unusable identifiers (rows sent on their other match "
                  "keys): " + ", ".join(f"{k}={v}" for k, v in dropped.items()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs the benchmarks (see bench/)."""
    from leadsync import bench

    try:
        return bench.main(args)
    except bench.BenchArgumentError as exc:  # the user's own option, quoted as given
        raise CliError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``leadsync`` command."""
    parser = argparse.ArgumentParser(prog="leadsync", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="seed the embedded warehouse and run the DAGs against "
                          "the local sandbox")
    demo.add_argument("--add", type=int, default=0, metavar="N",
                      help="append N new stage changes before running")
    demo.add_argument("--leads", type=int, default=3000, help="leads to seed (first run only)")
    demo.set_defaults(func=cmd_demo)

    render = sub.add_parser("render", help="print the requests for rows given as JSON lines "
                            "on stdin (no network)")
    render.add_argument("--destination", required=True)
    render.add_argument("--now", help="ISO-8601 time to evaluate age windows against")
    render.set_defaults(func=cmd_render)

    sandbox = sub.add_parser("sandbox", help="serve the platform emulators on loopback")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8765)
    sandbox.add_argument("--store", help="SQLite file to keep accepted events across restarts")
    sandbox.set_defaults(func=cmd_sandbox)

    state = sub.add_parser("state", help="inspect the state store")
    state_sub = state.add_subparsers(dest="state_command", required=True)
    show = state_sub.add_parser("show", help="watermark and ledger counts per destination")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_state)

    bench = sub.add_parser("bench", help="run the benchmarks")
    from leadsync.bench import add_arguments as bench_arguments

    bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, ConfigError) as exc:
        print(f"leadsync: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from leadsync.destinations.base import CredentialsError
        from leadsync.source import SourceError

        if isinstance(exc, CredentialsError | SourceError | ValueError):
            from leadsync.redact import clean_message

            print(f"leadsync: {clean_message(str(exc))}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

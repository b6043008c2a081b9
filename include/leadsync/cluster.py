"""A local Airflow cluster on the CeleryExecutor: the docker-compose topology, natively.

``python -m leadsync.cluster start`` (``make cluster``) starts, detached, an Airflow API server,
scheduler, dag-processor, triggerer and two Celery workers on this machine's Postgres (Airflow
metadata and leadsync state, each in a database of its own, created if missing) and Redis (the
Celery broker), plus the platform sandbox with every destination's connection pointing at it.
It returns once the API server answers, prints the UI address and login, and writes
``$LEADSYNC_HOME/cluster/env.sh`` so that ``airflow …`` and ``leadsync …`` in a shell talk to
that cluster. ``stop`` (``make cluster-stop``) stops exactly the processes ``start`` recorded.
Both are idempotent. ``ui`` (``make ui``) serves the Airflow UI over the demo's own home.

Tooling only: the runtime path (DAGs, pipeline, destinations) never imports this module.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from leadsync.config import PROJECT_DIR, get_config, leadsync_home

DEFAULT_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
ADMIN_USER = "admin"
WORKERS = 2
WORKER_CONCURRENCY = 2
EXECUTORS = ("CeleryExecutor", "LocalExecutor")
EXECUTOR_NAMES = {"celery": "CeleryExecutor", "local": "LocalExecutor"}


class ClusterError(RuntimeError):
    """A problem the user can fix (Postgres or Redis unreachable, a process that died)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reports free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if it does not exist); with
    the pid it identifies a process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a worker's pool processes, supervisors, tasks)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


@dataclass
class Cluster:
    """One local cluster, identified by its directory (``$LEADSYNC_HOME/cluster``).

    Attributes:
        home: The cluster's directory: Airflow home, logs, pid file, env.sh, sandbox store.
        pg_admin_url: A Postgres URL with the right to create databases.
        redis_url: The Redis broker (keys are prefixed per cluster, so clusters can share it).
        workers: Number of Celery workers.
        extra_env: More environment for every process (tests tune timeouts with it).
        executor: ``CeleryExecutor`` (the workers above, Redis as the broker) or
            ``LocalExecutor`` (the scheduler runs the tasks itself, as many at once as the
            Celery workers' slots together; no workers, no broker).
    """

    home: Path
    pg_admin_url: str = DEFAULT_PG
    redis_url: str = DEFAULT_REDIS
    workers: int = WORKERS
    extra_env: dict[str, str] = field(default_factory=dict)
    executor: str = "CeleryExecutor"

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ClusterError(f"executor must be one of {', '.join(EXECUTORS)}, "
                               f"got {self.executor!r}")

    @property
    def celery(self) -> bool:
        return self.executor == "CeleryExecutor"

    @classmethod
    def default(cls) -> Cluster:
        """The cluster of ``$LEADSYNC_HOME`` (Postgres and Redis from the environment)."""
        executor = os.environ.get("LEADSYNC_CLUSTER_EXECUTOR", "celery").strip().lower()
        if executor not in EXECUTOR_NAMES:
            raise ClusterError(f"LEADSYNC_CLUSTER_EXECUTOR must be celery or local, got "
                               f"{executor!r}")
        return cls(leadsync_home() / "cluster",
                   os.environ.get("LEADSYNC_CLUSTER_PG", DEFAULT_PG),
                   os.environ.get("LEADSYNC_CLUSTER_REDIS", DEFAULT_REDIS),
                   executor=EXECUTOR_NAMES[executor])

    # -- names ---------------------------------------------------------------------------

    @property
    def ident(self) -> str:
        """A short id of this cluster: database names and Redis keys derive from it, so two
        clones (or two test sessions) on one machine never share them."""
        return hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:10]

    @property
    def airflow_db(self) -> str:
        return f"leadsync_airflow_{self.ident}"

    @property
    def state_db(self) -> str:
        return f"leadsync_state_{self.ident}"

    def db_url(self, name: str) -> str:
        return self.pg_admin_url.rsplit("/", 1)[0] + f"/{name}"

    @property
    def pid_file(self) -> Path:
        return self.home / "processes.json"

    @property
    def env_file(self) -> Path:
        return self.home / "env.sh"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    # -- state of the processes ----------------------------------------------------------

    def recorded(self) -> dict[str, Any]:
        """What the last ``start`` wrote (ports, secrets, processes), or ``{}``."""
        try:
            return dict(json.loads(self.pid_file.read_text()))
        except (OSError, ValueError):
            return {}

    def alive(self) -> dict[str, int]:
        """The recorded processes that still run (same pid *and* start time)."""
        procs = self.recorded().get("processes", {})
        return {name: p["pid"] for name, p in procs.items() if _running(p)}

    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.recorded()['ports']['api']}"

    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.recorded()['ports']['sandbox']}"

    # -- environment ---------------------------------------------------------------------

    def environment(self, rec: dict[str, Any]) -> dict[str, str]:
        """The variables every process of the cluster (and a shell talking to it) needs."""
        from leadsync.cli import sandbox_connections

        ports = rec["ports"]
        api = f"http://127.0.0.1:{ports['api']}"
        airflow_db = self.db_url(self.airflow_db)
        state_conn = json.dumps({"conn_type": "generic",
                                 "extra": {"sqlalchemy_url": self.db_url(self.state_db)}})
        env = {
            "LEADSYNC_HOME": str(self.home.parent),
            "AIRFLOW_HOME": str(self.home / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_DIR / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_DIR / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": rec["fernet_key"],
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_db,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(ports["api"]),
            "AIRFLOW__API__BASE_URL": api,
            "AIRFLOW__API__SECRET_KEY": rec["api_secret"],
            "AIRFLOW__API_AUTH__JWT_SECRET": rec["jwt_secret"],
            "AIRFLOW__CELERY__BROKER_URL": self.redis_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + airflow_db,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(WORKER_CONCURRENCY),
            # One task reserved per free slot: a task is never parked behind a busy worker.
            "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": f"ls{self.ident}:",
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "21600",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # Calls from tasks to the API server: a busy machine answers slower than 5 s.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
            **{k: v for k, v in sandbox_connections(self.sandbox_url_from(rec)).items()},
            "AIRFLOW_CONN_LEADSYNC_STATE": state_conn,
        }
        if not self.celery:  # the scheduler runs as many tasks as the workers' slots together
            env["AIRFLOW__CORE__PARALLELISM"] = str(max(self.workers, 1) * WORKER_CONCURRENCY)
        if "LEADSYNC_CONFIG" in os.environ:
            env["LEADSYNC_CONFIG"] = os.environ["LEADSYNC_CONFIG"]
        env.update(self.extra_env)
        return env

    @staticmethod
    def sandbox_url_from(rec: dict[str, Any]) -> str:
        return f"http://127.0.0.1:{rec['ports']['sandbox']}"

    def process_env(self, rec: dict[str, Any], extra: dict[str, str] | None = None
                    ) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not (k.startswith(("AIRFLOW__", "AIRFLOW_CONN_")) or k == "AIRFLOW_HOME")}
        env.update(self.environment(rec))
        env.update(extra or {})
        # The venv's commands first, so `airflow` and `celery` are the pinned ones.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    # -- databases -----------------------------------------------------------------------

    @property
    def template_db(self) -> str:
        """A migrated, never-used Airflow metadata database per Airflow version: new clusters
        are created from it (``CREATE DATABASE … TEMPLATE``) in a second instead of running
        the migrations (a minute on a busy machine) every time."""
        from importlib.metadata import version

        return "leadsync_airflow_tpl_" + hashlib.sha256(
            version("apache-airflow").encode()).hexdigest()[:8]

    def create_databases(self, env: dict[str, str] | None = None) -> None:
        """Creates the Airflow metadata database (from the migrated template) and the leadsync
        state database if missing. Concurrent starts serialise on an advisory lock."""
        from sqlalchemy import create_engine, text

        admin = create_engine(self.pg_admin_url, isolation_level="AUTOCOMMIT",
                              connect_args={"connect_timeout": 5})
        try:
            conn = admin.connect()
        except Exception as exc:  # noqa: BLE001 - reported as one line, never a traceback
            admin.dispose()
            raise ClusterError(f"Postgres at {_safe_url(self.pg_admin_url)}: "
                               f"{str(exc).splitlines()[0]}") from None
        try:
            conn.execute(text("SELECT pg_advisory_lock(hashtext('leadsync-cluster-template'))"))

            def exists(name: str) -> bool:
                return bool(conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                         {"n": name}).scalar())

            if not exists(self.airflow_db):
                template = self.template_db
                if not exists(template):
                    self._migrate_template(conn, template, env)
                conn.execute(text(f'CREATE DATABASE "{self.airflow_db}" TEMPLATE "{template}"'))
            if not exists(self.state_db):
                conn.execute(text(f'CREATE DATABASE "{self.state_db}"'))
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(hashtext('leadsync-cluster-template'))"))
            conn.close()
            admin.dispose()

    def _migrate_template(self, conn: Any, template: str, env: dict[str, str] | None) -> None:
        from sqlalchemy import text

        building = template + "_building"
        conn.execute(text(f'DROP DATABASE IF EXISTS "{building}"'))
        conn.execute(text(f'CREATE DATABASE "{building}"'))
        menv = dict(env or os.environ)
        menv["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = self.db_url(building)
        print("migrating a template Airflow metadata database (once per Airflow version, "
              "about a minute)…", flush=True)
        try:
            _run(["airflow", "db", "migrate"], menv, "airflow db migrate")
        except ClusterError:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{building}"'))
            raise
        conn.execute(text(f'ALTER DATABASE "{building}" RENAME TO "{template}"'))

    def drop_databases(self) -> None:
        """Drops both databases (tests; the cluster must be stopped)."""
        from sqlalchemy import create_engine, text

        admin = create_engine(self.pg_admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                for name in (self.airflow_db, self.state_db):
                    conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                      "WHERE datname = :n"), {"n": name})
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        finally:
            admin.dispose()

    def drop_broker_keys(self) -> int:
        """Deletes this cluster's keys from Redis (tests; the cluster must be stopped)."""
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=3)
        keys = list(client.scan_iter(match=f"ls{self.ident}:*", count=500))
        return int(client.delete(*keys)) if keys else 0

    def check_redis(self) -> None:
        import redis

        try:
            redis.Redis.from_url(self.redis_url, socket_connect_timeout=3).ping()
        except redis.RedisError as exc:
            raise ClusterError(f"Redis at {self.redis_url}: {exc}") from None

    # -- start / stop --------------------------------------------------------------------

    def start(self, timeout: float = 240.0, out: Any = None) -> dict[str, Any]:
        """Starts the cluster (or finds it running) and returns its record.

        Raises:
            ClusterError: Postgres or Redis unreachable, or a process that exits or an API
                server that does not answer within ``timeout`` (everything started is then
                stopped again).
        """
        say = _printer(out)
        running = self.alive()
        expected = self.recorded().get("processes", {})
        if running and len(running) == len(expected) and self._api_healthy(self.api_url()):
            say(f"the cluster is already running ({len(running)} processes)")
            self.write_env_file(self.recorded())
            self.print_access(say)
            return self.recorded()
        if running:
            say("a previous cluster is partly running; stopping it first")
            self.stop(out=out)
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        if self.celery:
            self.check_redis()
        old = self.recorded()
        rec: dict[str, Any] = {
            "fernet_key": old.get("fernet_key") or _fernet_key(),
            "jwt_secret": old.get("jwt_secret") or secrets.token_urlsafe(64),
            "api_secret": old.get("api_secret") or secrets.token_urlsafe(32),
            "ports": {"api": free_port(), "sandbox": free_port()},
            "processes": {},
        }
        passwords = self.home / "passwords.json"
        if not passwords.exists():
            passwords.write_text(json.dumps({ADMIN_USER: secrets.token_urlsafe(12)}))
            passwords.chmod(0o600)
        env = self.process_env(rec)
        self.create_databases(env)
        self._write_record(rec)
        try:
            pools = self._import_pools(env)
            self._spawn(rec, "sandbox", [sys.executable, "-m", "leadsync.cli", "sandbox",
                                         "--port", str(rec["ports"]["sandbox"]),
                                         "--store", str(self.home / "sandbox.db")], env)
            # Every process shares this machine's log folder: no log server (they would listen
            # on every interface) for the triggerer and the workers.
            self._spawn(rec, "api-server", ["airflow", "api-server"], env)
            self._spawn(rec, "dag-processor", ["airflow", "dag-processor"], env)
            self._spawn(rec, "triggerer", ["airflow", "triggerer", "--skip-serve-logs"], env)
            for i in range(1, self.workers + 1 if self.celery else 1):
                name = f"worker{i}"
                wenv = {**env,
                        # Which worker ran a task shows in the task instance's hostname.
                        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "leadsync.cluster.worker_hostname",
                        "LEADSYNC_CLUSTER_WORKER": name}
                self._spawn(rec, name, ["airflow", "celery", "worker", "--concurrency",
                                        str(WORKER_CONCURRENCY), "--celery-hostname",
                                        f"{name}-{self.ident}@%h", "--without-mingle",
                                        "--without-gossip", "--skip-serve-logs"], wenv)
            self._wait_healthy(rec, timeout, say)
            # Tasks are dispatched only once the API server they report to answers.
            self._spawn(rec, "scheduler", ["airflow", "scheduler", "--skip-serve-logs"], env)
            if pools.wait(timeout=timeout) != 0:
                raise ClusterError("setting the pools failed:\n"
                                   + _tail(self.log_dir / "pools.log"))
        except BaseException:
            self.stop(out=out)
            raise
        self.write_env_file(rec)
        self.print_access(say)
        return rec

    def _import_pools(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Sets one pool per destination (its slots cap concurrent requests to the platform),
        in the background while the other processes start."""
        pools = {dest.pool: {"slots": dest.pool_slots,
                             "description": f"leadsync: shares the {dest.name} API rate limit",
                             "include_deferred": False}
                 for dest in get_config().destinations}
        path = self.home / "pools.json"
        path.write_text(json.dumps(pools, indent=2))
        log = (self.log_dir / "pools.log").open("wb")
        proc = subprocess.Popen(["airflow", "pools", "import", str(path)],  # noqa: S603, S607
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        log.close()
        return proc

    def _spawn(self, rec: dict[str, Any], name: str, cmd: list[str],
               env: dict[str, str]) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,  # noqa: S603
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=str(self.home))
        log.close()
        rec["processes"][name] = {"pid": proc.pid, "start_ticks": _proc_start_ticks(proc.pid),
                                  "log": str(self.log_dir / f"{name}.log")}
        self._write_record(rec)

    def _write_record(self, rec: dict[str, Any]) -> None:
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=2))
        tmp.chmod(0o600)
        tmp.replace(self.pid_file)

    def _wait_healthy(self, rec: dict[str, Any], timeout: float, say: Any) -> None:
        api = f"http://127.0.0.1:{rec['ports']['api']}"
        say(f"starting {len(rec['processes'])} processes (logs in {self.log_dir})…")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in rec["processes"].items() if not _running(p)]
            if dead:
                name = dead[0]
                tail = _tail(Path(rec["processes"][name]["log"]))
                raise ClusterError(f"{name} exited during start-up; last lines of its log:\n"
                                   f"{tail}")
            if self._api_healthy(api):
                return
            time.sleep(1)
        raise ClusterError(f"the API server did not answer at {api} within {timeout:.0f} s "
                           f"(see {self.log_dir / 'api-server.log'})")

    @staticmethod
    def _api_healthy(api: str) -> bool:
        import requests

        try:
            return requests.get(f"{api}/api/v2/monitor/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self, timeout: float = 15.0, out: Any = None) -> list[str]:
        """Stops exactly the processes the last ``start`` recorded (their whole trees), and
        returns their names; a cluster that is not running is left as it is."""
        say = _printer(out)
        alive = self.alive()
        if not alive:
            say("the cluster is not running")
            self.pid_file.unlink(missing_ok=True)
            return []
        trees = {name: process_tree(pid) for name, pid in alive.items()}
        for pids in trees.values():
            _signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_exists(p) for t in trees.values() for p in t):
            time.sleep(0.3)
        for pids in trees.values():
            _signal_all(pids, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        say(f"stopped {', '.join(sorted(alive))}")
        return sorted(alive)

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILLs a worker and every process under it, at once (a machine lost mid-task)."""
        pid = self.alive()[name]
        tree = process_tree(pid)
        _signal_all(tree, signal.SIGKILL)
        return tree

    # -- access --------------------------------------------------------------------------

    def write_env_file(self, rec: dict[str, Any]) -> None:
        """``env.sh``: exports so that ``airflow …`` and ``leadsync …`` talk to this cluster."""
        env = self.environment(rec)
        lines = ["# Written by `make cluster`: `. " + str(self.env_file) + "` makes `airflow`",
                 "# and `leadsync` commands in this shell talk to the local cluster.",
                 f'export PATH="{Path(sys.executable).parent}:$PATH"']
        lines += [f"export {k}={_sh_quote(v)}" for k, v in sorted(env.items())]
        self.env_file.write_text("\n".join(lines) + "\n")
        self.env_file.chmod(0o600)

    def password(self) -> str:
        return str(json.loads((self.home / "passwords.json").read_text())[ADMIN_USER])

    def print_access(self, say: Any) -> None:
        rec = self.recorded()
        say(f"Airflow UI: http://127.0.0.1:{rec['ports']['api']}  "
            f"(login {ADMIN_USER} / {self.password()})")
        say(f"platform sandbox: {self.sandbox_url_from(rec)}")
        say(f"in a shell: . {self.env_file}   then e.g. `airflow dags trigger leadsync_meta`")
        say("stop it with: make cluster-stop")

    def token(self) -> str:
        """A JWT for the REST API (``Authorization: Bearer …``)."""
        import requests

        resp = requests.post(f"{self.api_url()}/auth/token",
                             json={"username": ADMIN_USER, "password": self.password()},
                             timeout=10)
        resp.raise_for_status()
        return str(resp.json()["access_token"])


def worker_hostname() -> str:
    """The hostname a task instance records: the worker's name in the local cluster, so the
    UI and the tests see which worker ran each task (both run on this one machine)."""
    name = os.environ.get("LEADSYNC_CLUSTER_WORKER")
    return name or socket.getfqdn()


def _printer(out: Any) -> Callable[[str], None]:
    def say(msg: str) -> None:
        print(msg, file=out or sys.stdout, flush=True)

    return say


def _running(proc: dict[str, Any]) -> bool:
    """Whether a recorded process still runs: same pid, same start time, not a zombie."""
    pid = int(proc["pid"])
    return _proc_start_ticks(pid) == proc["start_ticks"] and _proc_state(pid) not in "ZX"


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_start_ticks(pid)
    return stat is not None and _proc_state(pid) != "Z"


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise ClusterError(f"{what} failed:\n{tail}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def iter_lines(path: Path) -> Iterator[str]:
    """The lines of a log file (empty when it does not exist)."""
    try:
        yield from path.read_text(errors="replace").splitlines()
    except OSError:
        return


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m leadsync.cluster start|stop|status``."""
    parser = argparse.ArgumentParser(prog="python -m leadsync.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command",
                        choices=["start", "stop", "status", "ui", "compose-init", "seed-demo"])
    args = parser.parse_args(argv)
    try:
        cluster = Cluster.default()
        if args.command == "start":
            _ensure_warehouse()
            cluster.start()
        elif args.command == "stop":
            cluster.stop()
        elif args.command == "ui":
            return ui()
        elif args.command == "compose-init":
            compose_init()
        elif args.command == "seed-demo":
            _ensure_warehouse()
        else:
            alive = cluster.alive()
            print(json.dumps({"running": sorted(alive)}))
            return 0 if alive else 1
    except ClusterError as exc:
        print(f"leadsync cluster: {exc}", file=sys.stderr)
        return 2
    return 0


def ui(port: int | None = None) -> int:
    """Serves the Airflow UI over the demo's own Airflow home (API server, scheduler on the
    LocalExecutor, dag-processor, triggerer), in the foreground until Ctrl+C, with the platform
    sandbox and its connections, so the demo's DAGs and runs show and a run triggered from the
    UI works too. Like ``airflow standalone``, except that nothing listens beyond loopback:
    every component shares this machine's log folder, so no log server runs."""
    from leadsync.cli import (
        SANDBOX_META_PIXEL,
        SANDBOX_META_TOKEN,
        airflow_env,
        ensure_airflow_db,
        sandbox_connections,
    )
    from leadsync.sandbox.app import SandboxConfig
    from leadsync.sandbox.server import SandboxServer

    home = leadsync_home()
    env = airflow_env()
    airflow_home = Path(env["AIRFLOW_HOME"])
    if not (airflow_home / ".leadsync-initialised").exists():
        print("no demo yet: `make demo` first fills the UI with its runs", flush=True)
    ensure_airflow_db(env)
    passwords = airflow_home / "ui-passwords.json"
    if not passwords.exists():
        passwords.write_text(json.dumps({ADMIN_USER: secrets.token_urlsafe(12)}))
        passwords.chmod(0o600)
    password = json.loads(passwords.read_text())[ADMIN_USER]
    port = port or free_port()
    api = f"http://127.0.0.1:{port}"
    log_dir = home / "ui-logs"
    log_dir.mkdir(exist_ok=True)
    sandbox_cfg = SandboxConfig(meta_tokens={SANDBOX_META_TOKEN}, meta_pixels={SANDBOX_META_PIXEL},
                                store_path=str(home / "sandbox.db"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with SandboxServer(sandbox_cfg) as sandbox:
        env.update(sandbox_connections(sandbox.url))
        env.update({
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": api,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        print(f"starting the Airflow UI over {airflow_home} (about a minute; logs in "
              f"{log_dir})…", flush=True)
        try:
            for name, args in (("api-server", ["api-server"]),
                               ("scheduler", ["scheduler", "--skip-serve-logs"]),
                               ("dag-processor", ["dag-processor"]),
                               ("triggerer", ["triggerer", "--skip-serve-logs"])):
                with (log_dir / f"{name}.log").open("ab") as log:
                    procs[name] = subprocess.Popen(  # noqa: S603
                        ["airflow", *args], env=env, stdout=log, stderr=subprocess.STDOUT,  # noqa: S607
                        stdin=subprocess.DEVNULL, start_new_session=True)
            while not Cluster._api_healthy(api):
                _check_alive(procs, log_dir)
                time.sleep(1)
            print(f"Airflow UI: {api}  (login {ADMIN_USER} / {password}); the demo's runs are "
                  f"under DAGs → leadsync_*; the sandbox is at {sandbox.url}. Ctrl+C stops it.",
                  flush=True)
            while True:
                _check_alive(procs, log_dir)
                time.sleep(1)
        except KeyboardInterrupt:
            return 0
        except ClusterError as exc:
            print(f"leadsync ui: {exc}", file=sys.stderr)
            return 2
        finally:
            trees = [process_tree(p.pid) for p in procs.values()]
            for tree in trees:
                _signal_all(tree, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
                time.sleep(0.3)
            for tree in trees:
                _signal_all(tree, signal.SIGKILL)
            for p in procs.values():
                p.wait()


def _check_alive(procs: dict[str, subprocess.Popen[bytes]], log_dir: Path) -> None:
    for name, proc in procs.items():
        if proc.poll() is not None:
            raise ClusterError(f"{name} exited; last lines of its log:\n"
                               f"{_tail(log_dir / f'{name}.log')}")


def compose_init() -> None:
    """docker-compose.yaml's airflow-init step (after the image's entrypoint migrated Airflow's
    database): creates leadsync's state database next to Airflow's if missing, and one pool
    per destination."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    state_conn = json.loads(os.environ["AIRFLOW_CONN_LEADSYNC_STATE"])
    name = state_conn["schema"]
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if not conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                {"n": name}).scalar():
                conn.execute(text(f'CREATE DATABASE "{name}"'))
                print(f"created the leadsync state database {name!r}")
    finally:
        engine.dispose()
    for dest in get_config().destinations:
        _run(["airflow", "pools", "set", dest.pool, str(dest.pool_slots),
              f"leadsync: shares the {dest.name} API rate limit"], dict(os.environ),
             f"pool {dest.pool}")
    print("leadsync: state database and pools ready")


def _ensure_warehouse() -> None:
    """Seeds the embedded demo warehouse if nothing else is configured and it is empty."""
    if os.environ.get("AIRFLOW_CONN_LEADSYNC_WAREHOUSE"):
        return
    from leadsync import demo_data
    from leadsync.db import make_engine

    engine = make_engine(f"sqlite:///{leadsync_home() / 'warehouse.db'}")
    leadsync_home().mkdir(parents=True, exist_ok=True)
    seeded = demo_data.seed(engine, 3000, datetime.now(UTC) - timedelta(minutes=1),
                            broken_rows=True)
    if seeded:
        print(f"seeded the embedded warehouse with {seeded} lead stage changes")
    engine.dispose()


if __name__ == "__main__":
    sys.exit(main())

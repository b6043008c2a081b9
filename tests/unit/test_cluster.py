"""The local cluster's bookkeeping, without starting Airflow: it stops exactly what it started,
never a process that merely reuses a recorded pid, and twice is the same as once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leadsync.cluster import Cluster, ClusterError, _proc_start_ticks, process_tree


def _record(cluster: Cluster, procs: dict[str, dict[str, object]]) -> None:
    cluster.home.mkdir(parents=True, exist_ok=True)
    cluster.pid_file.write_text(json.dumps({"ports": {"api": 1, "sandbox": 2},
                                            "processes": procs}))


def test_stop_kills_the_recorded_process_tree_and_is_idempotent(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "cluster")
    # A parent with a child, like a Celery worker and its pool process.
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time; subprocess.Popen([sys.executable, "
                               "'-c', 'import time; time.sleep(60)']); time.sleep(60)"],
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = process_tree(parent.pid)
        assert len(tree) == 2
        _record(cluster, {"worker1": {"pid": parent.pid,
                                      "start_ticks": _proc_start_ticks(parent.pid)}})
        assert cluster.alive() == {"worker1": parent.pid}
        assert cluster.stop(timeout=5, out=sys.stderr) == ["worker1"]
        parent.wait(timeout=5)
        assert all(_proc_start_ticks(pid) is None or _state(pid) == "Z" for pid in tree)
        assert not cluster.pid_file.exists()
        assert cluster.stop(out=sys.stderr) == []  # the second stop finds nothing to stop
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_reused_pid_is_not_ours(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "cluster")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = _proc_start_ticks(bystander.pid)
        assert ticks is not None
        # The record names this pid but another start time: a process that reused the pid.
        _record(cluster, {"scheduler": {"pid": bystander.pid, "start_ticks": ticks - 1}})
        assert cluster.alive() == {}
        assert cluster.stop(out=sys.stderr) == []
        assert bystander.poll() is None  # untouched
    finally:
        bystander.kill()
        bystander.wait()


def test_names_are_per_home(tmp_path: Path) -> None:
    a, b = Cluster(tmp_path / "a" / "cluster"), Cluster(tmp_path / "b" / "cluster")
    assert a.airflow_db != b.airflow_db and a.state_db != b.state_db
    assert a.airflow_db != a.state_db
    assert Cluster(tmp_path / "a" / "cluster").airflow_db == a.airflow_db


def test_env_file_points_a_shell_at_the_cluster(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "cluster")
    rec = {"ports": {"api": 41234, "sandbox": 41235}, "fernet_key": "f", "jwt_secret": "j'x",
           "api_secret": "a", "processes": {}}
    cluster.home.mkdir(parents=True)
    cluster.write_env_file(rec)
    assert cluster.env_file.stat().st_mode & 0o077 == 0  # secrets inside: owner only
    out = subprocess.run(["bash", "-c", f". {cluster.env_file} && env"], capture_output=True,
                         text=True, check=True).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:41234/execution/"
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == "j'x"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("/" + cluster.airflow_db)
    state = json.loads(env["AIRFLOW_CONN_LEADSYNC_STATE"])
    assert state["extra"]["sqlalchemy_url"].endswith("/" + cluster.state_db)
    assert json.loads(env["AIRFLOW_CONN_LEADSYNC_META"])["host"] == "http://127.0.0.1:41235"


def test_the_executor_is_celery_or_local(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rec = {"ports": {"api": 41234, "sandbox": 41235}, "fernet_key": "f", "jwt_secret": "j",
           "api_secret": "a", "processes": {}}
    monkeypatch.setenv("LEADSYNC_HOME", str(tmp_path))
    monkeypatch.setenv("LEADSYNC_CLUSTER_EXECUTOR", "local")
    local = Cluster.default()
    env = local.environment(rec)
    assert not local.celery and env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    # The scheduler runs as many tasks at once as the two Celery workers' slots together.
    assert env["AIRFLOW__CORE__PARALLELISM"] == "4"
    monkeypatch.delenv("LEADSYNC_CLUSTER_EXECUTOR")
    celery = Cluster.default()
    assert celery.celery and "AIRFLOW__CORE__PARALLELISM" not in celery.environment(rec)
    monkeypatch.setenv("LEADSYNC_CLUSTER_EXECUTOR", "kubernetes")
    with pytest.raises(ClusterError, match="LEADSYNC_CLUSTER_EXECUTOR must be celery or local"):
        Cluster.default()
    with pytest.raises(ClusterError, match="executor must be one of"):
        Cluster(tmp_path / "cluster", executor="SequentialExecutor")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"

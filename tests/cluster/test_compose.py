"""docker-compose.yaml, offline: valid against the Compose specification (the schema that
check-jsonschema vendors), and right where it matters — the executor, the secrets every
component must share, the mounts, the health checks, the start order and the .env contract."""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-worker", "airflow-triggerer", "airflow-init")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def test_valid_against_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor")
                         / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(compose)]
    assert errors == []


def test_the_schema_check_can_fail(compose: dict[str, Any]) -> None:
    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor")
                         / "compose-spec.json").read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["airflow-worker"]["healthcheck"]["intervall"] = "30s"
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))


def test_the_official_services_on_the_celery_executor(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(AIRFLOW_SERVICES) | {"postgres", "redis"} <= set(services)
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:"), name
        assert "@postgres/airflow" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], name
    assert services["airflow-worker"]["command"] == "celery worker"


def test_every_component_shares_the_secrets_and_finds_the_api_server(
        compose: dict[str, Any]) -> None:
    services = compose["services"]
    api_port = services["airflow-apiserver"]["ports"][0].rsplit(":", 1)[1]
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY",
                "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"):
        values = {services[name]["environment"][key] for name in AIRFLOW_SERVICES}
        assert len(values) == 1, f"{key} differs between services: {values}"
    secret = services["airflow-worker"]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", secret), "the JWT secret must come from .env"
    url = services["airflow-worker"]["environment"]["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
    assert url == f"http://airflow-apiserver:{api_port}/execution/"


def test_state_store_in_its_own_database(compose: dict[str, Any]) -> None:
    env = compose["services"]["airflow-worker"]["environment"]
    state = json.loads(env["AIRFLOW_CONN_LEADSYNC_STATE"])
    assert state["host"] == "postgres"
    assert state["schema"] != "airflow"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("/airflow")


def test_project_folders_are_mounted(compose: dict[str, Any]) -> None:
    for name in AIRFLOW_SERVICES:
        volumes = compose["services"][name]["volumes"]
        targets = {v.rsplit(":", 1)[1]: v.rsplit(":", 1)[0] for v in volumes}
        for folder in ("dags", "plugins", "include"):
            assert targets.get(f"/opt/airflow/{folder}", "").endswith(f"/{folder}"), (name, folder)
        assert compose["services"][name]["environment"]["PYTHONPATH"] == "/opt/airflow/include"
    assert (ROOT / "dags").is_dir() and (ROOT / "include" / "leadsync").is_dir()


def test_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", "airflow-apiserver", "airflow-scheduler",
                 "airflow-dag-processor", "airflow-worker", "airflow-triggerer"):
        assert services[name]["healthcheck"]["test"], name
    for name in AIRFLOW_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["redis"]["condition"] == "service_healthy", name
        if name != "airflow-init":
            assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
    assert services["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == \
        "service_healthy"
    assert services["airflow-init"]["environment"]["_AIRFLOW_DB_MIGRATE"] == "true"


def test_env_file_contract() -> None:
    """Every variable the compose file requires is in .env.example; .env is never committed."""
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    example = (ROOT / ".env.example").read_text()
    defined = set(re.findall(r"^(\w+)=", example, flags=re.M))
    assert required and required <= defined, required - defined
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_image_is_the_pinned_airflow() -> None:
    pinned = re.search(r"^apache-airflow==([\d.]+)$", (ROOT / "requirements.txt").read_text(),
                       flags=re.M)
    assert pinned
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"FROM apache/airflow:{pinned[1]}\n" in dockerfile
    assert "-r /requirements.txt" in dockerfile
    assert "apache-airflow-providers-celery==" in (ROOT / "requirements.txt").read_text()

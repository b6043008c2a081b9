"""Configuration: the bundled file loads, invalid files fail naming the key, durations parse."""

from __future__ import annotations

import copy
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from leadsync.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    get_config,
    load_config,
    parse_config,
    parse_duration,
)

VALID: dict[str, Any] = {
    "source": {"lookback": "2h", "settle_lag": "2m", "chunk_size": 500},
    "state": {"lease_ttl": "5m"},
    "destinations": [
        {
            "name": "meta",
            "type": "meta",
            "shape": "crm",
            "crm_name": "HubSpot",
            "stages": {"lead": "Lead", "won": "Converted"},
        }
    ],
}


def _data(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    data.update(changes)
    return data


def _dest(**changes: Any) -> dict[str, Any]:
    """VALID with the first destination changed (a value of None removes the key)."""
    data = copy.deepcopy(VALID)
    for key, value in changes.items():
        if value is None:
            data["destinations"][0].pop(key, None)
        else:
            data["destinations"][0][key] = value
    return data


def _error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "leadsync.yaml")
    return str(info.value)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "leadsync.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# -- the bundled file -----------------------------------------------------------------------


def test_bundled_config_loads() -> None:
    config = load_config(DEFAULT_CONFIG_PATH)

    assert isinstance(config, Config)
    meta = config.destination("meta")
    assert meta.type == "meta"
    assert meta.shape == "crm"
    assert meta.crm_name
    assert meta.stages["won"] == "Converted"
    assert set(meta.stages) == {"lead", "qualified", "sales_accepted", "won"}
    assert config.source.lookback == timedelta(hours=2)
    assert config.source.settle_lag == timedelta(minutes=2)
    assert config.state.lease_ttl == timedelta(minutes=5)
    assert meta.conn_id == "leadsync_meta"
    assert meta.dag_id == "leadsync_meta"
    # The query the bundled config points to exists and is readable.
    assert "FROM crm_lead_stages" in config.source.read_query()


def test_bundled_config_round_trips_through_parse_config() -> None:
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    assert parse_config(data) == load_config(DEFAULT_CONFIG_PATH)


def test_valid_minimal_config_gets_defaults() -> None:
    config = parse_config({"destinations": [VALID["destinations"][0]]})

    assert config.source.chunk_size == 5000
    assert config.state.lease_wait == timedelta(seconds=30)
    assert config.destinations[0].retry.attempts == 5


def test_unknown_destination_lookup_names_known_ones() -> None:
    config = parse_config(VALID)
    with pytest.raises(ConfigError, match=r"'tiktok'.*known: meta"):
        config.destination("tiktok")


def test_get_config_rereads_a_changed_file(tmp_path: Path) -> None:
    path = _write(tmp_path, yaml.safe_dump(VALID))
    first = get_config(path)
    assert get_config(path) is first  # cached

    changed = _dest(crm_name="Salesforce")
    path.write_text(yaml.safe_dump(changed), encoding="utf-8")
    later = time.time() + 5
    os.utime(path, (later, later))
    assert get_config(path).destination("meta").crm_name == "Salesforce"


# -- invalid files name the key -------------------------------------------------------------


def test_unknown_top_level_key() -> None:
    message = _error(_data(destinatons=[]))
    assert "destinatons" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_nested_key_names_its_path() -> None:
    message = _error(_data(source={"lookbak": "2h"}))
    assert "source.lookbak" in message


def test_unknown_destination_key_names_the_destination() -> None:
    message = _error(_dest(stage_map={"lead": "Lead"}))
    assert "destinations[0] (name=meta).stage_map" in message


@pytest.mark.parametrize("value", ["5 minutes", "soon", "-5m", "5", "", True, [1]])
def test_bad_duration_names_the_key(value: Any) -> None:
    message = _error(_data(source={"lookback": value}))
    assert "source.lookback" in message
    assert "duration" in message


def test_bad_duration_in_a_destination() -> None:
    message = _error(_dest(max_event_age="a week"))
    assert "destinations[0] (name=meta).max_event_age" in message


def test_bad_duration_in_retry() -> None:
    message = _error(_dest(retry={"backoff_max": "forever"}))
    assert "retry.backoff_max" in message


@pytest.mark.parametrize("name", ["Meta", "1meta", "meta-ads", "meta ads", "", "x" * 41])
def test_bad_destination_name(name: str) -> None:
    message = _error(_dest(name=name))
    assert "destinations[0]" in message
    assert ".name:" in message
    assert "lowercase" in message


def test_duplicate_destination_names() -> None:
    data = copy.deepcopy(VALID)
    data["destinations"].append(copy.deepcopy(data["destinations"][0]))
    message = _error(data)
    assert "'meta'" in message
    assert "twice" in message
    assert "destination" in message


def test_crm_shape_requires_crm_name() -> None:
    message = _error(_dest(crm_name=None))
    assert "destinations[0] (name=meta)" in message
    assert "crm_name" in message


def test_crm_shape_rejects_another_action_source() -> None:
    message = _error(_dest(action_source="website"))
    assert "action_source" in message
    assert "system_generated" in message


def test_crm_shape_accepts_system_generated() -> None:
    config = parse_config(_dest(action_source="system_generated"))
    assert config.destinations[0].action_source == "system_generated"


def test_unknown_action_source() -> None:
    message = _error(_dest(shape="website", action_source="carrier_pigeon", crm_name=None))
    assert "action_source" in message
    assert "carrier_pigeon" in message


def test_website_shape_needs_no_crm_name() -> None:
    config = parse_config(_dest(shape="website", crm_name=None, action_source="website"))
    assert config.destinations[0].shape == "website"


def test_unknown_destination_type() -> None:
    message = _error(_dest(type="myspace"))
    assert "destinations[0] (name=meta).type" in message


def test_empty_stages() -> None:
    message = _error(_dest(stages={}))
    assert "destinations[0] (name=meta).stages" in message


def test_blank_event_name_in_stages() -> None:
    message = _error(_dest(stages={"lead": "  "}))
    assert ".stages" in message
    assert "non-empty" in message


def test_missing_destinations() -> None:
    message = _error({"source": {"lookback": "1h"}})
    assert "destinations" in message


def test_empty_destination_list() -> None:
    message = _error(_data(destinations=[]))
    assert "destinations" in message


def test_chunk_size_out_of_range() -> None:
    message = _error(_data(source={"chunk_size": 0}))
    assert "source.chunk_size" in message


@pytest.mark.parametrize("data", [["a", "b"], "text", 3, None])
def test_non_mapping_top_level(data: Any) -> None:
    message = _error(data)
    assert "top level must be a mapping" in message


def test_non_mapping_top_level_from_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_empty_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "destinations: [\n  {name: meta\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid YAML" in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "cannot read config file" in str(info.value)
    assert str(path) in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file (works even when the tests run as root).
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)


def test_error_from_file_names_the_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, yaml.safe_dump(_data(source={"settle_lag": "later"})))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "source.settle_lag" in str(info.value)


def test_error_is_raised_without_pydantic_chain() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_dest(stages={}))
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_missing_query_file_names_the_key(tmp_path: Path) -> None:
    config = parse_config(_data(source={"query_file": str(tmp_path / "missing.sql")}))
    with pytest.raises(ConfigError, match=r"source\.query_file"):
        config.source.read_query()


def test_empty_query_file(tmp_path: Path) -> None:
    sql = tmp_path / "q.sql"
    sql.write_text("  ;\n", encoding="utf-8")
    config = parse_config(_data(source={"query_file": str(sql)}))
    with pytest.raises(ConfigError, match="is empty"):
        config.source.read_query()


def test_query_trailing_semicolon_is_dropped(tmp_path: Path) -> None:
    sql = tmp_path / "q.sql"
    sql.write_text("SELECT 1 AS x;\n", encoding="utf-8")
    config = parse_config(_data(source={"query_file": str(sql)}))
    assert config.source.read_query() == "SELECT 1 AS x"


# -- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("5m", timedelta(minutes=5)),
        ("2h", timedelta(hours=2)),
        ("7d", timedelta(days=7)),
        ("250ms", timedelta(milliseconds=250)),
        ("1.5h", timedelta(minutes=90)),
        (" 5 m ", timedelta(minutes=5)),
        ("0s", timedelta(0)),
        (30, timedelta(seconds=30)),
        (1.5, timedelta(seconds=1.5)),
        (0, timedelta(0)),
        (timedelta(minutes=3), timedelta(minutes=3)),
    ],
)
def test_durations_parse(value: Any, expected: timedelta) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize("value", ["5", "5 minutes", "m5", "-1s", -1, True, None, "1w", [5]])
def test_bad_durations_raise(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("text", [".inf", ".nan", "99999999999d", "1.0e+20"])
def test_infinite_or_huge_duration_is_a_config_error(tmp_path: Path, text: str) -> None:
    """YAML's .inf and absurd sizes overflowed timedelta and escaped as OverflowError."""
    body = yaml.safe_dump(_data(source={})).replace("source: {}", f"source: {{lookback: {text}}}")
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "source.lookback" in str(info.value)


def test_durations_in_config() -> None:
    config = parse_config(_data(
        source={"lookback": 3600, "settle_lag": "90s"},
        state={"lease_ttl": "7d", "lease_wait": "250ms"},
    ))
    assert config.source.lookback == timedelta(hours=1)
    assert config.source.settle_lag == timedelta(seconds=90)
    assert config.state.lease_ttl == timedelta(days=7)
    assert config.state.lease_wait == timedelta(milliseconds=250)

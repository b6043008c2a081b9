"""The data contract's row-level rules (the Great Expectations suite builds on these codes).

Each rule has a stable code; a row that breaks one is quarantined with that code and a short
detail that never contains the raw value of a personal identifier.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from leadsync.source import to_utc

MAX_ID_LENGTH = 128


def check_row(
    row: Mapping[str, Any], now: datetime, future_tolerance: timedelta = timedelta(minutes=5)
) -> tuple[str, str] | None:
    """The first rule a row breaks, as (rule code, detail), or None if it passes."""
    lead_id = row.get("lead_id")
    if lead_id is None or not str(lead_id).strip():
        return "missing_lead_id", "lead_id is null or empty"
    if len(str(lead_id)) > MAX_ID_LENGTH:
        return "bad_lead_id", f"lead_id longer than {MAX_ID_LENGTH} characters"
    stage = row.get("stage")
    if stage is None or not str(stage).strip():
        return "missing_stage", "stage is null or empty"
    if row.get("event_time") is None:
        return "missing_event_time", "event_time is null"
    event_time = to_utc(row.get("event_time"))
    if event_time is None:
        return "bad_event_time", "event_time is not a timestamp"
    if event_time > now + future_tolerance:
        return "future_event_time", "event_time is in the future"
    return None

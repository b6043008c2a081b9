"""
### leadsync reprocess — resend after a fix

Trigger manually (▶ *Trigger DAG* shows a form). For each chosen destination, under that
destination's lease (so it never overlaps a normal sync run):

- `dry_run` (default): plans and counts what would be sent; writes and sends nothing.
- `failed`: replays the dead letters (events the platform rejected), re-read from the
  warehouse so that your fix applies.
- `window`: resends every eligible event whose `event_time` is in the window (or whose lead is
  listed), **with the same event ids**: the platform deduplicates what it already has.

It never moves a destination's watermark, never sends an event outside the platform's age
window, and never resends a delivered event older than the platform's dedup window (that would
be counted twice). Use it after fixing upstream data, after an outage, or after a credentials fix.
Set a *test event code* to route the resent events to the platform's test tool first.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task

from leadsync.config import get_config

_NAMES = [d.name for d in get_config().destinations]

with DAG(
    dag_id="leadsync_reprocess",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["leadsync", "reprocess"],
    default_args={"retries": 0},
    params={
        "destinations": Param(
            _NAMES, type="array", items={"type": "string", "enum": _NAMES},
            title="Destinations", description="Which destinations to reprocess.",
        ),
        "mode": Param(
            "dry_run", type="string", enum=["dry_run", "failed", "window"], title="Mode",
            values_display={"dry_run": "Dry run: count only",
                            "failed": "Replay failed events (dead letters)",
                            "window": "Resend everything eligible in the window"},
        ),
        "window_start": Param(None, type=["null", "string"], format="date-time",
                              title="Window start (event_time, UTC)"),
        "window_end": Param(None, type=["null", "string"], format="date-time",
                            title="Window end (event_time, UTC)"),
        "lead_ids": Param(None, type=["null", "string"], title="Lead ids",
                          description="Optional: comma- or newline-separated CRM lead ids."),
        "test_event_code": Param(None, type=["null", "string"], title="Platform test code",
                                 description="Optional: route events to the test tool."),
    },
) as dag:

    @task
    def validate_request(**context: Any) -> list[str]:
        from airflow.sdk.exceptions import AirflowFailException

        from leadsync.reprocess import ReprocessParamsError, parse_request

        params = context["params"]
        try:
            parse_request(params)
        except ReprocessParamsError as exc:
            raise AirflowFailException(str(exc)) from None
        chosen = list(params.get("destinations") or [])
        unknown = sorted(set(chosen) - set(_NAMES))
        if unknown or not chosen:
            raise AirflowFailException(
                f"destinations: {unknown or 'none chosen'}; known: {', '.join(_NAMES)}")
        return chosen

    @task(map_index_template="{{ task.op_kwargs['destination'] }}")
    def reprocess_destination(destination: str, **context: Any) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        from leadsync.destinations.base import CredentialsError, FatalDestinationError
        from leadsync.reprocess import Reprocessor, parse_request
        from leadsync.tasks import pipeline_for

        req = parse_request(context["params"])
        run_id = f"reprocess__{context['run_id']}__{destination}"
        try:
            return Reprocessor(pipeline_for(destination)).run(req, run_id)
        except (CredentialsError, FatalDestinationError) as exc:
            raise AirflowFailException(str(exc)) from None

    reprocess_destination.expand(destination=validate_request())

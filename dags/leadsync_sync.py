"""
### leadsync: warehouse → ad platform conversion API

One DAG per destination in `include/leadsync.yaml` (dag_id `leadsync_<name>`). Each run:

1. **open_run** takes the destination's lease in the state store (two runs never interleave),
   and plans the window: from the watermark minus the lookback to now minus the settle lag.
2. **stage_events** streams the window from the warehouse, checks each row against the data
   contract (bad rows go to quarantine with a rule code), decides eligibility (stage mapped,
   consent, age window, match keys), hashes identifiers and writes outbox batches (hashed only).
3. **push_batch** (mapped, one task per outbox batch, older leftovers first) sends one request
   and records each event's outcome in the ledger.
4. **commit_watermark** moves the watermark past terminal rows only and frees the lease.

Rerunning is always safe: delivered events are never sent again, pending batches are resent
with the same event ids (the platform deduplicates). XCom carries run and batch ids and
counts only, never identifiers. To resend after fixing data, trigger `leadsync_reprocess`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, task
from airflow.timetables.trigger import CronTriggerTimetable

from leadsync.config import DestinationConfig, get_config


def build_dag(dest: DestinationConfig) -> DAG:
    """The sync DAG of one destination (wiring only; logic lives in include/leadsync)."""
    with DAG(
        dag_id=dest.dag_id,
        schedule=CronTriggerTimetable(dest.schedule, timezone="UTC"),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        doc_md=__doc__,
        tags=["leadsync", dest.type],
        default_args={
            "retries": 2,
            "retry_delay": timedelta(minutes=2),
            "retry_exponential_backoff": True,
            "pool": dest.pool,
        },
    ) as dag:

        @task
        def open_run(**context: Any) -> dict[str, Any]:
            from airflow.sdk.exceptions import AirflowSkipException

            from leadsync.state import LeaseBusyError
            from leadsync.tasks import pipeline_for

            try:
                return pipeline_for(dest.name).open_run(context["run_id"])
            except LeaseBusyError as exc:
                raise AirflowSkipException(str(exc)) from None

        @task
        def stage_events(run: dict[str, Any]) -> list[str]:
            from leadsync.tasks import pipeline_for

            return list(pipeline_for(dest.name).stage(run["run_id"])["batch_ids"])

        @task(retries=3)
        def push_batch(batch_id: str, **context: Any) -> dict[str, int]:
            from airflow.sdk.exceptions import AirflowFailException

            from leadsync.destinations.base import CredentialsError, FatalDestinationError
            from leadsync.tasks import pipeline_for

            try:
                return pipeline_for(dest.name).push(context["run_id"], batch_id)
            except (CredentialsError, FatalDestinationError) as exc:
                raise AirflowFailException(str(exc)) from None  # no retry: fix config first

        @task(trigger_rule="all_done")
        def commit_watermark(**context: Any) -> dict[str, Any]:
            from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

            from leadsync.tasks import pipeline_for

            pipeline = pipeline_for(dest.name)
            if pipeline.state.get_run(context["run_id"], dest.name) is None:
                raise AirflowSkipException("this run never opened (another run held the lease)")
            summary = pipeline.commit(context["run_id"])
            if summary["pending_batches"]:
                # The leaf task decides the run's colour: a run that left events pending is red.
                raise AirflowFailException(
                    f"{summary['pending_batches']} outbox batch(es) of {dest.name} are still "
                    "pending (see push_batch logs); the next run resends them with the same "
                    "event ids"
                )
            return summary

        run = open_run()
        batches = stage_events(run)  # type: ignore[arg-type]  # XComArg resolves at runtime
        pushed = push_batch.expand(batch_id=batches)
        batches >> pushed >> commit_watermark()
    return dag


for _dest in get_config().destinations:
    if _dest.enabled:
        globals()[_dest.dag_id] = build_dag(_dest)

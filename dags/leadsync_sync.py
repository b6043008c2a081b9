"""
### leadsync: warehouse → ad platform conversion API

One DAG per destination in `include/leadsync.yaml` (dag_id `leadsync_<name>`). Each run:

1. **open_run** takes the destination's lease in the state store (two runs never interleave),
   and plans the window: from the watermark minus the lookback to now minus the settle lag.
2. **check_contract** reads the window once: rows the ledger already settled (unchanged since)
   cost a key lookup; the others are validated against the data contract (a Great
   Expectations suite, batch by batch) and, meanwhile, eligibility is decided (stage mapped,
   consent, age window, match keys), identifiers hashed, and the rows that pass written to
   outbox batches held for this run (hashed only). Rows that break a rule go to quarantine
   with the rule's code, the counts per rule are in the log and the XCom, and the log says
   where the Data Docs are. Only when the whole window passed are the held batches released,
   and the task hands push the batches to send (this run's and older leftovers) and says how
   many lanes to start: one per pending batch, at most `push_lanes`. If the window is broken
   (a missing column, a column of the wrong type, or more failing rows than
   `contract.failure_threshold`), they are discarded, the task fails and nothing is sent.
3. **push_lane** (mapped over those lanes: a bounded number of task instances whatever the
   backlog, and none when nothing is pending) drains the pending outbox batches, older
   leftovers first: each lane claims one batch at a time atomically (two lanes or workers
   never send one batch), sends it through one HTTP session and records each event's
   outcome in the ledger.
4. **commit_watermark** moves the watermark past terminal rows only and frees the lease; after
   a failed contract check it only frees the lease (the watermark stays). A run that ends
   green emits an Asset event `leadsync://<name>` with its counts in `extra`; alerts
   configured under `alerts:` go out when a condition starts or ends.
5. **check_requests** (platforms that process asynchronously: Google Data Manager), alongside
   the steps after open_run, looks up the processing status of requests sent by earlier runs
   and records per-batch outcome counts in the state store and the run's counts.

Rerunning is always safe: delivered events are never sent again, pending batches are resent
with the same event ids (the platform deduplicates). XCom carries run and batch ids and
counts only, never identifiers. To resend after fixing data, trigger `leadsync_reprocess`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, task
from airflow.timetables.trigger import CronTriggerTimetable

from leadsync.config import DestinationConfig, get_config
from leadsync.destinations import has_request_status
from leadsync.monitor.assets import asset_uri


def build_dag(dest: DestinationConfig) -> DAG:
    """The sync DAG of one destination (wiring only; logic lives in include/leadsync)."""
    delivered = Asset(name=asset_uri(dest.name), uri=asset_uri(dest.name))
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
        def check_contract(run: dict[str, Any], **context: Any) -> list[int]:
            from airflow.sdk.exceptions import AirflowFailException

            from leadsync.quality import ContractViolation
            from leadsync.tasks import pipeline_for

            pipeline = pipeline_for(dest.name)
            try:
                report = pipeline.check(run["run_id"])
            except ContractViolation as exc:
                raise AirflowFailException(str(exc)) from None  # no retry: fix the source first
            # Handing push its batches is part of this task, not one of its own: a task
            # instance costs a process start and scheduling round trips on every run.
            staged = pipeline.stage(run["run_id"])
            # The contract's report under "contract", the run's counts (identifiers left out
            # of the events included) under "counts"; the lanes to push in are the return
            # value, which push_lane maps over.
            ti = context["ti"]
            ti.xcom_push(key="contract", value=report)
            ti.xcom_push(key="counts", value=staged["counts"])
            ti.xcom_push(key="batches", value=len(staged["batch_ids"]))
            return staged["lanes"]

        @task(retries=3)
        def push_lane(lane: int, **context: Any) -> dict[str, int]:
            from airflow.sdk.exceptions import AirflowFailException

            from leadsync.destinations.base import CredentialsError, FatalDestinationError
            from leadsync.tasks import pipeline_for

            try:
                return pipeline_for(dest.name).push_lane(context["run_id"], lane)
            except (CredentialsError, FatalDestinationError) as exc:
                raise AirflowFailException(str(exc)) from None  # no retry: fix config first

        @task(trigger_rule="all_done", outlets=[delivered])
        def commit_watermark(**context: Any) -> dict[str, Any]:
            from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

            from leadsync.alerts import alert_on_run
            from leadsync.monitor.assets import asset_extra, log_data_docs_link
            from leadsync.tasks import pipeline_for

            pipeline = pipeline_for(dest.name)
            if pipeline.state.get_run(context["run_id"], dest.name) is None:
                raise AirflowSkipException("this run never opened (another run held the lease)")
            summary = pipeline.commit(context["run_id"])
            alert_on_run(pipeline.config, pipeline.state, dest.name, context["run_id"])
            log_data_docs_link(pipeline.config, dest.name, context["run_id"])
            if summary["status"] in ("contract_failed", "check_failed"):
                raise AirflowFailException(
                    f"the data contract check of {dest.name} did not pass (see check_contract): "
                    "nothing was staged or sent by this run, the watermark stays at "
                    f"{summary['watermark_after']}, and the lease is released"
                )
            if summary["pending_batches"]:
                from leadsync.tasks import failed_tasks, pending_message

                # The leaf task decides the run's colour: a run that left events pending is red.
                raise AirflowFailException(pending_message(
                    dest.name, summary["pending_batches"], failed_tasks(context["ti"])))
            context["outlet_events"][delivered].extra = asset_extra(summary)
            return summary

        run = open_run()
        batches = check_contract(run)  # type: ignore[arg-type]  # XComArg resolves at runtime
        # One lane per pending batch, at most push_lanes; none (and no task process) when
        # nothing is pending.
        lanes = push_lane.expand(lane=batches)
        committed = commit_watermark()
        batches >> lanes >> committed

        if has_request_status(dest.type):

            @task
            def check_requests(run: dict[str, Any]) -> dict[str, int]:
                from leadsync.request_status import check_requests_for

                return check_requests_for(dest.name, run["run_id"])

            # A leaf beside commit_watermark (which decides the run's colour), not after it.
            check_requests(run)  # type: ignore[arg-type]
    return dag


for _dest in get_config().destinations:
    if _dest.enabled:
        globals()[_dest.dag_id] = build_dag(_dest)

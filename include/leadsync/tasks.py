"""What the DAGs' tasks call: builds a :class:`Pipeline` from Airflow connections.

Imported inside task functions only, so DAG files stay cheap to parse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from leadsync.config import get_config
from leadsync.pipeline import Pipeline
from leadsync.state import StateStore


def pipeline_for(destination: str) -> Pipeline:
    """The pipeline of one destination, wired to the connections named in the config."""
    from leadsync.hooks import LeadsyncDatabaseHook, LeadsyncDestinationHook

    config = get_config()
    dest = config.destination(destination)
    state = StateStore(LeadsyncDatabaseHook(config.state.connection_id, "state").get_engine())
    warehouse = LeadsyncDatabaseHook(config.source.connection_id, "warehouse").get_engine()
    hook = LeadsyncDestinationHook(dest.conn_id, dest.type)

    def credentials() -> Any:
        return hook.credentials

    return Pipeline(config, dest, state, warehouse, credentials=credentials)


def failed_tasks(ti: Any) -> list[str] | None:
    """The tasks of ``ti``'s DAG run that failed (``push_lane_1``, ``check_contract``), as
    Airflow's execution API reports them; ``None`` when it cannot say."""
    try:
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id, {})
    except Exception:  # noqa: BLE001 - only the wording of a message depends on it
        return None
    return sorted(task for task, state in states.items() if state == "failed")


def pending_message(destination: str, pending: int, failed: Sequence[str] | None) -> str:
    """Why a run that left outbox batches pending is red, naming the tasks that failed."""
    head = f"{pending} outbox batch(es) of {destination} are still pending"
    tail = "; the next run resends them with the same event ids"
    if failed is None:
        return f"{head} (see this run's task logs){tail}"
    if failed:
        return f"{head}: {', '.join(failed)} failed (see its log){tail}"
    return (f"{head} although no task of this run failed (the platform deferred some events, "
            f"or a lane's claim has not expired yet){tail}")

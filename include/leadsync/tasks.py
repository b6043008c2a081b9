"""What the DAGs' tasks call: builds a :class:`Pipeline` from Airflow connections.

Imported inside task functions only, so DAG files stay cheap to parse.
"""

from __future__ import annotations

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

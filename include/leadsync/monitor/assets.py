"""The Asset event each sync run emits: ``leadsync://<destination>`` with the run's counts.

Downstream DAGs can be scheduled on a destination having delivered; the Assets view of the
Airflow UI shows the history. The event's ``extra`` carries counts and the watermark's time
only, never identifiers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from leadsync.config import Config

log = logging.getLogger(__name__)

# The counters of a run that the event carries (missing ones are 0).
ASSET_COUNTS = ("delivered", "failed", "expired", "skipped", "quarantined")


def asset_uri(destination: str) -> str:
    """The Asset URI (and name) of a destination."""
    return f"leadsync://{destination}"


def asset_extra(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The event's ``extra`` from :meth:`Pipeline.commit`'s summary: the run's counts and the
    watermark's ``updated_at`` (its lead id and stage stay in the state store)."""
    counts = summary.get("counts") or {}
    extra: dict[str, Any] = {key: int(counts.get(key, 0)) for key in ASSET_COUNTS}
    watermark = summary.get("watermark_after") or {}
    extra["watermark"] = str(watermark["updated_at"]) if watermark.get("updated_at") else None
    extra["run_status"] = str(summary.get("status", ""))
    return extra


def log_data_docs_link(config: Config, destination: str, run_id: str) -> None:
    """Logs where the Airflow UI serves this run's Data Docs (the Conversions plugin), so the
    commit task's log links to them whichever worker wrote them (on shared storage)."""
    from airflow.sdk.configuration import conf

    from leadsync.monitor.status import data_docs_link

    base = conf.get("api", "base_url", fallback=None)
    link = data_docs_link(config.contract.data_docs_path(), destination, run_id, base)
    if link:
        log.info("Data Docs of this run in the Airflow UI: %s", link)

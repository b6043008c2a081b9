"""The leadsync Airflow plugin: the Conversions pages and ``/leadsync/api/status`` in the
Airflow UI (a FastAPI app mounted by the API server, shown through an external view).

Thin on purpose: the pages live in ``leadsync.monitor``. Every route requires an Airflow user
with read access to DAG runs (Airflow's own FastAPI security dependencies): the UI's session
cookie or an API token (``POST /auth/token``); without one the answer is 401/403, never data.
The app is built on its first request, so task processes, which import plugins too, stay fast.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from leadsync.monitor.plugin import MOUNT, LazyApp, airflow_app


class LeadsyncPlugin(AirflowPlugin):
    """Registers the Conversions app and its entry in the UI's navigation."""

    name = "leadsync"
    fastapi_apps = [{"app": LazyApp(airflow_app), "url_prefix": MOUNT,
                     "name": "leadsync conversions"}]
    external_views = [{"name": "Conversions", "href": f"{MOUNT}/", "url_route": "leadsync",
                       "destination": "nav", "category": "browse"}]

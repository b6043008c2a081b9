"""What ``plugins/leadsync_plugin.py`` registers, importable cheaply: Airflow imports plugin
modules in every task process too, so nothing here imports FastAPI or the API server until
the first request reaches the API server."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

MOUNT = "/leadsync"  # where the API server mounts the app; the UI's external view points here


def airflow_app() -> Any:
    """The app behind Airflow's own FastAPI security dependencies: every route needs a user
    allowed to read DAG runs (the UI's session cookie or a ``POST /auth/token`` bearer
    token); without one the answer is 401/403. Imports the API server's security module, so
    it is called in the API server only (see :class:`LazyApp`)."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from fastapi import Depends

    from leadsync.monitor.app import create_app

    return create_app(dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))])


class LazyApp:
    """An ASGI app that builds the real one on its first request.

    Airflow imports every plugin module in each task process too (to integrate macros and
    listeners); building the app there would import the API server's security module (≈6 s
    on a busy machine) for nothing. The API server mounts this object; the first request
    builds the app once.
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._app: Any = None
        self._lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = self._factory()
        await self._app(scope, receive, send)

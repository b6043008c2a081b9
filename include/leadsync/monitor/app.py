"""The Conversions pages and the status API as a FastAPI app (the plugin in ``plugins/`` mounts
it in Airflow's API server at ``/leadsync``, behind Airflow's own authentication).

``create_app`` takes the auth dependencies from its caller, so the app itself imports nothing
of Airflow's server and can be tested alone; every route sits behind them (the app is built
with them as app-wide dependencies, and has no unauthenticated docs or OpenAPI routes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from leadsync.config import Config, get_config
from leadsync.monitor import pages, status
from leadsync.monitor.plugin import MOUNT
from leadsync.state import StateStore

TOTALS = ("delivered", "pending", "failed", "expired", "skipped", "quarantined")


@lru_cache(maxsize=4)
def _store_for(url: str) -> StateStore:
    from leadsync.db import make_engine

    store = StateStore(make_engine(url))
    store.migrate()
    return store


def default_store() -> StateStore:
    """The state store named by the config's ``state.connection_id`` (one engine per URL)."""
    from leadsync.hooks import LeadsyncDatabaseHook

    return _store_for(LeadsyncDatabaseHook(get_config().state.connection_id, "state").url)


def _lag(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def create_app(
    dependencies: Sequence[Any] = (),
    store_factory: Callable[[], StateStore] = default_store,
    config_factory: Callable[[], Config] = get_config,
) -> FastAPI:
    """The app; ``dependencies`` (FastAPI ``Depends``) guard every route."""
    app = FastAPI(title="leadsync", dependencies=list(dependencies), docs_url=None,
                  redoc_url=None, openapi_url=None)

    def airflow_root(request: Request) -> str:
        # The app is mounted at <airflow base>/leadsync: the Airflow UI's root is above it.
        return str(request.scope.get("root_path", "")).removesuffix(MOUNT)

    def run_url(request: Request, dag_id: str, run_id: str) -> str:
        return f"{airflow_root(request)}/dags/{dag_id}/runs/{quote(run_id, safe='')}"

    def state() -> StateStore:
        try:
            return store_factory()
        except SQLAlchemyError:
            raise HTTPException(503, "the leadsync state store is unreachable") from None

    def chosen(config: Config, destination: str | None) -> list[Any]:
        dests = [d for d in config.destinations if d.enabled]
        if destination:
            dests = [d for d in dests if d.name == destination]
            if not dests:
                raise HTTPException(404, f"no destination named {destination!r}")
        return dests

    def base_context(request: Request, title: str, destination: str | None,
                     run_id: str | None) -> dict[str, Any]:
        config = config_factory()
        query = []
        if destination:
            query.append(f"destination={quote(destination)}")
        if run_id:
            query.append(f"run={quote(run_id, safe='')}")
        context: dict[str, Any] = {
            "root": airflow_root(request) + MOUNT, "title": title,
            "destination": destination or "", "run_id": run_id,
            "q": ("?" + "&".join(query)) if query else "",
        }
        if run_id and destination:
            context["airflow_run_url"] = run_url(request, config.destination(destination).dag_id,
                                                 run_id)
        elif run_id:
            context["airflow_run_url"] = f"{airflow_root(request)}/dag_runs"
        return context

    @app.get("/api/status")
    def api_status() -> JSONResponse:
        config = config_factory()
        names = [d.name for d in config.destinations if d.enabled]
        return JSONResponse(status.status(state(), names))

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request, destination: str | None = None) -> HTMLResponse:
        config = config_factory()
        store = state()
        dests = chosen(config, destination)
        now = datetime.now(UTC)
        summary = status.status(store, [d.name for d in dests], now, runs_limit=30)
        docs_dir = config.contract.data_docs_path()
        root = airflow_root(request) + MOUNT
        view = []
        for dest in dests:
            entry = summary["destinations"][dest.name]
            runs = entry["last_runs"]
            docs = status.data_docs_pages(docs_dir, dest.name, [r["run_id"] for r in runs])
            for run in runs:
                run["airflow_url"] = run_url(request, dest.dag_id, run["run_id"])
                page = docs.get(run["run_id"])
                run["data_docs"] = f"{root}/data-docs/{quote(page)}" if page else None
            coverage = store.run_coverage(dest.name, limit=10)
            view.append({
                "name": dest.name, "type": dest.type, "dag_id": dest.dag_id,
                "dag_url": f"{airflow_root(request)}/dags/{dest.dag_id}",
                "watermark": (entry["watermark"] or {}).get("updated_at"),
                "lag": _lag(entry["watermark_lag_seconds"]),
                "totals": {k: entry[k] for k in TOTALS},
                "last_run": runs[0] if runs else None,
                "runs": runs, "chart": pages.runs_chart(runs),
                "coverage": coverage,
                "coverage_keys": sorted({k for c in coverage for k in c["shares"]}),
                "requests": status.platform_request_status(store, dest.name, limit=10),
            })
        html = pages.render("overview", destinations=view, totals_keys=TOTALS,
                            run_keys=status.RUN_COUNTS,
                            **base_context(request, "Conversions", destination, None))
        return HTMLResponse(html)

    def table_page(request: Request, title: str, destination: str | None, run: str | None,
                   columns: Sequence[str],
                   rows: Callable[[StateStore, str, str | None], list[dict[str, Any]]],
                   summary: Callable[[StateStore, str, str | None], list[dict[str, Any]]]
                   | None = None) -> HTMLResponse:
        config = config_factory()
        store = state()
        view = [{"name": d.name, "rows": rows(store, d.name, run or None),
                 "summary": summary(store, d.name, run or None) if summary else []}
                for d in chosen(config, destination)]
        html = pages.render("table", destinations=view, columns=columns,
                            **base_context(request, title, destination, run or None))
        return HTMLResponse(html)

    @app.get("/quarantine", response_class=HTMLResponse)
    def quarantine_page(request: Request, destination: str | None = None,
                        run: str | None = None) -> HTMLResponse:
        return table_page(request, "Quarantine by rule", destination, run,
                          ("lead_id", "stage", "rule", "run_id", "last_seen"),
                          lambda s, d, r: status.quarantine_entries(s, d, r),
                          lambda s, d, r: status.quarantine_by_rule(s, d, r))

    @app.get("/dead-letters", response_class=HTMLResponse)
    def dead_letters_page(request: Request, destination: str | None = None,
                          run: str | None = None) -> HTMLResponse:
        return table_page(request, "Dead letters", destination, run,
                          ("lead_id", "stage", "event_name", "reason", "message", "run_id",
                           "attempts", "updated_at"),
                          lambda s, d, r: status.dead_letters(s, d, r))

    @app.get("/pending", response_class=HTMLResponse)
    def pending_page(request: Request, destination: str | None = None,
                     run: str | None = None) -> HTMLResponse:
        return table_page(request, "Pending batches", destination, run,
                          ("batch_id", "run_id", "events", "attempts", "last_error",
                           "created_at"),
                          lambda s, d, r: status.pending_batches(s, d, r))

    @app.get("/data-docs/{path:path}")
    def data_docs(path: str) -> FileResponse:
        root = config_factory().contract.data_docs_path().resolve()
        target = (root / path).resolve()
        # Only files inside the Data Docs directory, never a hidden store (.results JSON).
        if (not target.is_relative_to(root) or not target.is_file()
                or any(part.startswith(".") for part in target.relative_to(root).parts)):
            raise HTTPException(404, "no such Data Docs page")
        return FileResponse(target)

    return app



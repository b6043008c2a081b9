"""leadsync's connection types, registered the way Airflow providers register theirs.

``pyproject.toml`` declares an ``apache_airflow_provider`` entry point that returns
:func:`get_provider_info`: one connection type per destination type (``leadsync_meta``,
``leadsync_tiktok``, ``leadsync_google_datamanager``, ``leadsync_google_ads``), each with its
real fields (``conn-fields``, stored in the connection's extra under their own names, which is
what the destination modules read) and the standard fields it does not use hidden or
relabelled (``ui-field-behaviour``). These are the declarative forms Airflow 3.2+ reads
without importing the hooks; the older ``get_connection_form_widgets`` /
``get_ui_field_behaviour`` hook methods are deprecated there and need wtforms.

:func:`check_connection` backs the form's "Test" button: the module's own field check, then a
call that cannot change anything where the platform has one.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

PACKAGE = "leadsync"


def _text(label: str, description: str, default: str | None = None,
          secret: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": ["string", "null"]}
    if default is not None:
        schema["default"] = default
    if secret:
        schema["format"] = "password"
    return {"label": label, "description": description, "schema": schema}


def _flag(label: str, description: str) -> dict[str, Any]:
    return {"label": label, "description": description,
            "schema": {"type": ["boolean", "null"], "default": False}}


_GOOGLE_FIELDS = {
    "client_id": _text("OAuth client id", "With a refresh token: the OAuth client's id (the "
                       "client secret goes in Password)."),
    "refresh_token": _text("OAuth refresh token", "A refresh token of a user with access to "
                           "the Google Ads account.", secret=True),
    "quota_project_id": _text("Quota project id", "Sent as x-goog-user-project."),
    "validate_only": _flag("Validate only", "Google validates every request and ingests "
                           "nothing (a dry run)."),
}
_GOOGLE_BEHAVIOUR = {
    "hidden-fields": ["schema", "port", "login", "extra"],
    "relabeling": {"host": "API base URL (optional)",
                   "password": "Service-account key (JSON) or OAuth client secret"},
    "placeholders": {"host": "empty: Google's own URL"},
}

CONNECTION_TYPES: dict[str, dict[str, Any]] = {
    "meta": {
        "hook-name": "leadsync: Meta Conversions API",
        "conn-fields": {
            "pixel_id": _text("Pixel (dataset) id", "The Events Manager dataset the events "
                              "go to."),
            "api_version": _text("Graph API version", "e.g. v25.0", default="v25.0"),
            "test_event_code": _text("Test event code", "While set, events show in Events "
                                     "Manager → Test events only; remove it to go live."),
        },
        "ui-field-behaviour": {
            "hidden-fields": ["schema", "port", "login", "extra"],
            "relabeling": {"host": "Graph API base URL", "password": "Access token"},
            "placeholders": {"host": "https://graph.facebook.com"},
        },
    },
    "tiktok": {
        "hook-name": "leadsync: TikTok Events API",
        "conn-fields": {
            "event_source_id": _text("Event source id", "The CRM event set id (crm shape) or "
                                     "the pixel code (website shape)."),
            "test_event_code": _text("Test event code", "While set, events go to Events "
                                     "Manager's test view only."),
        },
        "ui-field-behaviour": {
            "hidden-fields": ["schema", "port", "login", "extra"],
            "relabeling": {"host": "Business API base URL", "password": "Access token"},
            "placeholders": {"host": "https://business-api.tiktok.com"},
        },
    },
    "google_datamanager": {
        "hook-name": "leadsync: Google Data Manager API",
        "conn-fields": dict(_GOOGLE_FIELDS),
        "ui-field-behaviour": _GOOGLE_BEHAVIOUR,
    },
    "google_ads": {
        "hook-name": "leadsync: Google Ads API (click conversions)",
        "conn-fields": {
            **_GOOGLE_FIELDS,
            "developer_token": _text("Developer token", "The Google Ads API developer token "
                                     "(optional since the 2026-09-09 sunset).", secret=True),
            "api_version": _text("API version", "e.g. v26", default="v26"),
        },
        "ui-field-behaviour": _GOOGLE_BEHAVIOUR,
    },
}

CONNECTION_TYPES["linkedin"] = {
    "hook-name": "leadsync: LinkedIn Conversions API",
    "conn-fields": {
        "api_version": _text("LinkedIn-Version", "YYYYMM, e.g. 202603 (the module's default "
                             "when empty)."),
    },
    "ui-field-behaviour": {
        "hidden-fields": ["schema", "port", "login", "extra"],
        "relabeling": {"host": "REST API base URL", "password": "Access token (rw_conversions)"},
        "placeholders": {"host": "https://api.linkedin.com"},
    },
}
CONNECTION_TYPES["snapchat"] = {
    "hook-name": "leadsync: Snap Conversions API",
    "conn-fields": {
        "pixel_id": _text("Snap Pixel id", "The pixel the events go to (a UUID)."),
        "test_mode": _flag("Test mode", "Events go to the test view only (the Test button "
                           "then sends one)."),
    },
    "ui-field-behaviour": {
        "hidden-fields": ["schema", "port", "login", "extra"],
        "relabeling": {"host": "Conversions API base URL", "password": "Conversions API token"},
        "placeholders": {"host": "https://tr.snapchat.com"},
    },
}

CONNECTION_TYPES["pinterest"] = {
    "hook-name": "leadsync: Pinterest Conversions API",
    "conn-fields": {
        "ad_account_id": _text("Ad account id", "The ad account the events go to (digits)."),
        "test": _flag("Test mode", "Pinterest validates the events and records none (the Test "
                      "button then sends one)."),
    },
    "ui-field-behaviour": {
        "hidden-fields": ["schema", "port", "login", "extra"],
        "relabeling": {"host": "API base URL", "password": "Conversions access token"},
        "placeholders": {"host": "https://api.pinterest.com"},
    },
}
CONNECTION_TYPES["reddit"] = {
    "hook-name": "leadsync: Reddit Conversions API",
    "conn-fields": {
        "pixel_id": _text("Pixel id", "The Reddit pixel the events go to."),
        "test_id": _text("Test id", "From Events Manager's test view: events go there only "
                         "(the Test button then sends one)."),
    },
    "ui-field-behaviour": {
        "hidden-fields": ["schema", "port", "login", "extra"],
        "relabeling": {"host": "API base URL", "password": "Conversions access token"},
        "placeholders": {"host": "https://ads-api.reddit.com"},
    },
}

HOOK_CLASSES = {"meta": "LeadsyncMetaHook", "tiktok": "LeadsyncTikTokHook",
                "google_datamanager": "LeadsyncGoogleDataManagerHook",
                "google_ads": "LeadsyncGoogleAdsHook", "linkedin": "LeadsyncLinkedInHook",
                "snapchat": "LeadsyncSnapchatHook", "pinterest": "LeadsyncPinterestHook",
                "reddit": "LeadsyncRedditHook"}


def conn_type(destination_type: str) -> str:
    """The Airflow connection type of a destination type."""
    return f"leadsync_{destination_type}"


def get_provider_info() -> dict[str, Any]:
    """The provider info of the ``apache_airflow_provider`` entry point."""
    return {
        "package-name": PACKAGE,
        "name": "leadsync",
        "description": "leadsync: converted leads from the warehouse to ad platforms' "
                       "conversion APIs (connection types per destination).",
        "versions": ["0.1.0"],
        "connection-types": [
            {"connection-type": conn_type(kind),
             "hook-class-name": f"leadsync.hooks.{HOOK_CLASSES[kind]}", **spec}
            for kind, spec in CONNECTION_TYPES.items()
        ],
    }


# -- test connection ----------------------------------------------------------------------


def _probe_row(stage: str, now: datetime) -> dict[str, Any]:
    """A synthetic lead for the probe (no real person; example.com is reserved)."""
    return {"lead_id": "leadsync-connection-test", "stage": stage,
            "event_time": now - timedelta(hours=1), "updated_at": now - timedelta(hours=1),
            "email": "connection-test@example.com", "country": "US",
            "ad_user_data": True, "ad_personalization": True}


def harmless_credentials(destination_type: str, creds: Any) -> Any | None:
    """``creds`` changed so that a request changes nothing at the platform, or None when the
    platform has no such mode for them: Google's ``validateOnly``; Meta's and TikTok's test
    event code and Snap's test mode (test events stay out of reporting and optimisation) when
    set. LinkedIn has none: its fields are checked only."""
    if destination_type in ("google_datamanager", "google_ads"):
        return dataclasses.replace(creds, validate_only=True)
    if (getattr(creds, "test_event_code", None) or getattr(creds, "test_mode", False)
            or getattr(creds, "test_id", None) or getattr(creds, "test", False) is True):
        return creds
    return None


def check_connection(conn_id: str, destination_type: str, creds: Any,
                    now: datetime | None = None) -> tuple[bool, str]:
    """Field check done (``creds`` parsed); sends one synthetic event in the platform's
    harmless mode when it has one, through the module's own request builder and parser."""
    from leadsync.config import get_config
    from leadsync.destinations import get_destination
    from leadsync.destinations.base import ResultKind
    from leadsync.destinations.http import HttpClient, TransportError
    from leadsync.pipeline import Planned, plan_row

    safe = harmless_credentials(destination_type, creds)
    if safe is None:
        hint = ("LinkedIn has no test mode" if destination_type == "linkedin"
                else "set a test event code / test mode to send a test event")
        return True, f"connection {conn_id!r}: fields are valid; no call made ({hint})"
    # The destination using this connection (the form tests under a transient id: then the
    # first destination of the type), for its stage mapping and account ids.
    candidates = [d for d in get_config().destinations if d.type == destination_type]
    dest = next((d for d in candidates if d.conn_id == conn_id),
                candidates[0] if candidates else None)
    if dest is None or not dest.stages:
        return True, (f"connection {conn_id!r}: fields are valid; no call made (no "
                      f"destination of type {destination_type} in the config uses it)")
    module = get_destination(destination_type)
    now = now or datetime.now(UTC)
    planned = plan_row(_probe_row(next(iter(dest.stages)), now), dest, module, now)
    if not isinstance(planned, Planned):
        return True, f"connection {conn_id!r}: fields are valid; no probe event could be built"
    request = module.build_request([planned.body], safe, dest)
    client = HttpClient(timeout=dest.retry.timeout.total_seconds())
    try:
        resp = client.send(request)
    except TransportError as exc:
        return False, f"connection {conn_id!r}: no answer from the platform ({exc})"
    finally:
        client.close()
    result = module.parse_response(resp.status, resp.body, resp.headers, 1)
    mode = "validate-only" if destination_type.startswith("google") else "test event code"
    if result.kind is ResultKind.OK:
        return True, f"connection {conn_id!r}: the platform accepted a {mode} request"
    return False, (f"connection {conn_id!r}: the platform refused a {mode} request "
                   f"(HTTP {resp.status}): {result.message}")

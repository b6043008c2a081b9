"""Airflow hooks: credentials and database URLs from Airflow connections.

Shaped like Airflow's provider hooks: four class attributes, an ``__init__`` that only stores
ids, and the connection read lazily once, with errors that name the connection and the field.
(We do not use ``HttpHook``: it would send every connection extra as an HTTP header.)
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from sqlalchemy import Engine

from leadsync.db import default_url, make_engine, url_from_fields
from leadsync.destinations import get_destination
from leadsync.destinations.base import CredentialsError


class LeadsyncDatabaseHook(BaseHook):
    """A SQLAlchemy engine from a connection; embedded SQLite when the connection is unset."""

    conn_name_attr = "leadsync_conn_id"
    default_conn_name = "leadsync_state"
    conn_type = "generic"
    hook_name = "leadsync database"

    def __init__(self, leadsync_conn_id: str = default_conn_name,
                 default_name: str = "state") -> None:
        super().__init__()
        self.leadsync_conn_id = leadsync_conn_id
        self.default_name = default_name

    @cached_property
    def url(self) -> str:
        """The SQLAlchemy URL (never logged: it may hold a password)."""
        try:
            conn = self.get_connection(self.leadsync_conn_id)
        except AirflowNotFoundException:
            return default_url(self.default_name)
        return url_from_fields(self.leadsync_conn_id, conn.conn_type, conn.host, conn.login,
                               conn.password, conn.schema, conn.port, conn.extra_dejson)

    def get_engine(self) -> Engine:
        """A new engine for :attr:`url`."""
        return make_engine(self.url)


class LeadsyncDestinationHook(BaseHook):
    """A destination's credentials, validated by its module's ``parse_credentials``."""

    conn_name_attr = "leadsync_conn_id"
    default_conn_name = "leadsync_meta"
    conn_type = "http"
    hook_name = "leadsync destination"

    def __init__(self, leadsync_conn_id: str = default_conn_name,
                 destination_type: str = "meta") -> None:
        super().__init__()
        self.leadsync_conn_id = leadsync_conn_id
        self.destination_type = destination_type

    @cached_property
    def credentials(self) -> Any:
        """The module's credentials object; errors say which connection field to fix."""
        try:
            conn = self.get_connection(self.leadsync_conn_id)
        except AirflowNotFoundException:
            raise CredentialsError(
                f"Airflow connection {self.leadsync_conn_id!r} is not defined; create it "
                "(see README, 'Connecting real platform accounts')"
            ) from None
        module = get_destination(self.destination_type)
        try:
            extra = conn.extra_dejson
        except Exception:  # noqa: BLE001 - malformed JSON in extra
            raise CredentialsError(
                f"connection {self.leadsync_conn_id!r}: field 'extra' is not valid JSON"
            ) from None
        try:
            return module.parse_credentials(conn.host, conn.password, extra)
        except CredentialsError as exc:
            raise CredentialsError(f"connection {self.leadsync_conn_id!r}: {exc}") from None


class _TypedDestinationHook(LeadsyncDestinationHook):
    """A destination hook bound to one destination type: the hook of a connection type."""

    destination_type_name = "meta"

    def __init__(self, leadsync_conn_id: str | None = None) -> None:
        super().__init__(leadsync_conn_id or self.default_conn_name, self.destination_type_name)

    def test_connection(self) -> tuple[bool, str]:
        """The form's "Test": field check, then a harmless call where the platform has one."""
        from leadsync.hooks.connections import check_connection

        try:
            creds = self.credentials
        except CredentialsError as exc:
            return False, str(exc)
        return check_connection(self.leadsync_conn_id, self.destination_type, creds)


class LeadsyncMetaHook(_TypedDestinationHook):
    """Connection type ``leadsync_meta``: Meta Conversions API."""

    conn_type = "leadsync_meta"
    hook_name = "leadsync: Meta Conversions API"
    default_conn_name = "leadsync_meta"
    destination_type_name = "meta"


class LeadsyncTikTokHook(_TypedDestinationHook):
    """Connection type ``leadsync_tiktok``: TikTok Events API."""

    conn_type = "leadsync_tiktok"
    hook_name = "leadsync: TikTok Events API"
    default_conn_name = "leadsync_tiktok"
    destination_type_name = "tiktok"


class LeadsyncGoogleDataManagerHook(_TypedDestinationHook):
    """Connection type ``leadsync_google_datamanager``: Google Data Manager API."""

    conn_type = "leadsync_google_datamanager"
    hook_name = "leadsync: Google Data Manager API"
    default_conn_name = "leadsync_google"
    destination_type_name = "google_datamanager"


class LeadsyncGoogleAdsHook(_TypedDestinationHook):
    """Connection type ``leadsync_google_ads``: Google Ads API click conversions."""

    conn_type = "leadsync_google_ads"
    hook_name = "leadsync: Google Ads API (click conversions)"
    default_conn_name = "leadsync_google_ads"
    destination_type_name = "google_ads"


class LeadsyncLinkedInHook(_TypedDestinationHook):
    """Connection type ``leadsync_linkedin``: LinkedIn Conversions API."""

    conn_type = "leadsync_linkedin"
    hook_name = "leadsync: LinkedIn Conversions API"
    default_conn_name = "leadsync_linkedin"
    destination_type_name = "linkedin"


class LeadsyncSnapchatHook(_TypedDestinationHook):
    """Connection type ``leadsync_snapchat``: Snap Conversions API."""

    conn_type = "leadsync_snapchat"
    hook_name = "leadsync: Snap Conversions API"
    default_conn_name = "leadsync_snapchat"
    destination_type_name = "snapchat"


class LeadsyncPinterestHook(_TypedDestinationHook):
    """Connection type ``leadsync_pinterest``: Pinterest Conversions API."""

    conn_type = "leadsync_pinterest"
    hook_name = "leadsync: Pinterest Conversions API"
    default_conn_name = "leadsync_pinterest"
    destination_type_name = "pinterest"


class LeadsyncRedditHook(_TypedDestinationHook):
    """Connection type ``leadsync_reddit``: Reddit Conversions API."""

    conn_type = "leadsync_reddit"
    hook_name = "leadsync: Reddit Conversions API"
    default_conn_name = "leadsync_reddit"
    destination_type_name = "reddit"

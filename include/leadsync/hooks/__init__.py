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

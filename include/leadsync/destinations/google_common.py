"""What the two Google destinations share: the ``leadsync_google`` connection, access tokens
minted with ``google-auth``, and the ``google.rpc.Status`` error envelope.

The connection (one format for ``google_datamanager`` and ``google_ads``):

============================  =================================================================
field                         meaning
============================  =================================================================
host                          API base URL override (the sandbox); empty = Google's URL
password                      a service-account key (the JSON file's text), or the OAuth
                              client secret when ``extra.refresh_token`` is set
extra.keyfile_dict            the service-account key as an object (instead of ``password``)
extra.client_id               OAuth client id (with ``refresh_token`` and the secret)
extra.refresh_token           OAuth refresh token of a user with access to the account
extra.token_uri               OAuth token endpoint (default Google's)
extra.access_token            a fixed bearer token, for the sandbox and tests only: no Google
                              OAuth endpoint is ever contacted
extra.quota_project_id        sent as ``x-goog-user-project``
extra.validate_only           true: the platform validates requests and ingests nothing
extra.developer_token         Google Ads API only (optional since the 2026-09-09 sunset)
extra.api_version             Google Ads API only (default ``v26``)
============================  =================================================================

Tokens are minted lazily, when a request is sent (never while building it), and cached per
process until shortly before they expire (``google-auth`` refreshes a token in its last
minutes), so every batch of a run reuses one token.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from leadsync.destinations.base import CredentialsError, FatalDestinationError
from leadsync.destinations.common import base_url, duration_seconds

DATAMANAGER_SCOPE = "https://www.googleapis.com/auth/datamanager"
ADWORDS_SCOPE = "https://www.googleapis.com/auth/adwords"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
_CUSTOMER_RE = re.compile(r"^\d{10}$")

_SERVICE_ACCOUNT_KEYS = ("client_email", "private_key", "token_uri")


@dataclass(frozen=True)
class GoogleCredentials:
    """A validated ``leadsync_google`` connection (secrets only inside ``auth``)."""

    base_url: str
    auth: TokenSource = field(repr=False)
    quota_project: str | None = None
    validate_only: bool = False
    developer_token: str | None = field(default=None, repr=False)
    api_version: str | None = None

    def __repr__(self) -> str:  # never print secrets
        return (
            f"GoogleCredentials(base_url={self.base_url!r}, auth={self.auth.kind!r}, "
            f"quota_project={self.quota_project!r}, validate_only={self.validate_only!r}, "
            f"api_version={self.api_version!r})"
        )


class TokenSource:
    """Returns ``Authorization`` headers; mints and caches the token behind them."""

    def __init__(self, kind: str, material: Mapping[str, Any], scopes: tuple[str, ...]) -> None:
        self.kind = kind  # "static", "service_account" or "oauth"
        self._material = dict(material)
        self._scopes = scopes
        self._lock = threading.Lock()
        self._credentials: Any = None

    def __repr__(self) -> str:
        return f"TokenSource(kind={self.kind!r})"

    def __call__(self) -> dict[str, str]:
        if self.kind == "static":
            return {"Authorization": f"Bearer {self._material['access_token']}"}
        with self._lock:
            return {"Authorization": f"Bearer {self._token()}"}

    def _token(self) -> str:
        from google.auth import exceptions as gexc

        creds = self._credentials
        if creds is None:
            creds = self._credentials = self._build()
        if creds.valid:  # a token that is not within google-auth's refresh window
            return str(creds.token)
        from google.auth.transport.requests import Request

        from leadsync.destinations.http import TransportError

        try:
            creds.refresh(Request())
        except gexc.TransportError:
            raise TransportError("no response from the Google OAuth token endpoint") from None
        except gexc.RefreshError as exc:
            if getattr(exc, "retryable", False):
                raise TransportError(f"Google OAuth token endpoint: {exc}") from None
            raise FatalDestinationError(
                f"Google refused to mint an access token ({self.kind}): {exc}. Check the "
                "connection's key or refresh token, and that it is allowed the scope "
                f"{' '.join(self._scopes)}"
            ) from None
        return str(creds.token)

    def _build(self) -> Any:
        if self.kind == "service_account":
            from google.oauth2 import service_account

            try:
                return service_account.Credentials.from_service_account_info(
                    self._material, scopes=list(self._scopes)
                )
            except ValueError as exc:  # a malformed private key
                raise FatalDestinationError(
                    f"the service-account key in the connection cannot be used: {exc}"
                ) from None
        from google.oauth2.credentials import Credentials

        return Credentials(
            token=None,
            refresh_token=self._material["refresh_token"],
            client_id=self._material["client_id"],
            client_secret=self._material["client_secret"],
            token_uri=self._material.get("token_uri") or DEFAULT_TOKEN_URI,
            scopes=list(self._scopes),
        )


_SOURCES: dict[str, TokenSource] = {}
_SOURCES_LOCK = threading.Lock()


def token_source(kind: str, material: Mapping[str, Any], scopes: tuple[str, ...]) -> TokenSource:
    """The process-wide token source for these credentials (one token per process)."""
    fingerprint = hashlib.sha256(
        json.dumps([kind, material, scopes], sort_keys=True, default=str).encode()
    ).hexdigest()
    with _SOURCES_LOCK:
        source = _SOURCES.get(fingerprint)
        if source is None:
            source = _SOURCES[fingerprint] = TokenSource(kind, material, scopes)
        return source


def _flag(extra: Mapping[str, Any], key: str) -> bool:
    value = extra.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", ""):
        return value.strip().lower() == "true"
    raise CredentialsError(f"connection extra {key!r} must be true or false, got {value!r}")


def _optional_str(extra: Mapping[str, Any], key: str) -> str | None:
    value = extra.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise CredentialsError(f"connection extra {key!r} must be a string")
    return value.strip() or None


def _service_account_info(password: str | None, extra: Mapping[str, Any]) -> dict[str, Any] | None:
    raw: Any = extra.get("keyfile_dict")
    where = "extra 'keyfile_dict'"
    if raw is None and password and password.lstrip().startswith("{"):
        raw, where = password, "field 'password'"
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise CredentialsError(f"connection {where} is not valid JSON (expected the "
                                   "service-account key file's content)") from None
    if not isinstance(raw, dict) or raw.get("type") != "service_account":
        raise CredentialsError(f"connection {where} must be a service-account key "
                               '(a JSON object with "type": "service_account")')
    missing = [k for k in _SERVICE_ACCOUNT_KEYS if not raw.get(k)]
    if missing:
        raise CredentialsError(f"connection {where}: the service-account key lacks "
                               f"{', '.join(missing)}")
    return raw


def parse_google_connection(
    host: str | None,
    password: str | None,
    extra: Mapping[str, Any],
    *,
    default_base_url: str,
    scope: str,
) -> GoogleCredentials:
    """Validates a ``leadsync_google`` connection; the error names the field to fix."""
    base = base_url(host, default_base_url)
    scopes = (scope,)
    static = _optional_str(extra, "access_token")
    info = _service_account_info(password, extra)
    refresh = _optional_str(extra, "refresh_token")
    if static:
        source = token_source("static", {"access_token": static}, scopes)
    elif info is not None:
        source = token_source("service_account", info, scopes)
    elif refresh:
        client_id = _optional_str(extra, "client_id")
        if not client_id:
            raise CredentialsError("connection extra 'client_id' (the OAuth client id) is "
                                   "missing; it goes with extra 'refresh_token'")
        if not password:
            raise CredentialsError("connection field 'password' (the OAuth client secret) is "
                                   "empty; it goes with extra 'refresh_token'")
        material = {"client_id": client_id, "client_secret": password, "refresh_token": refresh,
                    "token_uri": _optional_str(extra, "token_uri") or DEFAULT_TOKEN_URI}
        source = token_source("oauth", material, scopes)
    else:
        raise CredentialsError(
            "no Google credentials: put a service-account key in field 'password' (or extra "
            "'keyfile_dict'), or an OAuth client secret in 'password' with extra 'client_id' "
            "and 'refresh_token'"
        )
    return GoogleCredentials(
        base_url=base,
        auth=source,
        quota_project=_optional_str(extra, "quota_project_id"),
        validate_only=_flag(extra, "validate_only"),
        developer_token=_optional_str(extra, "developer_token"),
        api_version=_optional_str(extra, "api_version"),
    )


def customer_id(value: Any, key: str) -> str:
    """A Google Ads customer id as 10 digits (hyphens removed); ValueError names ``key``."""
    text = re.sub(r"[\s-]", "", str(value or ""))
    if not _CUSTOMER_RE.match(text):
        raise ValueError(f"{key}: must be a 10-digit Google Ads customer id, got {value!r}")
    return text


# -- the google.rpc.Status error envelope ---------------------------------------------------


@dataclass(frozen=True)
class RpcError:
    """The fields of ``{"error": {"code", "message", "status", "details"}}`` we act on."""

    http_code: int
    status: str
    message: str
    details: list[dict[str, Any]]

    def details_of(self, type_suffix: str) -> list[dict[str, Any]]:
        """The ``details`` entries whose ``@type`` ends with ``type_suffix``."""
        return [d for d in self.details if str(d.get("@type", "")).endswith(type_suffix)]

    def reasons(self) -> list[str]:
        """``ErrorInfo.reason`` values and ``BadRequest`` field-violation reasons."""
        found = [str(d.get("reason")) for d in self.details_of("google.rpc.ErrorInfo")
                 if d.get("reason")]
        for bad in self.details_of("google.rpc.BadRequest"):
            for violation in bad.get("fieldViolations") or []:
                if isinstance(violation, dict) and violation.get("reason"):
                    found.append(str(violation["reason"]))
        return found

    def retry_delay(self) -> float | None:
        """``RetryInfo.retryDelay`` in seconds, when the server gave one."""
        for info in self.details_of("google.rpc.RetryInfo"):
            seconds = duration_seconds(info.get("retryDelay"))
            if seconds is not None:
                return seconds
        return None


def rpc_error(data: Any, http_status: int) -> RpcError | None:
    """The error envelope of a decoded body, or None when it has none."""
    if not isinstance(data, dict) or not isinstance(data.get("error"), dict):
        return None
    error = data["error"]
    code = error.get("code")
    details = [d for d in (error.get("details") or []) if isinstance(d, dict)]
    return RpcError(
        http_code=code if isinstance(code, int) else http_status,
        status=str(error.get("status") or ""),
        message=str(error.get("message") or ""),
        details=details,
    )


TRANSIENT_STATUSES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                                "INTERNAL", "ABORTED"})
FATAL_STATUSES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})
